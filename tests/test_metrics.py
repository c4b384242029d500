"""/metrics content: series rebuilt per scrape from the snapshot, the daemon's counters, bounded labels, lint."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from reclaimer.core.modes import MODES
from reclaimer.export.metrics import ACTIONS, FAST_BUCKETS, RESULTS, Metrics
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult, BreakerStatus, CycleSnapshot
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

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Series:
    """Parse one real exposition into {(sample name, labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    out: Series = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def values(series: Series, name: str, **match: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in series.items() if n == name and set(match.items()) <= labels}


def one(series: Series, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


def gpu_labels(i: int) -> dict[str, str]:
    return {"gpu": str(i), "uuid": gpu_uuid(i)}


@pytest.fixture(scope="module")
def node() -> Series:
    snap = node_snapshot()
    return scrape(Metrics(lambda: snap))


# --------------------------------------------------------------------------- per-GPU series


@pytest.mark.parametrize(
    "name,gpu,expected",
    [
        pytest.param("reclaimer_gpu_utilization_ratio", 0, 0.0, id="idle-gpu-is-0"),
        pytest.param("reclaimer_gpu_utilization_ratio", 2, 0.9, id="busy-gpu"),
        pytest.param("reclaimer_gpu_utilization_ratio", 4, None, id="unknown-utilization-has-no-series"),
        pytest.param("reclaimer_gpu_utilization_ratio", 5, None, id="lost-gpu-has-no-utilization"),
        pytest.param("reclaimer_gpu_up", 0, 1.0, id="up"),
        pytest.param("reclaimer_gpu_up", 5, 0.0, id="lost-gpu-is-down"),
        pytest.param("reclaimer_gpu_memory_used_bytes", 1, 30 * GIB, id="memory-used"),
        pytest.param("reclaimer_gpu_memory_used_bytes", 5, None, id="lost-gpu-memory-unknown"),
        pytest.param("reclaimer_gpu_memory_total_bytes", 5, 16 * GIB, id="total-from-the-device"),
        pytest.param("reclaimer_gpu_idle_seconds", 0, 2820.0, id="idle-seconds"),
        pytest.param("reclaimer_gpu_idle_seconds", 4, None, id="unknown-idle-has-no-series"),
        pytest.param("reclaimer_gpu_held_idle", 0, 1.0, id="held-by-an-idle-kernel"),
        pytest.param("reclaimer_gpu_held_idle", 2, 0.0, id="held-by-a-busy-kernel"),
        pytest.param("reclaimer_gpu_held_idle", 3, 1.0, id="allocated-to-a-pod-without-process"),
        pytest.param("reclaimer_gpu_held_idle", 4, None, id="holder-unknown-is-not-idle"),
        pytest.param("reclaimer_gpu_held_idle", 5, 0.0, id="held-by-nobody"),
    ],
)
def test_gpu_series(node: Series, name: str, gpu: int, expected: float | None) -> None:
    assert one(node, name, **gpu_labels(gpu)) == expected


def test_gpu_info_names_every_gpu(node: Series) -> None:
    models = {dict(labels)["gpu"]: dict(labels)["model"] for labels in values(node, "reclaimer_gpu_info")}
    assert models == {"0": "NVIDIA A100-SXM4-80GB", "1": "NVIDIA A100-SXM4-80GB", "2": "NVIDIA H100 80GB HBM3",
                      "3": "Tesla T4", "4": "NVIDIA A100-SXM4-80GB", "5": "Tesla T4"}  # fmt: skip


# --------------------------------------------------------------------------- per-kernel series


def test_kernel_info_covers_kernels_and_pod_candidates(node: Series) -> None:
    infos = sorted(tuple(sorted(labels)) for labels in values(node, "reclaimer_kernel_info"))
    pod_key = f"pod:{POD_UID_TRAIN}"
    expected = [
        {"kernel_id": K_ALICE, "gateway": "eg", "namespace": "ml-team", "pod": "jupyter-alice", "user": "alice",
         "kernel_name": "python3"},
        {"kernel_id": K_BOB, "gateway": "eg", "namespace": "ml-team", "pod": "jupyter-bob", "user": "bob",
         "kernel_name": "python3"},
        # Outside Kubernetes: the namespace label is "-", as on the waste counter, so joins on namespace line up.
        {"kernel_id": K_LAB, "gateway": "lab", "namespace": "-", "pod": "", "user": "carol", "kernel_name": "python3"},
        {"kernel_id": K_MIG, "gateway": "eg", "namespace": "ml-team", "pod": "jupyter-erin", "user": "erin",
         "kernel_name": "python3"},
        {"kernel_id": pod_key, "gateway": "", "namespace": "research", "pod": "train-x", "user": "dave",
         "kernel_name": ""},
    ]  # fmt: skip
    assert infos == sorted(tuple(sorted(e.items())) for e in expected)


@pytest.mark.parametrize(
    "name,labels,expected",
    [
        pytest.param("reclaimer_kernel_gpu_memory_bytes", {"kernel_id": K_ALICE, "uuid": gpu_uuid(0)}, 20 * GIB,
                     id="kernel-memory"),
        pytest.param("reclaimer_kernel_gpu_memory_bytes", {"kernel_id": f"pod:{POD_UID_TRAIN}", "uuid": gpu_uuid(3)},
                     0.0, id="pod-without-process-uses-no-memory"),
        pytest.param("reclaimer_kernel_gpu_utilization_ratio", {"kernel_id": K_LAB, "uuid": gpu_uuid(2)}, 0.9,
                     id="kernel-utilization"),
        pytest.param("reclaimer_kernel_gpu_utilization_ratio", {"kernel_id": K_MIG, "uuid": gpu_uuid(4)}, None,
                     id="unknown-kernel-utilization-has-no-series"),
        pytest.param("reclaimer_kernel_idle_seconds", {"kernel_id": K_BOB}, 1500.0, id="idle-seconds"),
        pytest.param("reclaimer_kernel_idle_seconds", {"kernel_id": K_MIG}, None, id="unknown-idle-has-no-series"),
        pytest.param("reclaimer_kernel_gpus_held_idle", {"kernel_id": K_ALICE}, 1.0, id="held-idle"),
        pytest.param("reclaimer_kernel_gpus_held_idle", {"kernel_id": K_LAB}, 0.0, id="busy-holds-none-idle"),
        pytest.param("reclaimer_kernel_gpus_held_idle", {"kernel_id": K_MIG}, None, id="unknown-holds-unknown"),
        pytest.param("reclaimer_kernel_reclaim_eta_seconds", {"kernel_id": K_ALICE, "action": "shutdown-kernel"},
                     0.0, id="eta-now"),
        pytest.param("reclaimer_kernel_reclaim_eta_seconds", {"kernel_id": K_BOB, "action": "shutdown-kernel"},
                     300.0, id="eta-warning-countdown"),
        pytest.param("reclaimer_kernel_reclaim_eta_seconds",
                     {"kernel_id": f"pod:{POD_UID_TRAIN}", "action": "evict-pod"}, 600.0, id="eta-pod"),
        pytest.param("reclaimer_kernel_verdict", {"kernel_id": K_MIG, "verdict": "unknown"}, 1.0, id="verdict"),
    ],
)  # fmt: skip
def test_kernel_series(node: Series, name: str, labels: dict[str, str], expected: float | None) -> None:
    assert one(node, name, **labels) == expected


def test_eta_only_for_kernels_facing_an_action(node: Series) -> None:
    ids = {dict(labels)["kernel_id"] for labels in values(node, "reclaimer_kernel_reclaim_eta_seconds")}
    assert ids == {K_ALICE, K_BOB, f"pod:{POD_UID_TRAIN}"}


def test_eta_hidden_when_the_action_is_none() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0)
    b.kernel(K_ALICE, {g: [(1, GIB, 0.0)]}, Verdict.WARN, action=ActionKind.NONE, idle_seconds=100, eta_seconds=60)
    snap = b.build()
    assert values(scrape(Metrics(lambda: snap)), "reclaimer_kernel_reclaim_eta_seconds") == {}


def test_kernels_by_verdict_counts_every_verdict(node: Series) -> None:
    counts = {dict(labels)["verdict"]: v for labels, v in values(node, "reclaimer_kernels").items()}
    assert counts == {"keep": 1.0, "warn": 2.0, "reclaim": 1.0, "exempt": 0.0, "unknown": 1.0}


def test_gateway_up_omits_gateways_not_contacted_yet(node: Series) -> None:
    ups = {dict(labels)["gateway"]: v for labels, v in values(node, "reclaimer_gateway_up").items()}
    assert ups == {"eg": 1.0, "lab": 0.0}


def test_timestamps_mode_and_build_info(node: Series) -> None:
    assert one(node, "reclaimer_last_sample_timestamp_seconds") == NOW
    assert one(node, "reclaimer_snapshot_timestamp_seconds") == NOW
    assert one(node, "reclaimer_mode", mode="dry-run") == 1.0
    assert len(values(node, "reclaimer_build_info")) == 1


# --------------------------------------------------------------------------- rebuilt per scrape


def test_series_follow_the_latest_snapshot_and_vanish_with_the_kernel() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0)
    b.kernel(K_ALICE, {g: [(1, GIB, 0.0)]}, Verdict.WARN, namespace="a", pod="p", idle_seconds=10, eta_seconds=5)
    with_kernel = b.build()
    b.decisions.clear()
    without = b.build()
    current: dict[str, CycleSnapshot] = {"snap": with_kernel}
    metrics = Metrics(lambda: current["snap"])
    assert any(dict(k)["kernel_id"] == K_ALICE for k in values(scrape(metrics), "reclaimer_kernel_info"))
    current["snap"] = without
    after = scrape(metrics)
    assert not any("kernel_id" in dict(k) for (_n, k) in after)
    assert one(after, "reclaimer_kernels", verdict="warn") == 0.0


def test_before_the_first_cycle_only_static_series() -> None:
    series = scrape(Metrics(lambda: None))
    assert values(series, "reclaimer_gpu_info") == {} and values(series, "reclaimer_kernel_info") == {}
    assert len(values(series, "reclaimer_build_info")) == 1


def test_a_failing_snapshot_costs_its_series_not_the_scrape() -> None:
    def broken() -> CycleSnapshot:
        raise RuntimeError("half-built snapshot")

    metrics = Metrics(broken)
    with capture_logs() as logs:
        series = scrape(metrics)
        series = scrape(metrics)
    assert one(series, "reclaimer_metrics_collect_errors_total") == 2.0
    assert len(values(series, "reclaimer_build_info")) == 1
    assert [e["event"] for e in logs] == ["building metrics from the snapshot failed"] * 2


def test_duplicate_candidates_never_produce_duplicate_series() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0)
    d = b.kernel(K_ALICE, {g: [(1, GIB, 0.0)]}, Verdict.KEEP, idle_seconds=0)
    b.decisions.append(d)
    snap = b.build()
    with capture_logs() as logs:
        series = scrape(Metrics(lambda: snap))  # scrape() fails on a duplicate series
    assert len(values(series, "reclaimer_kernel_info")) == 1
    assert any(e["event"] == "duplicate series in snapshot dropped" for e in logs)


# --------------------------------------------------------------------------- NVML error counts


def test_nvml_errors_are_a_counter_family() -> None:
    counts = {("nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED"): 4, ("nvmlDeviceGetMemoryInfo", "GPU_IS_LOST"): 1}
    series = scrape(Metrics(lambda: None, lambda: counts))
    got = {tuple(sorted(dict(k).items())): v for k, v in values(series, "reclaimer_nvml_errors_total").items()}
    assert got == {
        (("code", "NOT_SUPPORTED"), ("function", "nvmlDeviceGetUtilizationRates")): 4.0,
        (("code", "GPU_IS_LOST"), ("function", "nvmlDeviceGetMemoryInfo")): 1.0,
    }


@pytest.mark.parametrize(
    "counts",
    [
        pytest.param(lambda: {("only-one-part",): 1, ("f", "CODE"): 2}, id="malformed-key-skipped"),
        pytest.param(lambda: 1 / 0, id="raising-callable"),
    ],
)
def test_bad_nvml_counts_never_break_the_scrape(counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
    with capture_logs():
        series = scrape(Metrics(lambda: None, counts))
    assert set(values(series, "reclaimer_nvml_errors_total").values()) <= {2.0}
    assert len(values(series, "reclaimer_build_info")) == 1


# --------------------------------------------------------------------------- the daemon's counters


def test_actions_total_starts_at_zero_for_every_bounded_combination() -> None:
    series = scrape(Metrics(lambda: None))
    actions = values(series, "reclaimer_actions_total")
    assert len(actions) == len(ACTIONS) * len(RESULTS) * len(MODES)
    assert set(actions.values()) == {0.0}


def _outcome(result: str, mode: str = "enforce", reclaimed: int = 0, action: ActionKind = ActionKind.EVICT_POD):
    b = SnapshotBuilder()
    g = b.gpu(0)
    d = b.kernel(None, {g: []}, Verdict.RECLAIM, namespace="a", pod="p", action=action, allocated=True)
    return ActionResult(d, result, "detail", reclaimed, mode)


def test_record_action_counts_results_and_verified_memory() -> None:
    metrics = Metrics(lambda: None)
    metrics.record_action(_outcome("success"))
    metrics.record_action(_outcome("verified", reclaimed=3 * GIB))
    metrics.record_action(_outcome("success", reclaimed=5 * GIB))  # not verified yet: not reclaimed
    metrics.record_action(_outcome("dry-run", mode="dry-run"))
    series = scrape(metrics)
    assert one(series, "reclaimer_actions_total", action="evict-pod", result="success", mode="enforce") == 2.0
    assert one(series, "reclaimer_actions_total", action="evict-pod", result="verified", mode="enforce") == 1.0
    assert one(series, "reclaimer_actions_total", action="evict-pod", result="dry-run", mode="dry-run") == 1.0
    assert one(series, "reclaimer_reclaimed_gpu_memory_bytes_total") == 3 * GIB


def test_label_values_outside_the_bounded_sets_become_other() -> None:
    metrics = Metrics(lambda: None)
    with capture_logs() as logs:
        metrics.record_action(_outcome("exploded: pod default/x 10.0.0.1"))
        metrics.record_action(_outcome("success", action=ActionKind.NONE))
    series = scrape(metrics)
    assert one(series, "reclaimer_actions_total", action="evict-pod", result="other", mode="enforce") == 1.0
    assert one(series, "reclaimer_actions_total", action="other", result="success", mode="enforce") == 1.0
    assert {e["label"] for e in logs} == {"result", "action"}


def test_add_held_idle_feeds_the_waste_counter() -> None:
    metrics = Metrics(lambda: None)
    metrics.add_held_idle({"ml-team": 12.5, "-": 3.0, "empty": 0.0})
    metrics.add_held_idle({"ml-team": 2.5})
    series = scrape(metrics)
    held = {dict(k)["namespace"]: v for k, v in values(series, "reclaimer_gpu_held_idle_seconds_total").items()}
    assert held == {"ml-team": 15.0, "-": 3.0}


def test_histograms_have_millisecond_buckets() -> None:
    metrics = Metrics(lambda: None)
    metrics.decide_duration_seconds.observe(0.0007)
    metrics.sample_duration_seconds.observe(0.003)
    metrics.gateway_request_duration_seconds.labels("eg").observe(0.2)
    series = scrape(metrics)
    assert 0.001 in FAST_BUCKETS and 0.0005 in FAST_BUCKETS
    assert one(series, "reclaimer_decide_duration_seconds_bucket", le="0.001") == 1.0
    assert one(series, "reclaimer_sample_duration_seconds_bucket", le="0.0025") == 0.0
    assert one(series, "reclaimer_gateway_request_duration_seconds_count", gateway="eg") == 1.0


# --------------------------------------------------------------------------- conventions


def test_own_registry_never_the_global_one() -> None:
    snap = node_snapshot()
    first, second = Metrics(lambda: snap), Metrics(lambda: snap)  # a second instance must not collide
    assert first.registry is not second.registry is not REGISTRY
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("reclaimer_")]


def test_naming_conventions() -> None:
    metrics = Metrics(lambda: node_snapshot(), lambda: {("f", "C"): 1})
    metrics.add_held_idle({"a": 1.0})
    body = metrics.render()[0].decode()
    for family in text_string_to_metric_families(body):
        assert family.name.startswith("reclaimer_")
        is_counter = family.type == "counter"
        assert family.name.endswith("_total") is False  # the parser strips _total from counter family names
        for s in family.samples:
            assert "node" not in s.labels and "instance" not in s.labels
            if s.name.endswith("_total"):
                assert is_counter, s.name
            if s.name.endswith("_ratio"):
                assert 0.0 <= s.value <= 1.0
        assert not re.search(r"percent|_ms$|milliseconds", family.name)


def test_non_finite_values_have_no_series() -> None:
    b = SnapshotBuilder()
    g = b.gpu(0, utilization=float("nan"), idle_seconds=float("inf"))
    b.kernel(K_ALICE, {g: [(1, GIB, float("nan"))]}, Verdict.KEEP, idle_seconds=float("nan"))
    snap = b.build()
    series = scrape(Metrics(lambda: snap))
    for name in ("reclaimer_gpu_utilization_ratio", "reclaimer_gpu_idle_seconds", "reclaimer_kernel_idle_seconds",
                 "reclaimer_kernel_gpu_utilization_ratio"):  # fmt: skip
        assert values(series, name) == {}, name


def test_snapshot_series_are_rendered_once_per_snapshot() -> None:
    """A scrape reuses the text rendered for the current snapshot; a new snapshot is rendered afresh."""
    b = SnapshotBuilder()
    b.gpu(0)
    first, second = b.build(), b.build()
    current = [first]
    metrics = Metrics(lambda: current[0])
    metrics.prepare()
    calls = []
    original = metrics.collector.collect
    metrics.collector.collect = lambda: (calls.append(1), (yield from original()))[1]  # type: ignore[method-assign]
    metrics.render()
    metrics.render()
    assert calls == []  # prepared: scrapes only concatenate
    current[0] = second
    text = metrics.render()[0].decode()
    assert calls == [1] and "reclaimer_gpu_info" in text
    metrics.actions_total.labels("evict-pod", "success", "enforce").inc()
    assert 'reclaimer_actions_total{action="evict-pod",mode="enforce",result="success"} 1.0' in \
        metrics.render()[0].decode()  # live counters are never cached


def test_item4_namespace_series_stay_bounded_by_the_namespaces_holding_gpus() -> None:
    """A new namespace every cycle for a simulated week: the waste counter keeps children only for namespaces that
    held a GPU within the last hour; a namespace still holding one keeps its series and its count."""
    m = Metrics(lambda: None)
    now = 1_000_000.0
    for cycle in range(7 * 24 * 4):  # a week of 15-minute steps, one fresh namespace each
        live = {"steady", f"user-{cycle}"}
        m.add_held_idle({ns: 15.0 for ns in live})
        m.forget_quiet_namespaces(live, now)
        assert m.tracked()["namespace_children"] <= 2 + 4  # live now, plus the last hour's (4 steps)
        now += 900
    body = m.render()[0].decode()
    assert 'reclaimer_gpu_held_idle_seconds_total{namespace="steady"} 10080.0' in body
    assert 'namespace="user-0"' not in body and f'namespace="user-{7 * 24 * 4 - 1}"' in body
    assert m.tracked()["namespaces_seen"] <= 6


def test_invariant_18_breaker_state_and_trips_in_metrics() -> None:
    snap = node_snapshot()
    metrics = Metrics(lambda: snap)
    series = scrape(metrics)
    assert one(series, "reclaimer_breaker_tripped") == 1.0
    assert values(series, "reclaimer_breaker_trips_total") == {
        frozenset({("cause", "mass-flip")}): 0.0, frozenset({("cause", "sustained")}): 0.0,
    }  # fmt: skip
    metrics.record_breaker_trip(snap.breaker)
    metrics.record_breaker_trip(dataclasses.replace(snap.breaker, cause="no-such-cause"))  # bounded: "other"
    series = scrape(metrics)
    assert one(series, "reclaimer_breaker_trips_total", cause="sustained") == 1.0
    assert one(series, "reclaimer_breaker_trips_total", cause="other") == 1.0
    calm = dataclasses.replace(snap, breaker=BreakerStatus())
    assert one(scrape(Metrics(lambda: calm)), "reclaimer_breaker_tripped") == 0.0
