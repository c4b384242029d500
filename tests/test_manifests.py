"""deploy/: the kustomize base (dry-run) and deploy/overlays/enforce, rendered by the real `kubectl kustomize`,
schema-valid for recent Kubernetes (kubernetes-validate, strict), least privilege per mode and safe by construction.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from reclaimer.core.config import parse_settings
from reclaimer.export.metrics import Metrics
from reclaimer.export.server import make_app
from tests.support.e2e import e2e_fixture
from tests.support.export_fixtures import node_snapshot

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENFORCE = DEPLOY / "overlays" / "enforce"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest still supported by the recent distributions, newest in the schema set
NAMESPACE = "gpu-reclaimer"
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None and not os.environ.get("CI"),  # CI installs kubectl: never skipped there
                                   reason="kubectl is not installed (.ci/run installs it)")

MUTATING = {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate", "*"}
READ_ONLY_RULES = {(("",), ("pods",)): ["get", "list", "watch"]}
ENFORCE_RULES = {
    **READ_ONLY_RULES,
    (("",), ("pods/eviction",)): ["create"],
    (("events.k8s.io",), ("events",)): ["create", "patch"],
    (("kubeflow.org",), ("notebooks",)): ["get", "patch"],
}


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize path`` -> the rendered objects (fails the test with kubectl's own message)."""
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
@e2e_fixture
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"base": kustomize(DEPLOY), "enforce": kustomize(ENFORCE)}


MODES = ("base", "enforce")


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in objs if d["kind"] == kind]
    return doc


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def rules(objs: list[dict[str, Any]]) -> dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]]:
    out: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for role in (d for d in objs if d["kind"] in ("ClusterRole", "Role")):
        for r in role["rules"]:
            key = (tuple(r["apiGroups"]), tuple(r["resources"]))
            assert key not in out, f"two rules for {key}"
            out[key] = sorted(r["verbs"])
    return out


# --------------------------------------------------------------------------- rendering and schema


def _rendered_params() -> Iterator[Any]:
    for mode, path in (("base", DEPLOY), ("enforce", ENFORCE)):
        for doc in (kustomize(path) if KUBECTL else []):
            for version in K8S_VERSIONS:
                yield pytest.param(doc, version, id=f"{mode}:{doc['kind']}:{version}")


@pytest.mark.parametrize(("doc", "version"), list(_rendered_params()))
def test_every_rendered_object_is_schema_valid_strict(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_both_render_the_same_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {m: sorted((d["kind"], d["metadata"]["name"]) for d in rendered[m]) for m in MODES}
    assert kinds["base"] == kinds["enforce"]  # one set of objects: `kubectl apply -k deploy` rolls enforce back
    assert {k for k, _ in kinds["base"]} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                             "ConfigMap", "Service", "NetworkPolicy", "DaemonSet"}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("spec", "template", "spec", "hostPid"), True, id="misspelt-field"),
        pytest.param(("spec", "template", "spec", "hostPID"), "yes", id="wrong-type"),
        pytest.param(("spec", "selector"), None, id="missing-selector"),
    ],
)
def test_the_validator_rejects_a_broken_daemonset(rendered: dict[str, list[dict[str, Any]]],
                                                  path: tuple[str, ...], value: Any) -> None:
    broken = copy.deepcopy(one(rendered["base"], "DaemonSet"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_base_kustomization_lists_every_manifest_in_its_folder() -> None:
    kust = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in (DEPLOY / "base").glob("*.yaml")
                                               if p.name != "kustomization.yaml")


@pytest.mark.parametrize("mode", MODES)
def test_everything_namespaced_lives_in_one_namespace(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for doc in rendered[mode]:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
    assert one(rendered[mode], "Namespace")["metadata"]["name"] == NAMESPACE


# --------------------------------------------------------------------------- least privilege per mode


def test_dry_run_rbac_only_reads(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert rules(rendered["base"]) == READ_ONLY_RULES
    verbs = {v for vs in rules(rendered["base"]).values() for v in vs}
    assert not verbs & MUTATING


def test_enforce_rbac_adds_exactly_what_enforcing_needs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert rules(rendered["enforce"]) == ENFORCE_RULES


@pytest.mark.parametrize("mode", MODES)
def test_no_delete_no_secrets_no_wildcards(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    for role in (d for d in rendered[mode] if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "delete" not in rule["verbs"] and "deletecollection" not in rule["verbs"], rule
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert "secrets" not in rule["resources"], rule
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
    assert not [d for d in rendered[mode] if d["kind"] == "Secret"]


@pytest.mark.parametrize("mode", MODES)
def test_binding_ties_the_role_to_the_daemonsets_service_account(rendered: dict[str, list[dict[str, Any]]],
                                                                mode: str) -> None:
    objs = rendered[mode]
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")["metadata"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one(objs, "ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    assert one(objs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]


# --------------------------------------------------------------------------- the pod


@pytest.mark.parametrize("mode", MODES)
def test_daemonset_pod_spec(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    pod = one(rendered[mode], "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    c = container(rendered[mode])
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["pod-resources"] == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources",
                                       "readOnly": True}
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert all(m.get("readOnly") for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]])
    assert [v for v in volumes.values() if "hostPath" in v] == [volumes["pod-resources"]]  # no other host paths
    assert not [v for v in volumes.values() if "secret" in v]  # no Secret mounted unless the listen-token patch adds it


@pytest.mark.parametrize("mode", MODES)
def test_container_security_context(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    sc = container(rendered[mode])["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert one(rendered[mode], "DaemonSet")["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"}


@pytest.mark.parametrize("mode", MODES)
def test_resources_and_probes_name_the_served_port(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    c = container(rendered[mode])
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http-metrics": _settings(rendered[mode]).listen_host_port[1]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
async def test_probes_hit_endpoints_the_daemon_serves(rendered: dict[str, list[dict[str, Any]]], probe: str,
                                                      aiohttp_client: Any) -> None:
    """The probe paths are answered by the daemon's real HTTP app (not a 404), without credentials."""
    path = container(rendered["base"])[probe]["httpGet"]["path"]
    snap = node_snapshot()

    class View:
        def snapshot(self) -> Any:
            return snap

        def health(self, now: float) -> tuple[bool, str]:
            return True, "ok"

        def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
            return True, {"sampler": "ok"}

    client = await aiohttp_client(make_app(View(), Metrics(lambda: snap, lambda: {})))
    resp = await client.get(path)
    assert resp.status == 200, (path, resp.status)
    missing = await client.get(path + "-not-served")
    assert missing.status == 404  # the check above could not pass for any path


def _settings(objs: list[dict[str, Any]]) -> Any:
    c = container(objs)
    config_path = c["args"][c["args"].index("--config") + 1]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in one(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = one(objs, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    return parse_settings(cm["data"][config_path.rsplit("/", 1)[1]], source="configmap.yaml")


def test_base_ships_in_dry_run(rendered: dict[str, list[dict[str, Any]]]) -> None:
    c = container(rendered["base"])
    assert "--enforce" not in c.get("args", []) + c.get("command", [])
    assert not {e["name"] for e in c["env"]} & {"RECLAIMER_ENFORCE", "RECLAIMER_MODE", "RECLAIMER_DRY_RUN"}
    settings = _settings(rendered["base"])
    assert settings.mode == "dry-run"
    assert settings.kubernetes.pod_resources_socket.startswith("/var/lib/kubelet/pod-resources/")


def test_enforce_overlay_turns_enforcement_on_and_changes_nothing_else(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    c = container(rendered["enforce"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RECLAIMER_MODE"] == "enforce"  # the CLI reads it over the file's mode (tests/test_cli.py)
    base, enforce = (copy.deepcopy({(d["kind"], d["metadata"]["name"]): d for d in rendered[m]}) for m in MODES)
    ds_b, ds_e = base[("DaemonSet", "gpu-reclaimer")], enforce[("DaemonSet", "gpu-reclaimer")]
    ds_e["spec"]["template"]["spec"]["containers"][0]["env"] = [
        e for e in ds_e["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] != "RECLAIMER_MODE"]
    del ds_e["spec"]["template"]["metadata"]["annotations"]["reclaimer.io/mode"]
    assert ds_b == ds_e
    for key in base:
        if key[0] not in ("DaemonSet", "ClusterRole"):
            assert base[key] == enforce[key], key


def test_enforce_mode_variable_really_switches_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    from reclaimer.app.cli import parse_args

    monkeypatch.setenv("RECLAIMER_MODE", "enforce")
    assert parse_args(["run", "--config", "/etc/reclaimer/config.yaml"]).mode == "enforce"


# --------------------------------------------------------------------------- network


def test_service_selects_the_daemon_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    svc = one(rendered["base"], "Service")
    labels = one(rendered["base"], "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9400",
                                              "prometheus.io/path": "/metrics"}
    assert svc["spec"]["ports"][0]["port"] == 9400
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert one(rendered["base"], "DaemonSet")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_network_policy_admits_only_the_monitoring_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    np = one(rendered["base"], "NetworkPolicy")
    labels = one(rendered["base"], "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rule["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]


@pytest.mark.e2e
def test_the_documented_patch_changes_the_monitoring_namespace(tmp_path: Path) -> None:
    """docs/deploy.md's overlay for a Prometheus in another namespace, and for the API server's pod proxy."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    start = docs.index("# my-overlay/kustomization.yaml")
    text = docs[start:docs.index("```", start)]
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (tmp_path / "deploy").symlink_to(DEPLOY)  # the overlay sits next to deploy/, as the docs say
    (overlay / "kustomization.yaml").write_text(text)
    np = one(kustomize(overlay), "NetworkPolicy")
    kubernetes_validate.validate(np, K8S_VERSIONS[-1], strict=True)
    froms = [f for r in np["spec"]["ingress"] for f in r["from"]]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prometheus"}}} in froms
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} not in froms
    assert any("ipBlock" in f for f in froms)


@pytest.mark.e2e
def test_listen_token_component_wires_the_secret_into_daemons_and_service_monitor(tmp_path: Path) -> None:
    """deploy/components/listen-token, used as docs/deploy.md shows: the daemon reads the mounted Secret through
    RECLAIMER_LISTEN_TOKEN_FILE and the ServiceMonitor sends the same Secret; no Secret object is shipped."""
    (tmp_path / "deploy").symlink_to(DEPLOY)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../deploy, ../deploy/monitoring]\ncomponents: [../deploy/components/listen-token]\n")
    objs = kustomize(overlay)
    assert not [d for d in objs if d["kind"] == "Secret"]
    ds = one(objs, "DaemonSet")
    kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)
    pod = ds["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    path = env["RECLAIMER_LISTEN_TOKEN_FILE"]
    assert mount["readOnly"] is True and path == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    (ep,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": volume["secret"]["secretName"],
                                                                    "key": volume["secret"]["items"][0]["key"]}}
    # The daemon really takes the variable as its listen_token_file.
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    from reclaimer.app.cli import parse_args, run_overrides
    from reclaimer.core.config import load_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLAIMER_LISTEN_TOKEN_FILE", str(token))
        args = parse_args(["run"])
    assert load_settings(None, run_overrides(args)).listen_token_file == str(token)
