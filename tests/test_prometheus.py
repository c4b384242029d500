"""The real Prometheus scrapes a real reclaimer HTTP server; every dashboard query and alert rule is evaluated."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from reclaimer.export.metrics import BREAKER_CAUSES, RESULTS, Metrics
from reclaimer.core.model import ActionResult, CycleSnapshot
from reclaimer.core.views import allocation_holdings, held_idle_increments
from reclaimer.export.server import make_app
from reclaimer.observe.stall import STAGES
from tests.support.export_fixtures import GIB, K_ALICE, node_snapshot, serve_in_thread
from tests.support.prometheus_fixtures import (
    NODE,
    PrometheusServer,
    http_get,
    poll_until,
    promtool,
    running_prometheus,
    wait_for_target_up,
)
from tests.support.e2e import e2e_fixture

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards/gpu-reclaimer.json"
ALERTS = ROOT / "deploy/monitoring/alerts.yaml"

# Grafana's variables as a 1-hour dashboard at 1 s resolution would expand them.
GRAFANA_VARS = {"__rate_interval": "1m", "__range": "1h", "__interval": "1s", "__interval_ms": "1000",
                "node": ".*", "namespace": ".*", "gateway": ".*", "user": ".*", "cost_per_gpu_hour": "2.5"}  # fmt: skip
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")

pytestmark = pytest.mark.timeout(90)


def expand(expr: str) -> str:
    """Substitute Grafana variables; an unknown one fails (add it to GRAFANA_VARS)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARS[name]

    return _VAR.sub(sub, expr)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every target of every panel, rows included."""
    dash = json.loads(DASHBOARD.read_text())
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in _panels(dash["panels"])
        for t in p.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


A100, H100, T4 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "Tesla T4"
# What each panel shows for node_snapshot(): (label, the label values expected) or a single expected value.
PANEL_EXPECTATIONS: dict[str, tuple[str, set[str]] | float] = {
    # Memory held idle: the idle kernels' namespace; research's train-x holds a GPU allocation and no memory.
    "GPU-hours held idle by namespace / A": ("namespace", {"ml-team"}),
    "GPU-hours held idle by namespace / B": ("namespace", {"research"}),  # allocation held idle (invariant 17)
    "GPU-hours held idle by user / A": ("user", {"alice", "bob", "carol", "dave"}),  # erin: unknown, no series
    "GPU-hours held idle by gateway / A": ("gateway", {"eg", "lab", ""}),  # "": the pod without a kernel
    "GPU-hours held idle by GPU model / A": ("model", {A100, H100, T4}),
    "Idle GPUs now / A": 3.0,  # alice's, bob's and the allocated T4; erin's MIG GPU is unknown, not idle
    "Cost of GPUs held idle by namespace / A": ("namespace", {"research"}),  # allocation x $/GPU-hour
    "Cost of GPUs held idle by namespace / B": ("namespace", {"ml-team"}),  # memory x $/GPU-hour
    "GPUs held idle over time by namespace / A": ("namespace", {"ml-team"}),
    "GPUs held idle over time by namespace / B": ("namespace", {"research"}),
    "Reclaim actions by result / A": ("result", set(RESULTS)),  # pre-initialised at 0
    "Upcoming reclaims / A": ("pod", {"jupyter-alice", "jupyter-bob", "train-x"}),
    # The fixture node runs dry-run and alice's kernel is 'reclaim': enforce would have given her GPU back.
    "What enforce would have reclaimed (dry-run nodes) / A": ("Hostname", {NODE}),
    "Kernels by verdict / A": ("verdict", {"keep", "warn", "reclaim", "exempt", "unknown"}),
    "GPU memory reclaimed / A": ("__name__", {""}),
    "GPU allocations released / A": ("__name__", {""}),
    "Circuit breaker tripped / A": 1.0,
    "Breaker trips by cause / A": ("cause", set(BREAKER_CAUSES)),  # pre-initialised at 0
    "GPU utilization / A": ("gpu", {"0", "1", "2", "3"}),  # 4: MIG, unknown; 5: lost
    "GPU memory used / A": ("gpu", {"0", "1", "2", "3", "4"}),
    "Gateway up / A": ("gateway", {"eg", "lab"}),  # "new" was never contacted: unknown, no series
    "NVML errors / A": ("code", {"GPU_IS_LOST", "NOT_SUPPORTED"}),
    "Sample duration p99 / A": ("__name__", {""}),
    "Sample duration p99 / B": ("__name__", {""}),
    "Gateway request duration p99 / A": ("gateway", {"eg"}),
    "Seconds since last GPU sample / A": ("Hostname", {NODE}),  # the shipped relabelling's node label
    "Stalled calls / A": ("stage", set(STAGES)),  # 0 per stage while nothing is stalled
    "Calls that outlived their timeout / A": ("stage", set(STAGES)),
}
# What each dashboard variable lists for the fixture node.
VARIABLE_VALUES = {"node": {NODE}, "namespace": {"ml-team", "research", "-"}, "gateway": {"eg", "lab", ""},
                   "user": {"alice", "bob", "carol", "dave", "erin"}}
# Alerts the fixture node must trip (label, value), and those it must not.
FIRING: dict[str, tuple[str, str]] = {
    "SamplerStalled": ("job", "gpu-reclaimer"),
    "GatewayDown": ("gateway", "lab"),
    "GPULost": ("gpu", "5"),
    "NVMLErrors": ("code", "GPU_IS_LOST"),
    "ActionsFailing": ("action", "shutdown-kernel"),
    "HighGPUWaste": ("namespace", "ml-team"),
    "ReclaimerBreakerTripped": ("job", "gpu-reclaimer"),
}
SILENT = {"ReclaimerDown", "ReclaimerAbsent", "DecideLoopStalled", "MetricsCollectErrors", "ReclaimerCallStalled",
          "GPUKernelAboutToBeReclaimed"}  # the fixture node runs dry-run; alerts.test.yaml makes it fire


@dataclass
class FixedView:
    snap: CycleSnapshot

    def snapshot(self) -> CycleSnapshot | None:
        return self.snap

    def health(self, now: float) -> tuple[bool, str]:
        return True, "ok"

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
        return True, {"sampler": "ok"}


@dataclass
class Stack:
    prom: PrometheusServer
    base_url: str
    metrics: Metrics


@pytest.fixture(scope="module")
@e2e_fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    now = time.time()
    snap = node_snapshot(now=now, last_sample_at=now - 600)  # a sampler stalled 10 minutes ago
    lost_gpu_errors = {"n": 0}

    def nvml_counts() -> dict[tuple[str, str], int]:
        lost_gpu_errors["n"] += 1  # the lost GPU fails every sample
        return {("nvmlDeviceGetMemoryInfo", "GPU_IS_LOST"): lost_gpu_errors["n"],
                ("nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED"): 7}  # fmt: skip

    metrics = Metrics(lambda: snap, nvml_counts)
    metrics.add_held_idle(held_idle_increments(None, snap, lambda d: 0.05),
                          held_idle_increments(None, snap, lambda d: 0.05, allocation_holdings))
    for seconds in (0.0004, 0.002, 0.003):
        metrics.sample_duration_seconds.observe(seconds)
        metrics.decide_duration_seconds.observe(seconds * 10)
    metrics.gateway_request_duration_seconds.labels("eg").observe(0.04)
    with serve_in_thread(make_app(FixedView(snap), metrics)) as base_url:
        target = base_url.removeprefix("http://")
        with running_prometheus(tmp_path_factory.mktemp("prometheus"), [target], [ALERTS]) as prom:
            wait_for_target_up(prom)
            # Counters move only after Prometheus has seen them once, so increase() sees the change.
            failed = next(d for d in snap.decisions if d.candidate.kernel_id == K_ALICE)
            for _ in range(5):
                metrics.record_action(ActionResult(failed, "failed", "eviction refused", 0, "enforce"))
            metrics.record_action(ActionResult(failed, "verified", "GPU memory released", 20 * GIB, "enforce"))
            metrics.add_held_idle({"ml-team": 50_000.0}, {"research": 7_200.0})
            train = next(d for d in snap.decisions if d.candidate.kernel_id is None)
            metrics.record_action(ActionResult(train, "released", "pod gone", mode="enforce", released_gpus=1))
            for seconds in (0.001, 0.004):
                metrics.sample_duration_seconds.observe(seconds)
                metrics.decide_duration_seconds.observe(seconds)
            metrics.gateway_request_duration_seconds.labels("eg").observe(0.2)
            yield Stack(prom, base_url, metrics)


def _result(prom: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    answer = prom.query(expr)
    assert answer["status"] == "success", f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}"
    return answer["data"]["result"]


def _label_values(result: list[dict[str, Any]], label: str) -> set[str]:
    return {r["metric"].get(label, "") for r in result}


@pytest.mark.parametrize("title,expr", [pytest.param(t, e, id=t) for t, e in dashboard_queries()])
def test_dashboard_query_returns_the_fixture_data(stack: Stack, title: str, expr: str) -> None:
    assert title in PANEL_EXPECTATIONS, f"add the expected data of panel {title!r} to PANEL_EXPECTATIONS"
    expected = PANEL_EXPECTATIONS[title]
    query = expand(expr)
    if isinstance(expected, float):
        result = poll_until(f"{title} to have data", lambda: _result(stack.prom, query), timeout=20)
        assert [float(r["value"][1]) for r in result] == [expected]
        return
    label, values = expected

    def probe() -> list[dict[str, Any]] | None:
        result = _result(stack.prom, query)
        return result if _label_values(result, label) == values else None

    poll_until(f"{title}: {label} values {sorted(values)}", probe, timeout=20)


def test_dashboard_has_the_panels_sres_asked_for() -> None:
    titles = {t.split(" / ")[0] for t, _ in dashboard_queries()}
    for wanted in ("GPU-hours held idle by namespace", "GPU-hours held idle by user", "GPU-hours held idle by gateway",
                   "GPU-hours held idle by GPU model", "Idle GPUs now", "Reclaim actions by result",
                   "Upcoming reclaims", "Gateway up", "NVML errors", "Sample duration p99",
                   "Cost of GPUs held idle by namespace", "What enforce would have reclaimed (dry-run nodes)",
                   "GPU allocations released", "Circuit breaker tripped"):  # fmt: skip
        assert wanted in titles


def test_dashboard_variable_queries_find_values(stack: Stack) -> None:
    dash = json.loads(DASHBOARD.read_text())
    queries = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in queries} == set(VARIABLE_VALUES)
    for var in queries:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, f"variable {var['name']}: unsupported query {var['query']['query']!r}"
        metric, label = m.groups()
        result = _result(stack.prom, f"group by ({label}) ({metric})")
        assert _label_values(result, label) == VARIABLE_VALUES[var["name"]], var["name"]


@pytest.mark.parametrize("rule", [pytest.param(r, id=r["alert"]) for r in alert_rules()])
def test_alert_rule_evaluates_against_the_fixture(stack: Stack, rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert name in FIRING or name in SILENT, f"add alert {name} to FIRING or SILENT"
    if name in SILENT:
        assert _result(stack.prom, rule["expr"]) == []
        return
    label, value = FIRING[name]
    result = poll_until(f"{name} to fire", lambda: _result(stack.prom, rule["expr"]), timeout=20)
    assert {r["metric"].get(label) for r in result} == {value}


def test_prometheus_loads_the_rules_and_raises_the_expected_alerts(stack: Stack) -> None:
    def active() -> set[str] | None:
        rules = [r for g in stack.prom.api("rules")["data"]["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert all(r["health"] in ("ok", "unknown") for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        names = {a["labels"]["alertname"] for a in stack.prom.api("alerts")["data"]["alerts"]}
        return names if set(FIRING) <= names else None

    names = poll_until("the fixture's alerts to be pending or firing", active, timeout=20)
    assert not names & SILENT


def test_every_metric_the_queries_use_is_exported(stack: Stack) -> None:
    _status, body = http_get(f"{stack.base_url}/metrics")
    exported = set(re.findall(r"^(reclaimer_\w+)", body.decode(), re.M))
    exprs = [e for _, e in dashboard_queries()] + [r["expr"] for r in alert_rules()]
    used = {name for e in exprs for name in re.findall(r"\breclaimer_\w+", e)}
    assert used and used <= exported, sorted(used - exported)


@pytest.mark.e2e
def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


@pytest.mark.e2e
def test_promtool_lints_a_real_scrape_clean(stack: Stack) -> None:
    status, body = http_get(f"{stack.base_url}/metrics")
    assert status == 200
    done = promtool("check", "metrics", stdin=body)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


@pytest.mark.e2e
def test_promtool_lint_does_flag_a_bad_exposition() -> None:
    # The lint above could pass vacuously; show it rejects what we must never export.
    bad = b"# HELP reclaimer_actions Actions.\n# TYPE reclaimer_actions counter\nreclaimer_actions 1\n"
    done = promtool("check", "metrics", stdin=bad)
    assert done.returncode != 0 and "_total" in done.stdout + done.stderr



def test_invariant_17_both_kinds_of_waste_and_released_gpus_are_queryable(stack: Stack) -> None:
    """Memory held idle and allocation held idle are separate series; released allocations are counted on their own."""

    def by_namespace(metric: str) -> dict[str, float] | None:
        result = _result(stack.prom, f"sum by (namespace) ({metric})")
        return {r["metric"]["namespace"]: float(r["value"][1]) for r in result} or None

    def scraped_after_the_updates() -> dict[str, float] | None:
        got = by_namespace("reclaimer_gpu_allocation_held_idle_seconds_total")
        return got if got and got.get("research", 0) >= 7_200 else None

    allocation = poll_until("allocation held idle after the update", scraped_after_the_updates, timeout=20)
    assert set(allocation) == {"research"}
    memory = by_namespace("reclaimer_gpu_held_idle_seconds_total")
    assert memory is not None and "research" not in memory and memory["ml-team"] > 0
    released = poll_until("a released GPU", lambda: [r for r in _result(stack.prom, "reclaimer_released_gpus_total")
                                                     if float(r["value"][1]) == 1.0], timeout=20)
    assert len(released) == 1
    memory_bytes = _result(stack.prom, "reclaimer_reclaimed_gpu_memory_bytes_total")
    assert [float(r["value"][1]) for r in memory_bytes] == [20 * GIB]  # the two releases are counted apart
