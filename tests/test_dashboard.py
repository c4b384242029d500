"""dashboards/: the committed Grafana JSON is what the code in dashboards/gpu_reclaimer.py generates (a hand edit
fails here), and it follows the conventions SREs wire it in by. Every query runs against a real Prometheus in
tests/test_prometheus.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "gpu-reclaimer.json"


def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in board()["panels"] for t in p.get("targets", [])]


@pytest.mark.e2e
def test_committed_json_is_what_the_generator_writes() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_monitoring.py"), "--check", "--only",
                           "dashboard"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_check_catches_a_hand_edit(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from dashboards.gpu_reclaimer import render

    edited = board()
    edited["panels"][1]["title"] += " (edited by hand)"
    assert render() != json.dumps(edited, indent=2, sort_keys=True) + "\n"
    assert render() == DASHBOARD.read_text()


def test_datasource_variable_and_every_query_uses_it() -> None:
    variables = {v["name"]: v for v in board()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for title, t in targets():
        assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
    for name in ("node", "namespace", "gateway", "user"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_node_namespace_gateway_user_variables_filter_the_queries() -> None:
    variables = {v["name"]: v for v in board()["templating"]["list"]}
    exprs = " ".join(t["expr"] for _, t in targets())
    for name, label in (("node", "Hostname"), ("namespace", "namespace"), ("gateway", "gateway"), ("user", "user")):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
        assert f'{label}=~"${name}"' in exprs, f"no query filters on ${name}"
    # dcgm-exporter's name for the node, so its series and ours join on (Hostname, gpu).
    assert variables["node"]["query"]["query"] == "label_values(reclaimer_build_info, Hostname)"
    # Every query filters on the node (dcgm-exporter's dashboards filter every panel on the host).
    for title, t in targets():
        assert 'Hostname=~"$node"' in t["expr"], title


def test_cost_variable_prices_the_idle_gpu_hours() -> None:
    cost = next(v for v in board()["templating"]["list"] if v["name"] == "cost_per_gpu_hour")
    assert cost["type"] == "textbox" and float(cost["query"]) > 0
    priced = [(title, t) for title, t in targets() if "$cost_per_gpu_hour" in t["expr"]]
    assert {title for title, _ in priced} == {"Cost of GPUs held idle by namespace"}
    assert {p["fieldConfig"]["defaults"]["unit"] for p in board()["panels"]
            if p["title"] == "Cost of GPUs held idle by namespace"} == {"currencyUSD"}


def test_allocation_and_memory_held_idle_are_separate_series() -> None:
    for title in ("GPU-hours held idle by namespace", "Cost of GPUs held idle by namespace",
                  "GPUs held idle over time by namespace"):
        exprs = [t["expr"] for panel, t in targets() if panel == title]
        assert len(exprs) == 2, title
        alloc = [e for e in exprs if "reclaimer_gpu_allocation_held_idle_seconds_total" in e]
        memory = [e for e in exprs if re.search(r"reclaimer_gpu_held_idle_seconds_total", e)]
        assert len(alloc) == 1 and len(memory) == 1, title


def test_what_enforce_would_have_reclaimed_counts_dry_run_nodes_only() -> None:
    (expr,) = [t["expr"] for title, t in targets() if title == "What enforce would have reclaimed (dry-run nodes)"]
    assert 'reclaimer_mode{mode="dry-run"} == 1' in expr and 'verdict="reclaim"' in expr


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = board()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)

    def cells(p: dict[str, Any]) -> set[tuple[int, int]]:
        g = p["gridPos"]
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    for a, b in combinations(panels, 2):
        assert not cells(a) & cells(b), (a["title"], b["title"])
        assert a["gridPos"]["x"] + a["gridPos"]["w"] <= 24
