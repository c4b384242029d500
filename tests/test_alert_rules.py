"""deploy/monitoring: the alert rules' promtool unit tests (each alert fires on a crafted series and stays quiet on a
healthy one, and each test can fail), the PrometheusRule generated from the plain rules, the ServiceMonitor and the
plain scrape config. The Prometheus Operator CRDs are not in kubernetes-validate's schemas: their shape is checked
here field by field against what the operator reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prometheus_fixtures import JOB, promtool

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts.test.yaml"
KUBECTL = shutil.which("kubectl")


def alert_names(rules_text: str | None = None) -> list[str]:
    doc = yaml.safe_load(rules_text if rules_text is not None else ALERTS.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


def _cases() -> dict[str, dict[str, int]]:
    """alertname -> how many firing and quiet checks alerts.test.yaml has for it."""
    cases: dict[str, dict[str, int]] = {}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            seen = cases.setdefault(check["alertname"], {"fires": 0, "quiet": 0})
            seen["fires" if check.get("exp_alerts") else "quiet"] += 1
    return cases


def _run_tests(rules_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "alerts.yaml").write_text(rules_text)
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yaml")
    return promtool("test", "rules", str(tmp_path / "alerts.test.yaml"))


@pytest.mark.e2e
def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@pytest.mark.e2e
def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("alert", alert_names())
def test_each_alert_has_a_firing_and_a_quiet_case(alert: str) -> None:
    seen = _cases().get(alert, {"fires": 0, "quiet": 0})
    assert seen["fires"] >= 1, f"{alert}: add a promtool case in {ALERT_TESTS.name} where it fires"
    assert seen["quiet"] >= 1, f"{alert}: add a promtool case in {ALERT_TESTS.name} where it stays quiet"


def _with_expr(alert: str, expr: str) -> str:
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = expr
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize("alert", alert_names())
@pytest.mark.parametrize(("mutation", "expr"), [("never-fires", "vector(1) == 0"), ("always-fires", "vector(1)")])
@pytest.mark.e2e
def test_the_unit_tests_catch_a_broken_rule(alert: str, mutation: str, expr: str, tmp_path: Path) -> None:
    """Each alert's cases fail if the rule never fires or always fires: the tests above can fail."""
    done = _run_tests(_with_expr(alert, expr), tmp_path)
    assert done.returncode != 0, f"{alert} {mutation}: promtool test rules still passes"
    assert alert in done.stdout + done.stderr


def test_per_kernel_alert_carries_what_alertmanager_routes_on() -> None:
    (rule,) = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
               if r.get("alert") == "GPUKernelAboutToBeReclaimed"]
    for label in ("user", "namespace", "pod", "kernel_id"):
        assert label in rule["expr"], label
    assert 'reclaimer_mode{mode="enforce"}' in rule["expr"]  # dry-run nodes never act: no warning to users
    text = rule["annotations"]["description"]
    for promise in ("run a cell", "reclaimer.io/exempt", "reclaimer.io/idle-after", "$value | humanizeDuration"):
        assert promise in text, promise


# --------------------------------------------------------------------------- Prometheus Operator objects


@pytest.mark.e2e
def test_prometheus_rule_is_generated_from_the_plain_rules() -> None:
    done = subprocess.run(["python3", str(ROOT / "scripts" / "generate_monitoring.py"), "--check", "--only", "rules"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def _rendered_monitoring() -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.skipif(KUBECTL is None and not os.environ.get("CI"),  # CI installs kubectl: never skipped there
                    reason="kubectl is not installed (.ci/run installs it)")
@pytest.mark.e2e
def test_service_monitor_scrapes_the_daemons_service() -> None:
    objs = {d["kind"]: d for d in _rendered_monitoring()}
    assert set(objs) == {"ServiceMonitor", "PrometheusRule"}
    base = [d for d in yaml.safe_load_all((ROOT / "deploy" / "base" / "service.yaml").read_text()) if d]
    (svc,) = [d for d in base if d["kind"] == "Service"]
    sm = objs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"] == JOB  # the operator names the job after the Service: the alerts' job
    assert svc["metadata"]["name"] == JOB
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    (ep,) = sm["spec"]["endpoints"]
    assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "authorization", "scheme"}
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics"
    for r in ep["relabelings"]:
        assert set(r) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator"}, r


@pytest.mark.e2e
def test_plain_scrape_config_is_valid_and_names_the_job(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery: check the job with static targets in its place (the
    relabelling itself runs in a real Prometheus in tests/test_prometheus.py)."""
    doc = yaml.safe_load((MONITORING / "scrape-config.yaml").read_text())
    (job,) = doc["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["gpu-reclaimer"]}}]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(doc))
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
