"""The report's JSON and tables are pinned: the same snapshots render exactly what main rendered before the report
became one typed model (tests/golden/report/, captured at b75c1dc). Field names, their order, JSON types (1 vs
1.0), nulls and absent fields must all match; so must every table line.

Regenerate only for an intended change of the report: ``python -m tests.test_report_golden --write``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from reclaimer.export.report import build_report, merge_reports, render_json, report_from_json
from reclaimer.export.table import render_cluster_table, render_table
from tests.support.export_fixtures import NOW, SnapshotBuilder, node_snapshot

GOLDEN = Path(__file__).parent / "golden" / "report"

# Fields a daemon from before round 2 did not send; its report still renders, re-emitted without them.
OLDER_KERNEL_FIELDS = ("recovers", "allocated_gpus", "shared_gpu", "allocated", "key", "policy")
OLDER_TOP_FIELDS = ("breaker", "halted", "credentials", "unattributed", "summary", "observed_at", "last_sample_at")


def _snapshots() -> dict[str, Any]:
    halted = dataclasses.replace(
        node_snapshot(),
        mode="enforce",
        credentials={"hub": "HTTP 403: token refused — rotate it", "kubernetes": None, "gateway:eg": None},
    )
    empty = SnapshotBuilder(node="gpu-node-2", mode="enforce")
    empty.gpu(0, utilization=0.0, memory_used=0, processes=(), idle_seconds=None)
    return {"node": node_snapshot(), "halted": halted, "empty": empty.build()}


def _older(report: dict[str, Any]) -> dict[str, Any]:
    old = copy.deepcopy(report)
    for key in OLDER_TOP_FIELDS:
        old.pop(key, None)
    for k in old["kernels"]:
        for key in OLDER_KERNEL_FIELDS:
            k.pop(key, None)
    for g in old["gpus"]:
        g.pop("up", None)
        g.pop("idle_seconds", None)
    return old


def render_all() -> dict[str, str]:
    """Every pinned output, by file name."""
    out: dict[str, str] = {}
    payloads: dict[str, Any] = {}
    for name, snap in _snapshots().items():
        report = build_report(snap)
        text = render_json(report)
        payloads[name] = json.loads(text)
        out[f"{name}.json"] = text
        out[f"{name}.table.txt"] = render_table(report)
        out[f"{name}.table80.txt"] = render_table(report, width=80)
    older = report_from_json(_older(payloads["node"]))
    out["older.json"] = render_json(older)
    out["older.table.txt"] = render_table(older)
    newer = copy.deepcopy(payloads["node"])  # a daemon from after this one: fields it adds pass through
    newer["kernels"][0]["added_later"] = {"by": "a newer daemon", "n": 1.5}
    newer["added_later"] = [1, None]
    out["newer.json"] = render_json(report_from_json(newer))
    second = dict(payloads["empty"], node="gpu-node-2")
    merged = merge_reports(
        [report_from_json(second), report_from_json(payloads["halted"])],
        [{"node": "gpu-node-3", "pod": "reclaimer-abcde", "reason": "HTTP 503 from the pod proxy"}],
        NOW + 5,
        notes=["cannot list nodes: forbidden"],
    )
    out["cluster.json"] = render_json(merged)
    out["cluster.table.txt"] = render_cluster_table(merged)
    out["cluster.table80.txt"] = render_cluster_table(merged, width=80)
    return out


def _ordered(text: str) -> Any:
    # Pairs, not dicts: the order of fields counts; json keeps 1 and 1.0 apart (int vs float) and null as None.
    return json.loads(text, object_pairs_hook=lambda pairs: [(k, v) for k, v in pairs])


def _cases() -> list[str]:
    return sorted(p.name for p in GOLDEN.iterdir()) if GOLDEN.is_dir() else []


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return render_all()


def test_every_output_is_pinned(rendered: dict[str, str]) -> None:
    assert sorted(rendered) == _cases()


@pytest.mark.parametrize("name", _cases())
def test_output_matches_the_golden_file(rendered: dict[str, str], name: str) -> None:
    golden = (GOLDEN / name).read_text(encoding="utf-8")
    if name.endswith(".json"):  # the same document (a readable diff), then the same text
        assert _ordered(rendered[name]) == _ordered(golden)
        assert _types(_ordered(rendered[name])) == _types(_ordered(golden))
    assert rendered[name].splitlines() == golden.splitlines()


def _types(value: Any) -> Any:
    # bool == 1 and 1 == 1.0 in Python: compare the JSON types themselves too.
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, tuple):
        return (value[0], _types(value[1]))
    return type(value).__name__


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (GOLDEN / name).write_text(text + "\n", encoding="utf-8")
