"""reclaimer.observe.kube with the REAL `kubernetes` client against tests/support/fake_kube.py on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.config import incluster_config
from structlog.testing import capture_logs

from reclaimer.core.config import KubernetesSettings, parse_settings
from reclaimer.core.errors import ReclaimerError
from reclaimer.observe.kube import (
    EvictionResult,
    KubeClient,
    KubeError,
    KubeUnavailable,
    PodCache,
    _event_name,
    _micro_time,
    pod_info_from_json,
    scrub_note,
)
from reclaimer.core.model import OwnerRef, PodInfo
from tests.support.fake_kube import (
    MICRO_TIME,
    FakeKube,
    Reply,
    forbidden,
    multiple_pdbs,
    not_found,
    pdb_blocked,
    retry_after,
    server_error,
)

KERNEL_ID = "3f1c2a4e-9b7d-4c1e-8f00-123456789abc"


@pytest.fixture
def api() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


@pytest.fixture
def kube(api: FakeKube) -> Iterator[KubeClient]:
    client = api.kube_client(node_name="node-1")
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client_for(host: str, timeout: float = 5.0) -> KubeClient:
    cfg = k8s.Configuration()
    cfg.host = host
    return KubeClient.for_configuration(cfg, KubernetesSettings(timeout=timeout), node_name="node-1")


def _assert_never_forced(api: FakeKube) -> None:
    """Safety invariant 7: no DELETE pod, no gracePeriodSeconds anywhere in any body."""
    assert api.deletes == []
    assert all("gracePeriodSeconds" not in json.dumps(r.body) for r in api.requests)


# --------------------------------------------------------------------------- listing pods


def test_lists_only_this_nodes_pods_with_a_field_selector(api: FakeKube, kube: KubeClient) -> None:
    mine = api.add_pod("nb-alice", node="node-1")
    api.add_pod("nb-bob", node="node-2")
    api.add_pod("pending", node=None)
    pods = kube.list_pods_on_node("node-1")
    assert [p.uid for p in pods] == [mine["metadata"]["uid"]]
    (req,) = api.requests_to("GET", r"^/api/v1/pods$")
    assert req.query["fieldSelector"] == "spec.nodeName=node-1"


def test_pagination_follows_continue_tokens(api: FakeKube) -> None:
    names = [f"nb-{i}" for i in range(5)]
    for n in names:
        api.add_pod(n, node="node-1")
    api.add_pod("elsewhere", node="node-2")
    kube = api.kube_client(node_name="node-1", page_size=2)
    assert sorted(p.name for p in kube.list_pods_on_node()) == names
    reqs = api.requests_to("GET", r"^/api/v1/pods$")
    assert [r.query.get("continue") for r in reqs] == [None, "2", "4"]
    assert {r.query["limit"] for r in reqs} == {"2"}
    assert {r.query["fieldSelector"] for r in reqs} == {"spec.nodeName=node-1"}


def test_client_drops_pods_of_other_nodes_even_if_the_server_ignores_the_selector(api: FakeKube) -> None:
    other = api.add_pod("nb-other", node="node-2")
    api.list_response = Reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [other]})
    with capture_logs() as logs:
        assert api.kube_client(node_name="node-1").list_pods_on_node() == []
    assert any(e["event"] == "skipping pod on another node" and e["pod"] == "nb-other" for e in logs)


@pytest.mark.parametrize(
    ("labels", "annotations", "user"),
    [
        pytest.param({"hub.jupyter.org/username": "alice"}, {}, "alice", id="user-from-label"),
        pytest.param({}, {"hub.jupyter.org/username": "bob@example.com"}, "bob@example.com", id="user-from-annotation"),
        pytest.param({"hub.jupyter.org/username": "carol-40x-2ecom"}, {"hub.jupyter.org/username": "carol@x.com"},
                     "carol@x.com", id="annotation-wins-unescaped"),
        pytest.param({}, {}, None, id="no-user-is-none"),
        pytest.param({"hub.jupyter.org/username": ""}, {}, None, id="empty-user-is-none"),
    ],
)
def test_pod_info_user(api: FakeKube, kube: KubeClient, labels: dict[str, str], annotations: dict[str, str],
                       user: str | None) -> None:
    api.add_pod("nb", labels=labels, annotations=annotations)
    (pod,) = kube.list_pods_on_node()
    assert pod.user == user


def test_custom_user_label(api: FakeKube) -> None:
    api.add_pod("nb", labels={"team.example.com/owner": "dave"})
    kube = api.kube_client(KubernetesSettings(user_label="team.example.com/owner"))
    assert [p.user for p in kube.list_pods_on_node()] == ["dave"]


def test_pod_info_mapping(api: FakeKube, kube: KubeClient) -> None:
    stored = api.add_pod(
        "jupyter-alice",
        namespace="jhub",
        labels={"component": "singleuser-server", "kernel_id": KERNEL_ID},
        annotations={"reclaimer.io/exempt": "true"},
        owner=("StatefulSet", "alice-set"),
        phase="Running",
        container_ids=["containerd://aaa111", "cri-o://bbb222", "docker://ccc333", ""],
        init_container_ids=["containerd://init444"],
        ephemeral_container_ids=["containerd://dbg555"],
    )
    (pod,) = kube.list_pods_on_node()
    assert pod == PodInfo(
        uid=stored["metadata"]["uid"],
        namespace="jhub",
        name="jupyter-alice",
        node_name="node-1",
        labels={"component": "singleuser-server", "kernel_id": KERNEL_ID},
        annotations={"reclaimer.io/exempt": "true"},
        owner_kind="StatefulSet",
        owner_name="alice-set",
        user=None,
        phase="Running",
        container_ids=("init444", "aaa111", "bbb222", "ccc333", "dbg555"),
        owners=(OwnerRef("StatefulSet", "alice-set", "v1", controller=True),),
        started_at=1767225600.0,  # status.startTime 2026-01-01T00:00:00Z
        deleting=False,
        containers_running=True,
    )


@pytest.mark.parametrize(
    ("pod", "culprit"),
    [
        pytest.param({"metadata": {"name": "x", "namespace": "ns"}}, "metadata.uid", id="no-uid"),
        pytest.param({"metadata": {"uid": "u", "namespace": "ns"}}, "metadata.name", id="no-name"),
        pytest.param({}, "metadata.uid, metadata.namespace, metadata.name", id="empty"),
    ],
)
def test_malformed_pod_is_a_clear_error(pod: dict[str, Any], culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        pod_info_from_json(pod, "hub.jupyter.org/username")


def test_malformed_pod_is_skipped_not_fatal(api: FakeKube, kube: KubeClient) -> None:
    api.add_raw_pod({"metadata": {"name": "broken", "namespace": "default"}, "spec": {"nodeName": "node-1"}})
    good = api.add_pod("good")
    with capture_logs() as logs:
        assert [p.uid for p in kube.list_pods_on_node()] == [good["metadata"]["uid"]]
    assert any(e["event"] == "skipping malformed pod" and "default/broken" in e["error"] for e in logs)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        pytest.param(server_error(), "HTTP 500.*etcdserver", id="500"),
        pytest.param(forbidden(), "HTTP 403.*forbidden", id="403"),
        pytest.param(Reply(200, {"items": "not-a-list-of-pods"}), "listing pods", id="garbage-body"),
    ],
)
def test_list_failure_is_a_kube_error(api: FakeKube, kube: KubeClient, reply: Reply, match: str) -> None:
    api.list_response = reply
    with pytest.raises(KubeError, match=match) as err:
        kube.list_pods_on_node()
    assert isinstance(err.value, ReclaimerError)


def test_unreachable_api_server_is_a_kube_error() -> None:
    kube = _client_for(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(KubeError, match="listing pods on node node-1"):
        kube.list_pods_on_node()


@pytest.mark.timeout(30)
def test_requests_carry_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        kube = _client_for(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
        with pytest.raises(KubeError, match="listing pods"):
            kube.list_pods_on_node()
        pod = PodInfo(uid="u", namespace="ns", name="p")
        assert kube.evict("ns", "p", "u").result == "failed"
        assert kube.create_event(pod, reason="GPUIdle", action="EvictPod", note="n") is False


def test_get_pod(api: FakeKube, kube: KubeClient) -> None:
    stored = api.add_pod("nb", namespace="jhub")
    got = kube.get_pod("jhub", "nb")
    assert got is not None and got.uid == stored["metadata"]["uid"]
    assert kube.get_pod("jhub", "gone") is None


# --------------------------------------------------------------------------- eviction


PDB_DETAIL = "The disruption budget nb-pdb needs 1 healthy pods and has 1 currently"


@pytest.mark.parametrize(
    ("reply", "result", "retry", "detail"),
    [
        pytest.param(pdb_blocked(), "blocked-pdb", None, PDB_DETAIL, id="429-pdb"),
        pytest.param(pdb_blocked(retry_after=10), "blocked-pdb", 10.0, PDB_DETAIL, id="429-pdb-still-processing"),
        pytest.param(retry_after(7), "retry-after", 7.0, "HTTP 429 Too Many Requests: Too many requests", id="429-7s"),
        pytest.param(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), "retry-after", 0.0, "HTTP 429",
                     id="429-http-date-in-the-past"),
        pytest.param(multiple_pdbs(), "failed", None, "HTTP 500 Internal Server Error: Internal error occurred: "
                     "This pod has more than one PodDisruptionBudget", id="500-multiple-pdbs"),
        pytest.param(forbidden("nb"), "forbidden", None, 'HTTP 403 Forbidden: pods "nb" is forbidden', id="403"),
        pytest.param(not_found("nb"), "already-gone", None, 'HTTP 404 Not Found: pods "nb" not found', id="404"),
        pytest.param(Reply(422, {"kind": "Status", "message": "weird"}), "failed", None, "HTTP 422", id="422-other"),
    ],
)
def test_eviction_scripted_responses(api: FakeKube, kube: KubeClient, reply: Reply, result: str,
                                     retry: float | None, detail: str) -> None:
    uid = api.add_pod("nb")["metadata"]["uid"]
    api.eviction_response = reply
    got = kube.evict("default", "nb", uid)
    assert (got.result, got.retry_after) == (result, retry)
    assert got.detail.startswith(detail)
    (req,) = api.evictions
    assert req.body["deleteOptions"] == {"preconditions": {"uid": uid}}
    _assert_never_forced(api)
    assert ("default", "nb") in api.pods  # nothing removed the pod behind the API's back


def test_eviction_201_evicts_with_uid_precondition(api: FakeKube, kube: KubeClient) -> None:
    stored = api.add_pod("nb", namespace="jhub")
    uid = stored["metadata"]["uid"]
    assert kube.evict("jhub", "nb", uid) == EvictionResult("success", "evicted jhub/nb")
    (req,) = api.evictions
    assert req.path == "/api/v1/namespaces/jhub/pods/nb/eviction"
    assert req.body == {"apiVersion": "policy/v1", "kind": "Eviction",
                        "metadata": {"name": "nb", "namespace": "jhub"},
                        "deleteOptions": {"preconditions": {"uid": uid}}}
    assert "dryRun" not in req.query
    assert ("jhub", "nb") not in api.pods
    _assert_never_forced(api)


def test_eviction_of_a_gone_pod_is_already_gone(api: FakeKube, kube: KubeClient) -> None:
    assert kube.evict("jhub", "nb", "0d6c7a8e-0000-0000-0000-000000000000").result == "already-gone"
    _assert_never_forced(api)


def test_eviction_of_a_replaced_pod_is_a_conflict(api: FakeKube, kube: KubeClient) -> None:
    api.add_pod("nb", uid="11111111-1111-1111-1111-111111111111")  # same name, new pod
    got = kube.evict("default", "nb", "22222222-2222-2222-2222-222222222222")
    assert got.result == "conflict"
    assert "does not match the UID in record" in got.detail
    assert ("default", "nb") in api.pods
    _assert_never_forced(api)


def test_eviction_server_side_dry_run_keeps_the_pod(api: FakeKube, kube: KubeClient) -> None:
    uid = api.add_pod("nb")["metadata"]["uid"]
    assert kube.evict("default", "nb", uid, dry_run=True).result == "success"
    assert api.evictions[0].query["dryRun"] == "All"
    assert ("default", "nb") in api.pods


def test_eviction_without_uid_sends_nothing(api: FakeKube, kube: KubeClient) -> None:
    api.add_pod("nb")
    assert kube.evict("default", "nb", "").result == "failed"
    assert api.requests == []


def test_eviction_transport_failure_is_failed_not_raised() -> None:
    kube = _client_for(f"http://127.0.0.1:{_free_port()}")
    got = kube.evict("default", "nb", "u")
    assert got.result == "failed" and got.retry_after is None


def test_eviction_is_tried_once(api: FakeKube, kube: KubeClient) -> None:
    api.add_pod("nb")
    for reply in (server_error(), retry_after(1), pdb_blocked()):
        api.eviction_response = reply
        kube.evict("default", "nb", "u")
    assert len(api.evictions) == 3  # one request per call: the caller retries next cycle
    _assert_never_forced(api)


# --------------------------------------------------------------------------- events


def _pod(api: FakeKube, **kw: Any) -> PodInfo:
    stored = api.add_pod("jupyter-alice", namespace="jhub", **kw)
    return pod_info_from_json(stored, "hub.jupyter.org/username")


def test_event_body(api: FakeKube, kube: KubeClient) -> None:
    pod = _pod(api)
    assert kube.create_event(pod, reason="GPUIdleWarning", action="Warn", type="Warning",
                             note="GPU idle for 25m; shutdown-kernel in 5m") is True
    (req,) = api.requests_to("POST", "/events$")
    assert req.path == "/apis/events.k8s.io/v1/namespaces/jhub/events"
    (ev,) = api.events
    assert ev["apiVersion"] == "events.k8s.io/v1" and ev["kind"] == "Event"
    assert ev["reportingController"] == "reclaimer.io/gpu-reclaimer"
    assert ev["reportingInstance"] == "reclaimer.io/gpu-reclaimer-node-1"
    assert (ev["reason"], ev["action"], ev["type"]) == ("GPUIdleWarning", "Warn", "Warning")
    assert ev["note"] == "GPU idle for 25m; shutdown-kernel in 5m"
    assert ev["regarding"] == {"apiVersion": "v1", "kind": "Pod", "uid": pod.uid, "name": "jupyter-alice",
                               "namespace": "jhub"}
    assert ev["metadata"]["namespace"] == "jhub" and ev["metadata"]["name"].startswith("jupyter-alice.")
    assert MICRO_TIME.match(ev["eventTime"])


def test_event_names_are_unique(api: FakeKube, kube: KubeClient) -> None:
    pod = _pod(api)
    for _ in range(3):
        assert kube.create_event(pod, reason="GPUIdle", action="ShutdownKernel", note="n")
    assert len({e["metadata"]["name"] for e in api.events}) == 3


def test_micro_time_always_has_six_fraction_digits() -> None:
    # The API server parses eventTime as RFC3339 with exactly six fraction digits.
    whole_second = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert MICRO_TIME.match(_micro_time(whole_second).isoformat())
    assert not MICRO_TIME.match(whole_second.isoformat())


def test_event_note_is_scrubbed_and_capped(api: FakeKube, kube: KubeClient) -> None:
    pod = _pod(api)
    note = ("gateway said 401 for Authorization: Bearer s3cr3t-t0ken at http://user:pw@eg:8888/api?token=abc123 "
            + "é" * 2000)
    assert kube.create_event(pod, reason="GatewayError", action="ShutdownKernel", type="Warning", note=note)
    (ev,) = api.events
    for secret in ("s3cr3t-t0ken", "abc123", "user:pw"):
        assert secret not in ev["note"]
    assert len(ev["note"].encode("utf-8")) <= 1024


@pytest.mark.parametrize(
    ("text", "absent"),
    [
        pytest.param("token=abc", "abc", id="token-kv"),
        pytest.param("Authorization: Bearer xyz", "xyz", id="bearer"),
        pytest.param("password: hunter2", "hunter2", id="password"),
        pytest.param("https://bob:secret@hub/x", "secret", id="url-userinfo"),
    ],
)
def test_scrub_note(text: str, absent: str) -> None:
    assert absent not in scrub_note(text)


@pytest.mark.parametrize(
    "reply",
    [pytest.param(server_error(), id="500"), pytest.param(forbidden(), id="403"),
     pytest.param(Reply(422, {"kind": "Status", "message": "invalid"}), id="422")],
)
def test_event_failure_returns_false_and_logs(api: FakeKube, kube: KubeClient, reply: Reply) -> None:
    api.event_response = reply
    with capture_logs() as logs:
        assert kube.create_event(_pod(api), reason="GPUIdle", action="EvictPod", note="n") is False
    assert any(e["event"] == "event not created" and f"HTTP {reply.status}" in e["error"] for e in logs)


def test_event_to_unreachable_server_returns_false() -> None:
    kube = _client_for(f"http://127.0.0.1:{_free_port()}")
    assert kube.create_event(PodInfo("u", "ns", "p"), reason="GPUIdle", action="EvictPod", note="n") is False


@pytest.mark.parametrize(
    ("reason", "action", "type_"),
    [
        pytest.param("Idle", "EvictPod", "Normal", id="unknown-reason"),
        pytest.param("GPUIdle", "Delete", "Normal", id="unknown-action"),
        pytest.param("GPUIdle", "EvictPod", "Error", id="unknown-type"),
    ],
)
def test_invalid_event_is_refused_without_a_request(api: FakeKube, kube: KubeClient, reason: str, action: str,
                                                    type_: str) -> None:
    assert kube.create_event(PodInfo("u", "ns", "p"), reason=reason, action=action, note="n", type=type_) is False
    assert api.requests == []


# --------------------------------------------------------------------------- configuration


def test_from_settings_with_a_kubeconfig(api: FakeKube, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(api.kubeconfig())
    api.add_pod("nb", node="node-7")
    settings = parse_settings(f"kubernetes: {{kubeconfig: '{path}', timeout: 3s}}").kubernetes
    kube = KubeClient.from_settings(settings, node_name="node-7")
    assert [p.name for p in kube.list_pods_on_node()] == ["nb"]
    assert "fake-token" not in repr(kube)


def test_item6_a_401_rereads_the_credential_once_then_marks_it_refused(api: FakeKube, tmp_path: Path) -> None:
    """Issue 10 item 6: the API server refuses the token (rotated, expired): one re-read of the credential, which
    the next call uses; a refusal re-reading does not answer marks the client ``rejected`` (the daemon halts
    actions) until a call succeeds."""
    path = tmp_path / "kubeconfig"
    path.write_text(api.kubeconfig(token="sa-1"))
    api.add_pod("nb", node="node-7")
    api.required_token = "sa-1"
    kube = KubeClient.from_settings(KubernetesSettings(kubeconfig=str(path), timeout=3.0), node_name="node-7")
    assert [p.name for p in kube.list_pods_on_node()] == ["nb"] and kube.rejected is None
    # Rotated on both sides: the first call gets 401 and re-reads the file; not refused, the next call succeeds.
    path.write_text(api.kubeconfig(token="sa-2"))
    api.required_token = "sa-2"
    with pytest.raises(KubeError, match="401"):
        kube.list_pods_on_node()
    assert kube.rejected is None
    assert [p.name for p in kube.list_pods_on_node()] == ["nb"] and kube.rejected is None
    # Rotated at the API server only: re-reading does not help; refused, with a reason that holds no token.
    api.required_token = "sa-3"
    with pytest.raises(KubeError, match="401"):
        kube.list_pods_on_node()
    assert kube.rejected is not None and "sa-" not in kube.rejected
    # The file catches up: read again at the next 401, and the call after it is accepted; the mark is cleared.
    path.write_text(api.kubeconfig(token="sa-3"))
    with pytest.raises(KubeError, match="401"):
        kube.list_pods_on_node()
    assert [p.name for p in kube.list_pods_on_node()] == ["nb"] and kube.rejected is None


def _no_cluster(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    # CI may itself run in a pod: hide its service account so "no configuration" really means none
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(home / "no-token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(home / "no-ca.crt"))


def test_no_configuration_is_kube_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_cluster(monkeypatch, tmp_path)
    with pytest.raises(KubeUnavailable, match=r"no usable Kubernetes configuration \(kubeconfig ~/.kube/config\)"):
        KubeClient.from_settings(KubernetesSettings(enabled="auto"))


def test_in_cluster_without_service_account_is_kube_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    _no_cluster(monkeypatch, tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeUnavailable, match="in-cluster service account"):
        KubeClient.from_settings(KubernetesSettings())


def test_explicit_kubeconfig_missing_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(KubeUnavailable, match=str(missing)):
        KubeClient.from_settings(KubernetesSettings(kubeconfig=str(missing)))


def test_disabled_is_kube_unavailable() -> None:
    with pytest.raises(KubeUnavailable, match="enabled is false"):
        KubeClient.from_settings(KubernetesSettings(enabled=False))


# --------------------------------------------------------------------------- the pod cache


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pod_cache_indexes(api: FakeKube, kube: KubeClient) -> None:
    a = api.add_pod("kernel-pod", labels={"kernel_id": KERNEL_ID}, container_ids=["containerd://c1"])
    b = api.add_pod("bad-label", labels={"kernel_id": "../../etc"}, container_ids=["cri-o://c2"])
    api.add_pod("other-node", node="node-2", labels={"kernel_id": KERNEL_ID})
    cache = PodCache(kube, "node-1", KubernetesSettings())
    assert cache.up is False and cache.age_seconds() is None
    with capture_logs() as logs:
        assert cache.refresh() is True
    assert cache.up is True
    assert {p.name for p in cache.pods()} == {"kernel-pod", "bad-label"}
    assert cache.by_uid(a["metadata"]["uid"]).name == "kernel-pod"  # type: ignore[union-attr]
    assert cache.by_container_id("c2").uid == b["metadata"]["uid"]  # type: ignore[union-attr]
    assert cache.by_container_id("containerd://c1").name == "kernel-pod"  # type: ignore[union-attr]
    assert cache.by_container_id("nope") is None and cache.by_uid("nope") is None
    assert cache.kernel_ids() == {a["metadata"]["uid"]: KERNEL_ID}
    assert any(e["event"] == "ignoring non-UUID kernel id label" and e["pod"] == "bad-label" for e in logs)


def test_pod_cache_custom_kernel_label(api: FakeKube, kube: KubeClient) -> None:
    a = api.add_pod("eg-kernel", labels={"eg.example.com/kernel-id": KERNEL_ID, "kernel_id": "x"})
    cache = PodCache(kube, "node-1", KubernetesSettings(kernel_id_label="eg.example.com/kernel-id"))
    cache.refresh()
    assert cache.kernel_ids() == {a["metadata"]["uid"]: KERNEL_ID}


def test_pod_cache_failed_refresh_keeps_last_good_data(api: FakeKube, kube: KubeClient) -> None:
    clock = _Clock()
    api.add_pod("nb")
    cache = PodCache(kube, "node-1", KubernetesSettings(resync_interval=30), clock=clock)
    assert cache.refresh_if_due() is True
    clock.now += 45
    api.list_response = server_error()
    assert cache.refresh_if_due() is False
    assert cache.up is False
    assert [p.name for p in cache.pods()] == ["nb"]
    assert cache.age_seconds() == 45.0
    assert cache.last_error is not None and "HTTP 500" in cache.last_error
    clock.now += 30
    api.list_response = None
    api.add_pod("nb-2")
    assert cache.refresh_if_due() is True
    assert cache.up is True and cache.last_error is None and cache.age_seconds() == 0.0
    assert {p.name for p in cache.pods()} == {"nb", "nb-2"}


def test_pod_cache_lists_at_most_once_per_resync_interval(api: FakeKube, kube: KubeClient) -> None:
    clock = _Clock()
    cache = PodCache(kube, "node-1", KubernetesSettings(resync_interval=30), clock=clock)
    cache.refresh_if_due()
    clock.now += 29
    cache.refresh_if_due()
    assert len(api.requests_to("GET", "/pods$")) == 1
    clock.now += 1
    cache.refresh_if_due()
    assert len(api.requests_to("GET", "/pods$")) == 2


def test_event_name_for_a_longest_pod_name_is_a_valid_subdomain() -> None:
    name = _event_name("a" * 235 + "-" + "b" * 17)  # the cut lands right after the dash
    assert len(name) <= 253
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name)


def test_item4_pod_cache_warned_set_stays_bounded_by_the_live_pods(api: FakeKube, kube: KubeClient) -> None:
    cache = PodCache(kube, "node-1", KubernetesSettings())
    for n in range(200):  # pods with a bad kernel_id label come and go, two at a time
        api.add_pod(f"bad-{n}", node="node-1", labels={"kernel_id": "not-a-uuid"})
        api.pods.pop(("default", f"bad-{n - 2}"), None)
        assert cache.refresh()
        assert len(cache._bad_kernel_labels) <= 2
