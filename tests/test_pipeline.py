"""The named parts the decide cycle (app.pipeline) is built from: the threshold lookup and the export accounting."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reclaimer.core.config import parse_settings
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult
from reclaimer.core.policy import gpu_idle_by_device, gpu_idle_seconds, idle_threshold
from reclaimer.export.accounting import ExportAccounting
from reclaimer.export.metrics import Metrics
from tests.support.export_fixtures import GIB, K_ALICE, NOW, SnapshotBuilder

SETTINGS = parse_settings("""
policies:
  - {name: strict, match: {namespaces: [a]}, gpu_idle_below: 0.05, action: shutdown-kernel}
  - {name: loose, gpu_idle_below: 0.2, action: shutdown-kernel}
""")


@pytest.mark.parametrize(
    "name,expected",
    [
        pytest.param("strict", 0.05, id="named-policy"),
        pytest.param("loose", 0.2, id="another-named-policy"),
        pytest.param("renamed-since", 0.2, id="unknown-name-is-the-last-policy"),
        pytest.param(None, 0.2, id="no-policy-is-the-last-policy"),
    ],
)
def test_idle_threshold(name: str | None, expected: float) -> None:
    assert idle_threshold(SETTINGS, name) == expected


def _node(utilization: float, policy: str, history: int = 10, now: float = NOW) -> tuple[SnapshotBuilder, str, str]:
    """GPU 0 held by a kernel under ``policy``; GPU 1 held by nobody; both at ``utilization`` throughout."""
    b = SnapshotBuilder(now=now, history=history)
    held = b.gpu(0, utilization=utilization, memory_used=GIB)
    free = b.gpu(1, utilization=utilization)
    d = b.kernel(K_ALICE, {held: [(101, GIB, utilization)]}, Verdict.KEEP, namespace="ml-team", pod="p")
    b.decisions[-1] = dataclasses.replace(d, policy=policy)
    return b, held, free


def test_gpu_idle_by_device_uses_the_threshold_of_the_holders_policy() -> None:
    b, held, free = _node(0.1, "loose")
    snap = b.build()
    got = gpu_idle_by_device(snap.sampler, snap.decisions, SETTINGS, NOW)
    # 10% is idle under the holder's policy (below 20%); a GPU nobody holds is judged by the lowest threshold (5%).
    assert got[held] == gpu_idle_seconds(snap.sampler.samples[held], 0.2, NOW, NOW - 3600, 1.0) == 9.0
    assert got[free] == 0.0


def test_gpu_idle_by_device_a_strict_holder_sees_the_same_gpu_busy() -> None:
    b, held, _ = _node(0.1, "strict")
    snap = b.build()
    assert gpu_idle_by_device(snap.sampler, snap.decisions, SETTINGS, NOW)[held] == 0.0


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def one(series: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


def _held(metrics: Metrics) -> float | None:
    return one(scrape(metrics), "reclaimer_gpu_held_idle_seconds_total", namespace="ml-team")


def test_export_accounting_counts_each_sample_once_under_the_holders_threshold() -> None:
    metrics = Metrics(lambda: None)
    accounting = ExportAccounting(metrics, SETTINGS)
    first = _node(0.1, "loose")[0].build()
    accounting.record(first, [])
    assert _held(metrics) == 10.0  # the first cycle: every sample held so far
    accounting.record(first, [])
    assert _held(metrics) == 10.0  # the same samples again: nothing new
    later = _node(0.1, "loose", history=15, now=NOW + 5)[0].build()
    accounting.record(later, [])
    assert _held(metrics) == 15.0  # only the 5 samples since the previous cycle
    assert accounting.previous_at == NOW + 5


def test_export_accounting_counts_nothing_a_strict_policy_calls_busy_and_records_actions() -> None:
    metrics = Metrics(lambda: None)
    accounting = ExportAccounting(metrics, SETTINGS)
    snap = _node(0.1, "strict")[0].build()
    acted = dataclasses.replace(snap.decisions[0], verdict=Verdict.RECLAIM, action=ActionKind.SHUTDOWN_KERNEL)
    accounting.record(snap, [ActionResult(acted, "success", mode="enforce")])
    series = scrape(metrics)
    assert one(series, "reclaimer_gpu_held_idle_seconds_total", namespace="ml-team") is None
    assert one(series, "reclaimer_actions_total", action="shutdown-kernel", result="success", mode="enforce") == 1.0
