"""The report: JSON per docs/interface.md, reading a report back, the table, the waste counter's increments."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from reclaimer.core.errors import ReclaimerError
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.labels import NO_NAMESPACE
from reclaimer.core.model import Decision, ProcessSample
from reclaimer.core.views import held_idle_increments
from reclaimer.export.report import (
    NOT_ATTRIBUTED_YET,
    Report,
    ReportSchemaError,
    build_report,
    merge_reports,
    render_json,
    report_from_json,
    rfc3339,
)
from reclaimer.export.table import human_bytes, human_duration, human_ratio, render_cluster_table, render_table
from tests.support.export_fixtures import (
    GIB,
    K_ALICE,
    K_BOB,
    K_LAB,
    K_MIG,
    NOW,
    POD_UID_TRAIN,
    SnapshotBuilder,
    gpu_uuid,
    node_snapshot,
)

KERNEL_KEYS = {"kernel_id", "gateway", "namespace", "pod", "user", "kernel_name", "gpus", "execution_state",
               "last_activity", "connections", "idle_seconds", "verdict", "reason", "action", "eta_seconds"}  # fmt: skip
GPU_KEYS = {"index", "uuid", "model", "utilization", "memory_used_bytes", "memory_total_bytes", "processes"}
PROCESS_KEYS = {"pid", "memory_bytes", "sm_utilization", "kernel_id", "pod", "namespace", "reason"}


def as_json(report: Report) -> dict[str, Any]:
    """The report as its consumers read it; NaN/Infinity in the text would fail here."""
    return json.loads(render_json(report), parse_constant=lambda c: pytest.fail(f"{c} in the report JSON"))


@pytest.fixture(scope="module")
def report_model() -> Report:
    return build_report(node_snapshot())


@pytest.fixture(scope="module")
def report(report_model: Report) -> dict[str, Any]:
    return as_json(report_model)


def kernel(report: dict[str, Any], key: str) -> dict[str, Any]:
    return next(k for k in report["kernels"] if k["key"] == key)


def gpu(report: dict[str, Any], index: int) -> dict[str, Any]:
    return next(g for g in report["gpus"] if g["index"] == index)


# --------------------------------------------------------------------------- build_report


def test_report_has_the_contract_fields(report: dict[str, Any]) -> None:
    assert report["node"] == "gpu-node-1"
    assert report["generated_at"] == "2023-11-14T22:13:20Z"
    assert report["mode"] == "dry-run"
    assert [g["index"] for g in report["gpus"]] == [0, 1, 2, 3, 4, 5]
    for g in report["gpus"]:
        assert GPU_KEYS <= set(g)
        for p in g["processes"]:
            assert set(p) == PROCESS_KEYS
    assert len(report["kernels"]) == 5  # one per decision, the pod candidate included
    for k in report["kernels"]:
        assert KERNEL_KEYS <= set(k)
        assert k["verdict"] in {"keep", "warn", "reclaim", "exempt", "unknown"}
        for g in k["gpus"]:
            assert set(g) == {"uuid", "memory_bytes", "utilization"}


def test_report_is_strict_json(report_model: Report) -> None:
    assert as_json(report_model) == report_model.model_dump(mode="json")


def test_unknown_values_are_null_never_zero(report: dict[str, Any]) -> None:
    mig = gpu(report, 4)
    assert mig["utilization"] is None and mig["idle_seconds"] is None
    erin = kernel(report, f"kernel:{K_MIG}")
    assert erin["idle_seconds"] is None and erin["eta_seconds"] is None
    assert erin["gpus"] == [{"uuid": gpu_uuid(4), "memory_bytes": 10 * GIB, "utilization": None}]
    lost = gpu(report, 5)
    assert lost["up"] is False
    assert (lost["utilization"], lost["memory_used_bytes"], lost["processes"]) == (None, None, [])
    assert lost["memory_total_bytes"] == 16 * GIB  # from the device enumerated at start-up


def test_kernel_entry_carries_gateway_pod_and_activity(report: dict[str, Any]) -> None:
    alice = kernel(report, f"kernel:{K_ALICE}")
    assert alice | {"gpus": None} == alice | {
        "kernel_id": K_ALICE, "gateway": "eg", "namespace": "ml-team", "pod": "jupyter-alice", "user": "alice",
        "kernel_name": "python3", "execution_state": "idle", "last_activity": "2023-11-14T21:26:20Z",
        "connections": 0, "idle_seconds": 2820, "verdict": "reclaim", "action": "shutdown-kernel", "eta_seconds": 0,
        "reason": "idle 47m >= idle_after 30m", "policy": "default", "allocated": False, "gpus": None,
    }  # fmt: skip
    assert alice["gpus"] == [{"uuid": gpu_uuid(0), "memory_bytes": 20 * GIB, "utilization": 0.0}]


def test_pod_candidate_without_kernel_is_reported(report: dict[str, Any]) -> None:
    pod = kernel(report, f"pod:{POD_UID_TRAIN}")
    assert (pod["kernel_id"], pod["gateway"], pod["execution_state"]) == (None, None, None)
    assert (pod["namespace"], pod["pod"], pod["allocated"], pod["action"]) == ("research", "train-x", True, "evict-pod")
    # No process on a GPU whose process list is known: it holds the GPU and uses no memory.
    assert pod["gpus"] == [{"uuid": gpu_uuid(3), "memory_bytes": 0, "utilization": 0.0}]


def test_kernel_outside_kubernetes_has_null_namespace(report: dict[str, Any]) -> None:
    lab = kernel(report, f"kernel:{K_LAB}")
    assert (lab["namespace"], lab["pod"], lab["gateway"], lab["user"]) == (None, None, "lab", "carol")
    assert lab["gpus"] == [{"uuid": gpu_uuid(2), "memory_bytes": 40 * GIB, "utilization": 0.9}]


def test_gpu_processes_are_attributed_or_say_why_not(report: dict[str, Any]) -> None:
    assert gpu(report, 0)["processes"] == [
        {"pid": 101, "memory_bytes": 20 * GIB, "sm_utilization": 0.0, "kernel_id": K_ALICE, "pod": "jupyter-alice",
         "namespace": "ml-team", "reason": None}  # fmt: skip
    ]
    host = next(p for p in gpu(report, 2)["processes"] if p["pid"] == 999)
    assert (host["kernel_id"], host["reason"]) == (None, "no pod: host process")
    assert report["unattributed"] == [
        {"pid": 999, "memory_bytes": 1 * GIB, "sm_utilization": 0.0, "kernel_id": None, "pod": None,
         "namespace": None, "reason": "no pod: host process", "gpu_uuid": gpu_uuid(2), "gpu": 2}  # fmt: skip
    ]


def test_process_seen_after_attribution_is_listed_as_not_attributed_yet() -> None:
    b = SnapshotBuilder()
    b.gpu(0, processes=(ProcessSample(77, 1 * GIB, None),), memory_used=1 * GIB)
    (proc,) = as_json(build_report(b.build()))["gpus"][0]["processes"]
    assert (proc["pid"], proc["kernel_id"], proc["reason"]) == (77, None, NOT_ATTRIBUTED_YET)


@pytest.mark.parametrize(
    "gpu_processes,kernel_processes,expected",
    [
        pytest.param((ProcessSample(1, GIB, None),), [(1, GIB, None)], 0.42, id="sole-holder-gets-gpu-utilization"),
        pytest.param((ProcessSample(1, GIB, 0.1),), [(1, GIB, 0.1)], 0.1, id="per-process-sm-utilization"),
        pytest.param(
            (ProcessSample(1, GIB, 0.7), ProcessSample(2, GIB, 0.6)), [(1, GIB, 0.7), (2, GIB, 0.6)], 1.0,
            id="sum-capped-at-one",
        ),
        pytest.param(
            (ProcessSample(1, GIB, None), ProcessSample(2, GIB, None)), [(1, GIB, None)], None,
            id="shared-gpu-without-per-process-data-is-unknown",
        ),
        pytest.param(None, [(1, GIB, None)], None, id="unknown-process-list-is-unknown"),
    ],
)
def test_kernel_gpu_utilization(
    gpu_processes: tuple[ProcessSample, ...] | None,
    kernel_processes: list[tuple[int, int, float | None]],
    expected: float | None,
) -> None:
    b = SnapshotBuilder()
    g = b.gpu(0, utilization=0.42, processes=gpu_processes)
    b.kernel(K_ALICE, {g: kernel_processes}, Verdict.KEEP, idle_seconds=0)
    assert as_json(build_report(b.build()))["kernels"][0]["gpus"][0]["utilization"] == expected


def test_unknown_process_memory_makes_kernel_memory_unknown() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0, processes=(ProcessSample(1, None, None), ProcessSample(2, GIB, None)))
    b.kernel(K_ALICE, {g: [(1, None, None), (2, GIB, None)]}, Verdict.UNKNOWN)
    assert as_json(build_report(b.build()))["kernels"][0]["gpus"][0]["memory_bytes"] is None


def test_non_finite_values_become_null() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0, utilization=float("nan"))
    b.kernel(K_ALICE, {g: [(1, GIB, float("inf"))]}, Verdict.KEEP, idle_seconds=float("nan"))
    report = as_json(build_report(b.build()))  # parsing fails on a NaN left behind
    assert report["gpus"][0]["utilization"] is None and report["kernels"][0]["idle_seconds"] is None


@pytest.mark.parametrize(
    "value,expected",
    [
        pytest.param(NOW, "2023-11-14T22:13:20Z", id="posix-seconds"),
        pytest.param(datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc), "2024-05-01T12:00:00Z", id="aware-utc"),
        pytest.param(
            datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))), "2024-05-01T12:00:00Z", id="offset"
        ),
        pytest.param(datetime(2024, 5, 1, 12, 0), "2024-05-01T12:00:00Z", id="naive-is-utc"),
        pytest.param(None, None, id="unknown"),
    ],
)
def test_rfc3339(value: float | datetime | None, expected: str | None) -> None:
    assert rfc3339(value) == expected


def test_summary_counts_idle_gpus_and_verdicts(report: dict[str, Any]) -> None:
    assert report["summary"] == {
        "gpus_held_idle": 3,  # alice's, bob's, the allocated T4; erin's is unknown, carol's busy
        "memory_held_idle_bytes": 50 * GIB,
        "allocated_gpus_held_idle": 1,  # the T4 allocated to train-x
        "planned_recovers": {"allocation": 1, "memory": 2, "none": 0},  # evict train-x; shut alice's, bob's down
        "reclaimable_now": 1,
        "warned": 2,
        "verdicts": {"keep": 1, "warn": 2, "reclaim": 1, "exempt": 0, "unknown": 1},
    }


# --------------------------------------------------------------------------- report_from_json


def test_report_round_trips_through_json(report_model: Report, report: dict[str, Any]) -> None:
    back = report_from_json(json.loads(render_json(report_model)))
    assert back == report_model and as_json(back) == report
    assert render_table(back) == render_table(report_model)


def _broken(path: str, value: Any) -> dict[str, Any]:
    """The fixture report with ``path`` (dotted, [i] indexes) set to ``value`` (``...`` deletes it)."""
    payload = as_json(build_report(node_snapshot()))
    parts = path.replace("[", ".").replace("]", "").split(".")
    target: Any = payload
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return payload


@pytest.mark.parametrize(
    "payload,message",
    [
        pytest.param([], "report: expected dict", id="not-an-object"),
        pytest.param({"error": "no decision cycle"}, "report.node: required field is missing", id="error-payload"),
        pytest.param(_broken("kernels", ...), "report.kernels: required field is missing", id="no-kernels"),
        pytest.param(_broken("gpus", {}), "report.gpus: expected list", id="gpus-not-a-list"),
        pytest.param(_broken("kernels[1].verdict", "maybe"), "kernels[1].verdict: expected one of", id="bad-verdict"),
        pytest.param(_broken("kernels[0].idle_seconds", "47m"), "kernels[0].idle_seconds: expected", id="str-number"),
        pytest.param(_broken("kernels[0].connections", True), "kernels[0].connections: expected int", id="bool"),
        pytest.param(_broken("kernels[2].gpus[0].uuid", ...), "kernels[2].gpus[0].uuid: required", id="gpu-uuid"),
        pytest.param(_broken("gpus[0].processes[0].pid", ...), "gpus[0].processes[0].pid: required", id="pid"),
        pytest.param(_broken("gpus[1].index", "1"), "gpus[1].index: expected int", id="index-str"),
        pytest.param(_broken("unattributed", "x"), "report.unattributed: expected list", id="unattributed"),
        # Checked by the one model now, where the hand-written checks let them through to crash the table or the JSON:
        pytest.param(
            _broken("gpus[0].idle_seconds", "1h"),
            "gpus[0].idle_seconds: expected int or float or null, got str '1h'",
            id="gpu-idle-str",
        ),
        pytest.param(
            _broken("kernels[0].gpus[0].memory_bytes", float("nan")),
            "kernels[0].gpus[0].memory_bytes: expected a finite number or null",
            id="nan",
        ),
        pytest.param(
            _broken("kernels[0].allocated_gpus", [7]),
            "kernels[0].allocated_gpus[0]: expected str, got int 7",
            id="allocated-gpu-not-a-uuid",
        ),
        pytest.param(_broken("halted", 1), "report.halted: expected str or null, got int 1", id="halted"),
        pytest.param(_broken("unattributed[0].gpu", "2"), "unattributed[0].gpu: expected int or null", id="gpu-str"),
    ],
)
def test_report_from_json_rejects_other_payloads_naming_the_path(payload: Any, message: str) -> None:
    with pytest.raises(ReportSchemaError) as exc:
        report_from_json(payload)
    assert message in str(exc.value)
    assert isinstance(exc.value, ReclaimerError)  # the CLI prints it without a traceback


def test_report_from_json_computes_the_summary_itself(report: dict[str, Any], report_model: Report) -> None:
    claimed = {**report, "summary": {"gpus_held_idle": 0, "reclaimable_now": "lots"}}  # a sender's word is not taken
    back = report_from_json(claimed)
    assert back.summary == report_model.summary and as_json(back)["summary"] == report["summary"]


def test_report_from_json_accepts_a_minimal_report() -> None:
    minimal = {"node": "n", "generated_at": "2024-01-01T00:00:00Z", "mode": "enforce", "gpus": [], "kernels": []}
    back = report_from_json(minimal)
    assert back.summary is not None and back.summary.gpus_held_idle == 0
    assert "No kernels or pods hold a GPU on this node." in render_table(back)


# --------------------------------------------------------------------------- the table


def _kernel_lines(table: str) -> list[str]:
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NAMESPACE"))
    end = lines.index("", start)
    return lines[start:end]


def test_table_sorts_by_waste_and_shows_human_units(report_model: Report) -> None:
    table = render_table(report_model)
    header, *rows = _kernel_lines(table)
    assert header.split() == ["NAMESPACE", "POD/KERNEL", "USER", "GPU", "MEM", "UTIL", "STATE", "IDLE", "ALLOC",
                              "VERDICT", "ACTION", "FREES", "ETA", "REASON"]  # fmt: skip
    # 16 GiB × 1h (whole allocated T4) > 20 GiB × 47m > 30 GiB × 25m > busy > unknown
    assert [r.split()[1] for r in rows] == [
        "train-x", "jupyter-alice/11111111", "jupyter-bob/22222222", "33333333", "jupyter-erin/44444444",
    ]  # fmt: skip
    assert rows[1].split()[:13] == ["ml-team", "jupyter-alice/11111111", "alice", "0", "20.0", "GiB", "0%", "idle",
                                    "47m", "-", "reclaim", "shutdown-kernel", "mem"]  # fmt: skip
    assert " now " in rows[1] and rows[2].split()[13] == "5m"
    # The allocated T4: its pod holds the allocation, and evicting the pod gives the GPU back.
    assert rows[0].split()[8:12] == ["1h", "yes", "warn", "evict-pod"] and rows[0].split()[12] == "alloc"
    erin = rows[4].split()
    assert erin[6:9] == ["?", "idle", "?"]  # unknown utilisation and idle time are "?", never 0
    assert ("3 GPUs held idle: 50.0 GiB GPU memory, 1 GPU allocation; 1 reclaimable now; 2 warned; "
            "planned actions release 1 allocation(s), free memory only for 2; 1 unknown") in table.splitlines()
    assert "(verdicts show what enforce would do)" in table.splitlines()[0]


def test_cluster_table_has_the_node_table_columns_after_node(report: dict[str, Any], report_model: Report) -> None:
    # The cluster table is the node table with NODE in front: same headers, and every cell under its own header
    # (ALLOC and FREES included, REASON last and not cut off).
    node = report["node"]
    merged = merge_reports([report_from_json(report)], [], NOW)
    lines = render_cluster_table(merged).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    header, rows = lines[start], lines[start + 1 : lines.index("", start)]
    assert header.split() == ["NODE", "NAMESPACE", "POD/KERNEL", "USER", "GPU", "MEM", "UTIL", "STATE", "IDLE",
                              "ALLOC", "VERDICT", "ACTION", "FREES", "ETA", "REASON"]  # fmt: skip
    alice = next(r for r in rows if "jupyter-alice/11111111" in r)
    assert alice.split()[:14] == [node, "ml-team", "jupyter-alice/11111111", "alice", "0", "20.0", "GiB", "0%", "idle",
                                  "47m", "-", "reclaim", "shutdown-kernel", "mem"]  # fmt: skip
    node_alice = next(r for r in _kernel_lines(render_table(report_model)) if "jupyter-alice/11111111" in r)
    assert alice.endswith(node_alice.split("mem", 1)[1].strip())  # the same ETA and REASON as the node table


def test_table_lists_gpus_and_unattributed_processes(report_model: Report) -> None:
    lines = render_table(report_model).splitlines()
    gpu_header = lines.index(next(line for line in lines if line.startswith("GPU  MODEL")))
    assert lines[gpu_header + 1].split()[:7] == ["0", "NVIDIA", "A100-SXM4-80GB", "0%", "20.0", "GiB", "/"]
    assert lines[gpu_header + 6].split()[:4] == ["5", "Tesla", "T4", "?"]
    unattributed = lines.index("Unattributed GPU processes:")
    assert lines[unattributed + 2].split() == ["2", "999", "1.0", "GiB", "-", "-", "no", "pod:", "host", "process"]


def test_table_has_no_colour_codes_and_neutralises_remote_text() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0)
    b.kernel(K_ALICE, {g: [(1, GIB, 0.0)]}, Verdict.KEEP, namespace="ns", pod="p[bold]x[/bold]",
             reason="evil\x1b[31mred\nsecond line", idle_seconds=0)  # fmt: skip
    table = render_table(build_report(b.build()))
    assert "\x1b" not in table
    assert "p[bold]x[/bold]/11111111" in table
    assert "evil [31mred second line" in table


def test_table_fits_a_width_by_shortening_only_the_reason(report_model: Report) -> None:
    wide = _kernel_lines(render_table(report_model))
    narrow = _kernel_lines(render_table(report_model, width=150))
    assert max(len(line) for line in wide) > 150 >= max(len(line) for line in narrow)
    assert [line.split()[:13] for line in narrow] == [line.split()[:13] for line in wide]
    assert any(line.endswith("…") for line in narrow)
    # Narrower than the fixed columns: REASON keeps a readable minimum and the lines run long, as kubectl's do.
    tiny = _kernel_lines(render_table(report_model, width=40))
    reason_at = tiny[0].index("REASON")
    assert max(len(line) - reason_at for line in tiny) == 24
    assert [line.split()[:13] for line in tiny] == [line.split()[:13] for line in wide]


@pytest.mark.parametrize(
    "func,value,expected",
    [
        pytest.param(human_bytes, 60 * GIB, "60.0 GiB", id="gib"),
        pytest.param(human_bytes, 512 * 1024**2, "512 MiB", id="mib"),
        pytest.param(human_bytes, 0, "0 B", id="zero-bytes-is-known"),
        pytest.param(human_bytes, None, "?", id="unknown-bytes"),
        pytest.param(human_duration, 2820, "47m", id="minutes"),
        pytest.param(human_duration, 45, "45s", id="seconds"),
        pytest.param(human_duration, 7500, "2h5m", id="hours"),
        pytest.param(human_duration, 2 * 86400 + 4 * 3600, "2d4h", id="days"),
        pytest.param(human_duration, None, "?", id="unknown-duration"),
        pytest.param(human_ratio, 0.031, "3%", id="ratio"),
        pytest.param(human_ratio, 0.0, "0%", id="zero-ratio"),
        pytest.param(human_ratio, None, "?", id="unknown-ratio"),
    ],
)
def test_human_units(func: Any, value: Any, expected: str) -> None:
    assert func(value) == expected


# --------------------------------------------------------------------------- held_idle_increments


def _threshold(d: Decision) -> float:
    return 0.05


@pytest.mark.parametrize(
    "utilization,prev,expected",
    [
        pytest.param([0.0] * 10, None, 10.0, id="first-cycle-counts-the-whole-buffer"),
        pytest.param([0.0] * 10, NOW - 4, 4.0, id="only-samples-after-the-previous-cycle"),
        pytest.param([0.0] * 10, NOW, 0.0, id="nothing-new"),
        pytest.param([0.0, None, 0.0, None, 0.0], None, 3.0, id="unknown-samples-count-nothing"),
        pytest.param([0.05] * 5, None, 0.0, id="at-threshold-is-not-idle"),
        pytest.param([0.04, 0.9, 0.04, 0.9], None, 2.0, id="busy-samples-count-nothing"),
    ],
)
def test_held_idle_increments_counts_idle_sample_intervals(
    utilization: list[float | None], prev: float | None, expected: float
) -> None:
    b = SnapshotBuilder()
    g = b.gpu(0, utilization=utilization)
    b.kernel(K_ALICE, {g: [(1, GIB, 0.0)]}, Verdict.KEEP, namespace="ml-team", pod="p")
    result = held_idle_increments(prev, b.build(), _threshold)
    assert result == ({"ml-team": expected} if expected else {})


def test_held_idle_increments_per_namespace_with_each_holders_threshold() -> None:
    b = SnapshotBuilder(interval=2.0, history=3)
    g0 = b.gpu(0, utilization=0.1)
    g1 = b.gpu(1, utilization=0.0)
    b.gpu(2, utilization=0.0)  # held by nobody: not waste
    b.kernel(K_ALICE, {g0: [(1, GIB, None)]}, Verdict.KEEP, namespace="lenient", pod="a")
    b.kernel(K_BOB, {g1: [(2, GIB, None)]}, Verdict.KEEP, pod=None)  # outside Kubernetes
    b.kernel(K_LAB, {g0: [(3, GIB, None)]}, Verdict.KEEP, namespace="strict", pod="c")  # shares GPU 0
    thresholds = {K_ALICE: 0.2, K_BOB: 0.05, K_LAB: 0.05}
    result = held_idle_increments(None, b.build(), lambda d: thresholds[d.candidate.kernel_id or ""])
    # GPU 0 at 10 %: idle for alice (20 %), busy for lab (5 %); each holder has half of the GPU.
    assert result == {"lenient": 3.0, NO_NAMESPACE: 6.0}


def test_held_idle_increments_ignores_lost_gpus_and_future_samples() -> None:
    b = SnapshotBuilder()
    g0 = b.gpu(0, up=False)
    b.kernel(K_ALICE, {g0: []}, Verdict.UNKNOWN, namespace="a", pod="a", allocated=True)
    snap = b.build()
    assert held_idle_increments(None, snap, _threshold) == {}
    b2 = SnapshotBuilder(now=NOW + 5)
    g = b2.gpu(0)
    b2.kernel(K_ALICE, {g: []}, Verdict.KEEP, namespace="a", pod="a", allocated=True)
    early = dataclasses.replace(b2.build(), generated_at=NOW)
    assert held_idle_increments(None, early, _threshold) == {"a": 5.0}  # samples at NOW-4..NOW only


@settings(max_examples=60, deadline=None)
@given(
    utils=st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=1, max_size=30),
    holders=st.integers(1, 3),
    prev_offset=st.one_of(st.none(), st.floats(0, 40)),
    threshold=st.floats(0, 1),
)
def test_held_idle_never_exceeds_wall_time(
    utils: list[float | None], holders: int, prev_offset: float | None, threshold: float
) -> None:
    b = SnapshotBuilder()
    g = b.gpu(0, utilization=utils)
    for i in range(holders):
        b.kernel(f"0000000{i}-0000-4000-8000-000000000000", {g: [(i, GIB, None)]}, Verdict.KEEP,
                 namespace=f"ns{i}", pod=f"p{i}")  # fmt: skip
    prev = None if prev_offset is None else NOW - prev_offset
    result = held_idle_increments(prev, b.build(), lambda d: threshold)
    window = [u for k, u in enumerate(utils) if prev is None or NOW - (len(utils) - 1 - k) > prev]
    idle = sum(1 for u in window if u is not None and u < threshold)
    assert all(v > 0 for v in result.values())
    assert sum(result.values()) == pytest.approx(idle * 1.0)  # one GPU: never more than one GPU-second per second


# --------------------------------------------------------------------------- layering


@pytest.mark.e2e
def test_report_module_is_pure() -> None:
    code = "import sys, reclaimer.export.report, reclaimer.export.table; print(sorted(m for m in ('aiohttp', 'kubernetes', 'pynvml', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_action_kinds_render_as_contract_values(report: dict[str, Any]) -> None:
    assert {k["action"] for k in report["kernels"]} <= {a.value for a in ActionKind}


def test_table_eta_and_idle_columns_only_count_down_for_idle_holders() -> None:
    b = SnapshotBuilder()
    g0, g1, g2 = b.gpu(0), b.gpu(1), b.gpu(2)
    b.kernel("aaaaaaaa-0000-4000-8000-000000000001", {g0: [(1, GIB, None)]}, Verdict.KEEP,
             execution_state="busy", reason="kernel busy", idle_seconds=0, eta_seconds=1800)
    b.kernel("bbbbbbbb-0000-4000-8000-000000000002", {g1: [(2, GIB, None)]}, Verdict.EXEMPT,
             action=ActionKind.NONE, reason="exempt: kernel name gpu-reserved")
    b.kernel("cccccccc-0000-4000-8000-000000000003", {g2: [(3, GIB, None)]}, Verdict.WARN,
             reason="GPU 2 at 0% for 16s; shutdown-kernel in 4s", idle_seconds=16.4, eta_seconds=3.6)
    lines = _kernel_lines(render_table(build_report(b.build())))
    idle_col, eta_col = lines[0].split().index("IDLE") + 1, lines[0].split().index("ETA") + 1  # MEM is "1.0 GiB"
    rows = {r.split()[1]: r.split() for r in lines[1:]}
    assert (rows["aaaaaaaa"][idle_col], rows["aaaaaaaa"][eta_col]) == ("0s", "-")  # busy: no countdown
    assert (rows["bbbbbbbb"][idle_col], rows["bbbbbbbb"][eta_col]) == ("-", "-")  # exempt: no idle time
    assert (rows["cccccccc"][idle_col], rows["cccccccc"][eta_col]) == ("16s", "4s")  # rounded like "in 4s"


def test_invariant_18_breaker_in_the_report(report: dict[str, Any], report_model: Report) -> None:
    assert report["breaker"] == {
        "tripped": True, "cause": "sustained", "reclaimable": 3, "total": 5, "since": "2023-11-14T21:58:20Z",
        "released": f"kernel:{K_ALICE}",
        "reason": "tripped (sustained) since 21:58:20 UTC: 3 of 5 would be reclaimed, more than "
                  f"max_fraction_per_cycle=0.5; letting kernel:{K_ALICE} through this cycle (one per cycle)",
    }  # fmt: skip
    assert "Circuit breaker tripped (sustained) since 21:58:20 UTC: 3 of 5 would be reclaimed" in render_table(report_model)
    with pytest.raises(ReportSchemaError, match=r"report.breaker.tripped: expected bool, got str"):
        report_from_json(_broken("breaker.tripped", "yes"))
    older = _broken("breaker", ...)  # a report from a daemon without the breaker field still renders
    assert "Circuit breaker" not in render_table(report_from_json(older))


def _field_names(model: type[BaseModel]) -> list[str]:
    """The model's fields depth first, as docs/interface.md writes the report: each name, then what it holds."""
    names: list[str] = []
    for name, info in model.model_fields.items():
        names.append(name)
        inner = [info.annotation, *typing.get_args(info.annotation)]
        inner += [a for t in inner for a in typing.get_args(t)]
        nested = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            names += _field_names(nested[0])
    return names


def test_interface_doc_gives_the_model_fields_in_order() -> None:
    # The report's shape is the model; docs/interface.md's "Report JSON" block must say the same, in the same order.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "interface.md").read_text(encoding="utf-8")
    block = doc.split("## Report JSON", 1)[1].split("```", 2)[1]
    assert re.findall(r'"(\w+)"', block) == _field_names(Report)
