"""Generate the monitoring objects that must not drift from their sources:

- deploy/monitoring/prometheusrule.yaml: the Prometheus Operator PrometheusRule, from deploy/monitoring/alerts.yaml
- dashboards/gpu-reclaimer.json: the Grafana dashboard, from dashboards/gpu_reclaimer.py (grafana-foundation-sdk)

    python3 scripts/generate_monitoring.py           # rewrite both
    python3 scripts/generate_monitoring.py --check   # exit 1 naming what differs (tests/test_alert_rules.py, ...)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = ROOT / "dashboards" / "gpu-reclaimer.json"

_HEADER = """# GENERATED from alerts.yaml by scripts/generate_monitoring.py: edit alerts.yaml, then run the script.
# The Prometheus Operator form of the same rules (kubectl apply -k deploy/monitoring).
"""


class _Literal(str):
    pass


def _literal_representer(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


def _blocks(node: object) -> object:
    """Multi-line strings (the PromQL expressions) as YAML literal blocks, readable in review."""
    if isinstance(node, dict):
        return {k: _blocks(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_blocks(v) for v in node]
    if isinstance(node, str) and "\n" in node:
        return _Literal(node)
    return node


def prometheus_rule() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "gpu-reclaimer", "namespace": "gpu-reclaimer",
                     "labels": {"app.kubernetes.io/name": "gpu-reclaimer"}},
        "spec": {"groups": groups},
    }
    dumper = yaml.SafeDumper
    dumper.add_representer(_Literal, _literal_representer)
    return _HEADER + yaml.dump(_blocks(obj), Dumper=dumper, sort_keys=False, width=100_000, allow_unicode=True)


def dashboard() -> str:
    sys.path.insert(0, str(ROOT))
    from dashboards.gpu_reclaimer import render

    return render()


OUTPUTS: dict[Path, Callable[[], str]] = {PROMETHEUS_RULE: prometheus_rule, DASHBOARD: dashboard}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if any differs")
    parser.add_argument("--only", choices=["rules", "dashboard"], help="just one of the outputs")
    args = parser.parse_args(argv)
    stale = []
    for path, make in OUTPUTS.items():
        if args.only and (args.only == "rules") != (path == PROMETHEUS_RULE):
            continue
        text = make()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python3 scripts/generate_monitoring.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
