"""deploy/: schema-valid for recent Kubernetes (kubernetes-validate, strict) and safe by construction."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from reclaimer.config import parse_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest still supported by the recent distributions, newest in the schema set
NAMESPACE = "gpu-reclaimer"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()
RESOURCES = [(f, d) for f, d in DOCS if d["kind"] != "Kustomization"]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in RESOURCES if d["kind"] == kind]
    return doc


def _container() -> dict[str, Any]:
    (c,) = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("filename", "doc"), [pytest.param(f, d, id=f"{f}:{d['kind']}") for f, d in RESOURCES])
def test_schema_valid_strict(filename: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("spec", "template", "spec", "hostPid"), True, id="misspelt-field"),
        pytest.param(("spec", "template", "spec", "hostPID"), "yes", id="wrong-type"),
        pytest.param(("spec", "selector"), None, id="missing-selector"),
    ],
)
def test_the_validator_rejects_a_broken_daemonset(path: tuple[str, ...], value: Any) -> None:
    broken = copy.deepcopy(_one("DaemonSet"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = [d for _, d in DOCS if d["kind"] == "Kustomization"]
    assert sorted(kust["resources"]) == sorted({f for f, _ in RESOURCES})


def test_everything_namespaced_lives_in_one_namespace() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for _, doc in RESOURCES:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
    assert _one("Namespace")["metadata"]["name"] == NAMESPACE


def test_rbac_is_least_privilege() -> None:
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in _one("ClusterRole")["rules"]}
    assert rules == {
        (("",), ("pods",)): ["get", "list", "watch"],
        (("",), ("pods/eviction",)): ["create"],
        (("events.k8s.io",), ("events",)): ["create", "patch"],
    }
    for rule in _one("ClusterRole")["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def test_binding_ties_the_role_to_the_daemonsets_service_account() -> None:
    binding = _one("ClusterRoleBinding")
    sa = _one("ServiceAccount")["metadata"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": _one("ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    assert _one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]


def test_daemonset_pod_spec() -> None:
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    c = _container()
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["pod-resources"] == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources",
                                       "readOnly": True}
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert all(m.get("readOnly") for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]])
    assert [v for v in volumes.values() if "hostPath" in v] == [volumes["pod-resources"]]  # no other host paths


def test_container_security_context() -> None:
    sc = _container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert _one("DaemonSet")["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"}


def test_resources_and_probes() -> None:
    c = _container()
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http-metrics": 9400}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}


def test_ships_in_dry_run() -> None:
    c = _container()
    assert "--enforce" not in c.get("args", []) + c.get("command", [])
    assert not {e["name"] for e in c["env"]} & {"RECLAIMER_ENFORCE", "RECLAIMER_MODE"}
    config_path = c["args"][c["args"].index("--config") + 1]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in _one("DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = _one("ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    settings = parse_settings(cm["data"][config_path.rsplit("/", 1)[1]], source="configmap.yaml")
    assert settings.mode == "dry-run"
    assert settings.listen_host_port[1] == 9400
    assert settings.kubernetes.pod_resources_socket.startswith("/var/lib/kubelet/pod-resources/")


def test_service_scrapes_the_daemon_pods() -> None:
    svc = _one("Service")
    labels = _one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9400",
                                              "prometheus.io/path": "/metrics"}
    assert svc["spec"]["ports"][0]["port"] == 9400
    assert _one("DaemonSet")["spec"]["selector"]["matchLabels"].items() <= labels.items()
