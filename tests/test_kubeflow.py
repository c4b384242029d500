"""Kubeflow notebooks (issue 13 item 3): action stop-notebook sets kubeflow-resource-stopped on the Notebook (as
Kubeflow's culler does: RFC 3339 UTC), through the real kubernetes client's CustomObjectsApi against the fake API
server, verified by the pod going away; kernel activity comes from the notebook server's REST API at a URL built
from the configured template (never read from the pod, DNS labels only) — a real Jupyter Server stands in for the
notebook server. stop-notebook ends every kernel of the server: all of them must be idle."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from reclaimer.core import actionkinds
from reclaimer.core.config import KubeflowSettings, ConfigError, parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.observe.kube import pod_info_from_json
from reclaimer.core.sources import KUBEFLOW_GATEWAY
from reclaimer.observe.kubeflow import NotebookServers, is_dns_label, notebook_url
from reclaimer.core.actions import ActionKind, Recovers
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import Candidate, NotebookRef, PolicyState, ProcessSample
from reclaimer.core.policy import decide
from tests.support.fake_kube import FakeKube, Reply, forbidden
from tests.support.fake_kubelet import FakeKubelet
from tests.support.fake_kubelet import pod as kubelet_pod
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    end_leftover_kernels,
    kernel_pid,
    run_code,
    shutdown_kernel,
    start_jupyter_server,
    start_kernel,
    wait_for_state,
    wake_kernel,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.support.policy_fixtures import (
    KID, KID2, NOW, WARNED, activity, kernel, make_settings, policy, series, snapshot, utc,
)
from tests.support.procfs_fixtures import FakeProc, kernel_cmdline, pod_cgroup
from tests.support.e2e import e2e_fixture

NS, NB = "team-a", "nb-alice"
GIB = 1024**3
TEMPLATE = "http://{name}.{namespace}.svc/notebook/{namespace}/{name}"


# --------------------------------------------------------------------------- the URL is built, never read


@pytest.mark.parametrize(
    "namespace, name, url",
    [
        pytest.param(NS, NB, "http://nb-alice.team-a.svc/notebook/team-a/nb-alice", id="default-template"),
        pytest.param(NS, "nb.evil.com/x", None, id="dots-and-slash"),
        pytest.param(NS, "NB", None, id="upper-case"),
        pytest.param("team-a@evil", NB, None, id="at-sign"),
        pytest.param(NS, "a" * 64, None, id="too-long"),
        pytest.param(NS, "-nb", None, id="leading-dash"),
        pytest.param("", NB, None, id="empty"),
    ],
)
def test_notebook_url_only_for_dns_labels(namespace: str, name: str, url: str | None) -> None:
    assert notebook_url(TEMPLATE, namespace, name) == url
    assert is_dns_label(name) is (url is not None or not is_dns_label(namespace))


def test_notebook_url_template_is_validated_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"kubeflow\.notebook_url .*placeholders \{name\} and \{namespace\}"):
        parse_settings('kubeflow: {notebook_url: "http://{name}.svc/{pod_ip}"}')
    with pytest.raises(ConfigError, match=r"kubeflow\.notebook_url"):
        parse_settings('kubeflow: {notebook_url: "ftp://{name}.{namespace}"}')
    assert parse_settings("kubeflow: {}").kubeflow == KubeflowSettings()


# --------------------------------------------------------------------------- stop-notebook through the real client


@pytest.fixture
def api() -> Any:
    with FakeKube() as fake:
        yield fake


def test_stop_notebook_sets_the_stop_annotation_like_kubeflows_culler(api: FakeKube) -> None:
    pod = api.add_notebook_pod(NB, namespace=NS, node="node-1")
    api.add_notebook(NB, namespace=NS)
    client = api.kube_client(node_name="node-1")
    when = 1_764_900_000.0  # 2025-12-05T02:00:00Z
    assert client.get_pod(NS, f"{NB}-0") is not None
    result, detail = client.stop_notebook(NS, NB, now=when)
    assert result == "success" and "kubeflow-resource-stopped=2025-12-05T02:00:00Z" in detail
    (patch,) = api.requests_to("PATCH", f"/apis/kubeflow.org/v1/namespaces/{NS}/notebooks/{NB}")
    assert patch.body == {"metadata": {"annotations": {"kubeflow-resource-stopped": "2025-12-05T02:00:00Z"}}}
    assert api.notebooks[(NS, NB)]["metadata"]["annotations"]["kubeflow-resource-stopped"] == "2025-12-05T02:00:00Z"
    assert client.get_pod(NS, pod["metadata"]["name"]) is None  # the controller scaled it to 0
    assert api.evictions == [] and api.deletes == []  # never through the pod itself


@pytest.mark.parametrize(
    "setup, result, words, patched",
    [
        pytest.param(lambda a: a.add_notebook(NB, namespace=NS, annotations={"kubeflow-resource-stopped": "x"}),
                     "already-gone", "already stopped", False, id="already-stopped-not-patched-twice"),
        pytest.param(lambda a: None, "already-gone", "no longer exists", False, id="notebook-gone"),
        pytest.param(lambda a: setattr(a, "notebook_response", forbidden("notebooks")), "failed", "HTTP 403",
                     False, id="rbac-forbidden"),
        pytest.param(lambda a: setattr(a, "notebook_response", Reply(500, {"kind": "Status", "message": "etcd"})),
                     "failed", "HTTP 500", False, id="server-error"),
    ],
)
def test_stop_notebook_outcomes(api: FakeKube, setup: Any, result: str, words: str, patched: bool) -> None:
    setup(api)
    got, detail = api.kube_client(node_name="node-1").stop_notebook(NS, NB)
    assert got == result and words in detail
    assert bool(api.requests_to("PATCH", f"/apis/kubeflow.org/v1/namespaces/{NS}/notebooks/{NB}")) is patched


# --------------------------------------------------------------------------- the policy: the whole notebook


def nb_pod() -> Any:
    return pod_info_from_json({
        "metadata": {"uid": "b1b2c3d4-0000-4000-8000-00000000bbbb", "namespace": NS, "name": f"{NB}-0",
                     "labels": {"notebook-name": NB, "statefulset": NB},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": NB, "uid": "u",
                                          "controller": True}]},
        "spec": {"nodeName": "gpu-node-1"}, "status": {"phase": "Running"}}, "hub.jupyter.org/username")


def nb_kernel(ref: NotebookRef | None, kid: str = KID) -> Candidate:
    from dataclasses import replace

    c = kernel(kid, act=activity(kid, gateway=KUBEFLOW_GATEWAY), pod_info=nb_pod(), user=None,
               gateway=KUBEFLOW_GATEWAY)
    return replace(c, notebook=ref, allocated=True, allocated_gpus=c.gpu_uuids)


def ref(*kernels: Any, error: str | None = None, at: float = NOW - 1) -> NotebookRef:
    return NotebookRef(NS, NB, None if error else tuple(kernels), error, at)


def decide_nb(c: Candidate, action: str = "stop-notebook") -> Any:
    start = NOW - 6 * 3600
    snap = snapshot(series(start=start, processes=(ProcessSample(4242, 2 * GIB),)), started_at=start)
    (d,) = decide([c], snap, make_settings(policies=[policy(action=action)]), NOW, WARNED)  # invariant 11
    return d


@pytest.mark.parametrize(
    "candidate, verdict, words",
    [
        pytest.param(nb_kernel(ref(activity(KID, gateway="kubeflow"), activity(KID2, gateway="kubeflow"))),
                     Verdict.RECLAIM, [], id="every-kernel-idle"),
        pytest.param(nb_kernel(ref(activity(KID), activity(KID2, state="busy"))), Verdict.KEEP,
                     [f"stop-notebook would also end kernel {KID2} (busy)"], id="another-kernel-busy"),
        pytest.param(nb_kernel(ref(activity(KID), activity(KID2, idle_for=60))), Verdict.KEEP,
                     [f"stop-notebook would also end kernel {KID2} (active 1m ago)"], id="another-kernel-recent"),
        pytest.param(nb_kernel(ref(error="notebook server: connection refused")), Verdict.UNKNOWN,
                     [f"notebook {NS}/{NB} kernels unknown (notebook server: connection refused)"],
                     id="listing-failed"),
        pytest.param(nb_kernel(ref(activity(KID2))), Verdict.UNKNOWN,
                     [f"does not list kernel {KID}"], id="own-kernel-not-listed"),
        pytest.param(nb_kernel(ref(activity(KID), at=NOW - 3600)), Verdict.UNKNOWN, ["kernel listing stale"],
                     id="stale-listing"),
        pytest.param(nb_kernel(ref(activity(KID), activity(KID2, error="HTTP 500"))), Verdict.UNKNOWN,
                     [f"kernel {KID2} unknown"], id="a-kernel-unknown"),
        pytest.param(nb_kernel(None), Verdict.UNKNOWN, ["configure kubeflow.notebook_url"], id="no-kubeflow-config"),
    ],
)
def test_stop_notebook_covers_every_kernel_of_the_notebook(candidate: Candidate, verdict: Verdict,
                                                          words: list[str]) -> None:
    d = decide_nb(candidate)
    assert d.verdict is verdict, d.reason
    for w in words:
        assert w in d.reason
    if verdict is Verdict.RECLAIM:
        assert d.action is ActionKind.STOP_NOTEBOOK
        assert actionkinds.recovers(d.action, candidate) is Recovers.ALLOCATION


def test_stop_notebook_only_for_a_kubeflow_notebooks_pod() -> None:
    c = kernel(act=activity(), user="alice")  # a JupyterHub pod, not a Notebook's
    d = decide_nb(c)
    assert d.verdict is Verdict.UNKNOWN and "stop-notebook needs a Kubeflow Notebook's pod" in d.reason


def test_auto_picks_stop_notebook_for_a_notebook_pod_holding_the_gpu() -> None:
    c = nb_kernel(ref(activity(KID)))
    d = decide_nb(c, "auto")
    assert d.verdict is Verdict.RECLAIM and d.action is ActionKind.STOP_NOTEBOOK, d.reason
    assert "auto: stop-notebook releases the GPU allocation" in d.reason


def test_evict_pod_on_a_notebook_pod_names_stop_notebook() -> None:
    d = decide_nb(nb_kernel(ref(activity(KID))), "evict-pod")
    assert d.verdict is Verdict.KEEP and "use stop-notebook" in d.reason and "Kubeflow Notebook nb-alice" in d.reason


# --------------------------------------------------------------------------- a real notebook server


@pytest.fixture(scope="module")
@e2e_fixture
def _notebook_server_module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Private to this module: the Kubeflow base path (/notebook/<namespace>/<name>/) is its own server configuration.
    js = start_jupyter_server(tmp_path_factory.mktemp("nb"), secrets.token_hex(16), base_url=f"/notebook/{NS}/{NB}/")
    yield js
    js.stop()


@pytest.fixture
def notebook_server(_notebook_server_module: JupyterProcess) -> Any:
    """A real Jupyter Server serving /notebook/team-a/nb-alice/ as a Kubeflow notebook server does; every test starts
    with no kernels on it (booted once for the module, the kernels a test leaves are shut down after it)."""
    yield _notebook_server_module
    end_leftover_kernels(_notebook_server_module, listable=True)


async def test_notebook_server_kernels_from_a_real_server(notebook_server: JupyterProcess,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    js = notebook_server
    kid = await start_kernel(js.url, js.token)
    monkeypatch.setenv("KF_TOKEN", js.token)
    port = js.extra["port"]
    servers = NotebookServers(KubeflowSettings(notebook_url=f"http://127.0.0.1:{port}/notebook/{{namespace}}/{{name}}",
                                               token_env="KF_TOKEN"))
    try:
        await wake_kernel(js.url, js.token, kid)  # settle what starting the kernel counted as activity
        before = await _server_activity(js)
        got = await servers.kernels(NS, NB)
        after = await _server_activity(js)
        other = await servers.kernels(NS, "nb-bob")  # no such notebook path: unknown, never "no kernels"
        refused = await servers.kernels(NS, "nb.bob")  # not a DNS label: not contacted
    finally:
        await servers.close()
        await shutdown_kernel(js.url, js.token, kid)
    assert got.error is None and [k.kernel_id for k in got.kernels] == [kid]
    assert after == before  # reading the notebook server is not activity (no_track_activity)
    assert got.kernels[0].gateway == KUBEFLOW_GATEWAY
    assert other.kernels is None and "HTTP 404" in str(other.error)
    assert refused.kernels is None and "not contacted" in str(refused.error)


async def test_item6_kubeflow_token_file_follows_rotation(notebook_server: JupyterProcess, tmp_path: Path) -> None:
    """The Kubeflow token is a token file like the others (issue 10 item 6): a rotated file is used at once."""
    js = notebook_server
    token_file = tmp_path / "kf-token"
    token_file.write_text("zq-not-the-token\n")
    port = js.extra["port"]
    servers = NotebookServers(KubeflowSettings(notebook_url=f"http://127.0.0.1:{port}/notebook/{{namespace}}/{{name}}",
                                               token_file=str(token_file)))
    try:
        refused = await servers.kernels(NS, NB)
        fresh = tmp_path / "kf-token.new"
        fresh.write_text(js.token + "\n")
        fresh.replace(token_file)  # how a Secret update lands
        accepted = await servers.kernels(NS, NB)
    finally:
        await servers.close()
    assert refused.kernels is None and refused.error is not None  # the wrong token: unknown, never "no kernels"
    assert accepted.error is None and accepted.kernels == ()


async def test_invariant_19_notebook_server_clock_is_checked(notebook_server: JupyterProcess,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook server's Date header is compared with our clock, as a gateway's is: its kernels carry the skew."""
    js = notebook_server
    kid = await start_kernel(js.url, js.token)
    monkeypatch.setenv("KF_TOKEN", js.token)
    settings = KubeflowSettings(notebook_url=f"http://127.0.0.1:{js.extra['port']}/notebook/{{namespace}}/{{name}}",
                                token_env="KF_TOKEN")
    in_step, ours_ahead = NotebookServers(settings), NotebookServers(settings, clock=lambda: time.time() + 600)
    try:
        agreed = await in_step.kernels(NS, NB)
        skewed = await ours_ahead.kernels(NS, NB)
    finally:
        await in_step.close()
        await ours_ahead.close()
        await shutdown_kernel(js.url, js.token, kid)
    assert agreed.kernels and abs(agreed.kernels[0].clock_skew) < 30  # positive control: clocks agree
    assert skewed.kernels and abs(skewed.kernels[0].clock_skew + 600) < 30  # the server is 10 min behind us


async def _server_activity(js: JupyterProcess) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{js.url}/api/status", params={"no_track_activity": "1"},
                                                   headers={"Authorization": f"token {js.token}"}) as r:
        return (await r.json())["last_activity"]


async def test_stop_notebook_e2e(notebook_server: JupyterProcess, fake_nvml: FakeNvml,
                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The daemon in enforce mode: a Kubeflow notebook pod (fake API server, real client) whose kernel (real, in the
    real notebook server) holds an idle GPU; a second kernel of the same server is busy at first, which keeps the
    notebook; once it is idle too, the daemon stops the Notebook, the controller deletes the pod, and the allocation
    is verified released."""
    js = notebook_server
    kid, other = await start_kernel(js.url, js.token), await start_kernel(js.url, js.token)
    await kernel_pid(js.url, js.token, kid)
    await run_code(js.url, js.token, other, "import time; time.sleep(4)", wait=False)
    await wait_for_state(js.url, js.token, other, "busy")
    with FakeKube() as api:
        cid = "d" * 64
        pod = api.add_notebook_pod(NB, namespace=NS, node="node-1", container_ids=[f"containerd://{cid}"])
        api.add_notebook(NB, namespace=NS)
        kubelet = FakeKubelet(tmp_path / "kubelet.sock").start()
        try:
            kubelet.pods = [kubelet_pod(f"{NB}-0", NS, {NB: [("nvidia.com/gpu", [gpu_uuid(0)])]})]
            proc = FakeProc(tmp_path / "proc")  # the kernel process as the node sees it: in the pod's cgroup
            proc.add(7001, cmdline=kernel_cmdline(kid), cgroup=pod_cgroup(pod["metadata"]["uid"], cid))
            fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)],
                            processes=[FakeProcess(pid=7001, gpu=0, memory=6 * GIB)])
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(api.kubeconfig())
            monkeypatch.setenv("KF_E2E_TOKEN", js.token)
            settings = parse_settings(f"""
mode: enforce
node_name: node-1
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
procfs_root: "{proc.root}"
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{kubelet.socket_path}",
              resync_interval: 1s, timeout: 2s}}
kubeflow: {{notebook_url: "http://127.0.0.1:{js.extra['port']}/notebook/{{namespace}}/{{name}}", token_env: KF_E2E_TOKEN}}
policies: [{{name: notebooks, idle_after: 3s, warn_before: 1s, action: stop-notebook}}]
limits: {{max_fraction_per_cycle: 1.0}}
""")
            daemon = Daemon(settings, build_adapters(settings))
            seen: list[Any] = []
            daemon.on_cycle = lambda snap, results: seen.append((snap, list(results)))
            task = asyncio.create_task(daemon.run(serve=False))
            try:
                deadline = time.monotonic() + 60
                while not any(r.result == "released" for _, rs in seen for r in rs):
                    if any(r.result == "success" for _, rs in seen for r in rs):
                        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[])
                        kubelet.pods = []
                    assert time.monotonic() < deadline and not task.done(), [d.reason for s, _ in seen[-1:]
                                                                              for d in s.decisions]
                    await asyncio.sleep(0.1)
            finally:
                daemon.stop()
                await asyncio.wait_for(task, 20)
        finally:
            kubelet.stop()
        decisions = [d for s, _ in seen for d in s.decisions if d.candidate.kernel_id == kid]
        assert decisions[0].candidate.activity.gateway == KUBEFLOW_GATEWAY
        assert decisions[0].candidate.notebook is not None and decisions[0].candidate.notebook.name == NB
        assert any(f"stop-notebook would also end kernel {other}" in d.reason for d in decisions)  # kept at first
        (done,) = [r for _, rs in seen for r in rs if r.result == "success"]
        assert done.decision.action is ActionKind.STOP_NOTEBOOK and "kubeflow-resource-stopped=" in done.detail
        (released,) = [r for _, rs in seen for r in rs if r.result == "released"]
        assert released.released_gpus == 1
        assert "kubeflow-resource-stopped" in api.notebooks[(NS, NB)]["metadata"]["annotations"]
        assert api.evictions == [] and api.deletes == []
        warned = [e for e in api.events if e["reason"] == "GPUIdleWarning"]
        assert warned and warned[0]["regarding"]["name"] == f"{NB}-0"
    await shutdown_kernel(js.url, js.token, kid)
    await shutdown_kernel(js.url, js.token, other)
