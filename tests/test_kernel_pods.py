"""Kernel pods in Kubernetes (issue 13 items 1 and 2): Enterprise Gateway's kernel pods (bare pods labelled by EG's
kernel-pod.yaml.j2: kernel_id, app: enterprise-gateway, component: kernel) and elastic-jupyter-operator's (a
JupyterKernel owns a Deployment whose pods carry namespace / kernel / kernel_id labels). Their GPU processes are
attributed by the pod's kernel_id label; they are reclaimed through the gateway only (which deletes the pod: the
allocation is released); eviction is never offered, and the reason says why. Pods come from the fake API server
through the real kubernetes client; processes from a fake /proc tree."""

from __future__ import annotations

import dataclasses

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from reclaimer.core import actionkinds
from reclaimer.observe.attribution import Attributor
from reclaimer.core.candidates import join
from reclaimer.core.config import KubernetesSettings, parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.observe.kube import PodCache
from reclaimer.core.actions import ActionKind, Recovers
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import Candidate, PodGpuAllocation, PolicyState, ProcessSample
from reclaimer.core.policy import decide
from tests.support.fake_kube import FakeKube
from tests.support.fake_kubelet import FakeKubelet
from tests.support.fake_kubelet import pod as kubelet_pod
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    auth,
    start_kernel,
    wake_kernel,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.support.policy_fixtures import NOW, UUID0, WARNED, activity, make_settings, policy, series, snapshot
from tests.support.procfs_fixtures import SAMPLES, FakeProc, pod_cgroup

EG_KID = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c"
ELASTIC_KID = "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d"
IDLE_KID = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
NODE = "node-1"
GIB = 1024**3
CID = {"eg": "a" * 64, "elastic": "b" * 64, "idle": "c" * 64}
UUIDS = {"eg": UUID0, "elastic": "GPU-22222222-2222-2222-2222-222222222222",
         "idle": "GPU-33333333-3333-3333-3333-333333333333"}


def _eg_pod(api: FakeKube, name: str, kid: str, cid: str, user: str = "alice") -> dict[str, Any]:
    # As EG's etc/kernel-launchers/kubernetes/scripts/kernel-pod.yaml.j2 writes it, plus the user label docs suggest.
    return api.add_pod(name, namespace="eg-kernels", node=NODE, container_ids=[f"containerd://{cid}"],
                       labels={"kernel_id": kid, "app": "enterprise-gateway", "component": "kernel",
                               "source": "kernel-pod.yaml", "kernel_username": user},
                       annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"})


@pytest.fixture
def world(tmp_path: Path) -> Any:
    """Three kernel pods on node-1 (EG with a GPU process, elastic with a GPU process, EG holding a GPU with no
    process), read through the real client; the processes in a fake /proc, their cgroups naming the pods."""
    with FakeKube() as api:
        eg = _eg_pod(api, f"alice-{EG_KID}", EG_KID, CID["eg"])
        idle = _eg_pod(api, f"bob-{IDLE_KID}", IDLE_KID, CID["idle"], user="bob")
        elastic = api.add_pod("kernel-k1-6d5c7b9f8-x2x4q", namespace="team-a", node=NODE,
                              owner=("ReplicaSet", "kernel-k1-6d5c7b9f8"),
                              container_ids=[f"containerd://{CID['elastic']}"],
                              labels={"namespace": "team-a", "kernel": "k1", "kernel_id": ELASTIC_KID})
        settings = KubernetesSettings(user_label="kernel_username")
        cache = PodCache(api.kube_client(settings, node_name=NODE), NODE, settings)
        assert cache.refresh()
        proc = FakeProc(tmp_path / "proc")
        launcher = (SAMPLES / "cmdline" / "enterprise-gateway-launcher.bin").read_bytes().rstrip(b"\0").split(b"\0")
        proc.add(101, cmdline=[a.decode() for a in launcher], cgroup=pod_cgroup(eg["metadata"]["uid"], CID["eg"]))
        proc.add(102, cmdline=["python", "-m", "ipykernel_launcher", "--RemoteProcessProxy.kernel-id", ELASTIC_KID],
                 cgroup=pod_cgroup(elastic["metadata"]["uid"], CID["elastic"]))
        attributed = Attributor(proc.root).attribute(
            [(UUIDS["eg"], ProcessSample(101, 3 * GIB)), (UUIDS["elastic"], ProcessSample(102, 2 * GIB))],
            pod_kernel_ids=cache.kernel_ids())
        pods = {p.uid: p for p in cache.pods()}
        allocations = [PodGpuAllocation(p["metadata"]["namespace"], p["metadata"]["name"], "kernel", (UUIDS[k],))
                       for k, p in (("eg", eg), ("elastic", elastic), ("idle", idle))]
        result = join(node=NODE, processes=attributed, pods_by_uid=pods, allocations=allocations,
                      activities={kid: activity(kid, gateway="eg") for kid in (EG_KID, ELASTIC_KID)},
                      kernel_pods=cache.kernel_ids())
        yield {c.kernel_id or c.pod.name: c for c in result.candidates}, result, api


def _decide(c: Candidate, action: str) -> Any:
    start = NOW - 6 * 3600
    procs = (ProcessSample(4242, GIB),) if c.kernel_id else ()  # a pod candidate holds GPUs with no process on them
    sampled = [series(u, i, start=start, processes=procs) for i, u in enumerate(UUIDS.values())]
    c = dataclasses.replace(c, held_since=start, pod_listed_at=NOW - 1)  # invariants 10, 16: held long, fresh pod
    # Bare allocations opted in: these tests are about kernel pods (invariant 12 tests bare pods on their own).
    settings = make_settings(policies=[policy(action=action, reclaim_bare_allocations=True)])
    (d,) = decide([c], snapshot(*sampled, started_at=start), settings, NOW, WARNED)  # invariant 11: warned long ago
    return d


def test_kernel_pods_are_attributed_by_their_labels(world: Any) -> None:
    by_key, result, _ = world
    assert not result.unattributed
    eg, elastic = by_key[EG_KID], by_key[ELASTIC_KID]
    # EG's launcher command line names no connection file: the pod's kernel_id label names the kernel.
    assert [p.kernel_id for p in eg.processes] == [EG_KID] and eg.kernel_pod and eg.allocated
    assert eg.user == "alice" and eg.pod is not None and eg.pod.controller is None  # bare, as EG creates it
    assert [p.kernel_id for p in elastic.processes] == [ELASTIC_KID] and elastic.kernel_pod
    assert elastic.pod is not None and elastic.pod.controller is not None
    assert elastic.pod.controller.kind == "ReplicaSet"
    idle = by_key[f"bob-{IDLE_KID}"]
    assert idle.kernel_id is None and idle.kernel_pod and idle.allocated


@pytest.mark.parametrize("action", ["shutdown-kernel", "auto"])
@pytest.mark.parametrize("which", ["eg", "elastic"])
def test_kernel_pods_are_reclaimed_through_the_gateway_releasing_the_allocation(world: Any, which: str,
                                                                               action: str) -> None:
    by_key, _, _ = world
    c = by_key[EG_KID if which == "eg" else ELASTIC_KID]
    d = _decide(c, action)
    assert d.verdict is Verdict.RECLAIM and d.action is ActionKind.SHUTDOWN_KERNEL, d.reason
    assert actionkinds.recovers(d.action, c) is Recovers.ALLOCATION


@pytest.mark.parametrize(
    "which, words",
    [
        pytest.param("eg", ["is a kernel pod of Enterprise Gateway", "eviction is not offered",
                            "shut the kernel down through its gateway"], id="enterprise-gateway"),
        pytest.param("elastic", ["kernel pod of elastic-jupyter-operator JupyterKernel k1 (through its Deployment)",
                                 "owned by ReplicaSet kernel-k1-6d5c7b9f8", "eviction is not offered",
                                 "shut the kernel down through its gateway"], id="elastic-jupyter-operator"),
        pytest.param("idle", ["is a kernel pod of Enterprise Gateway", "its kernel holds no GPU process"],
                     id="eg-pod-without-gpu-process"),
    ],
)
def test_kernel_pods_are_never_evicted_and_the_report_says_why(world: Any, which: str, words: list[str]) -> None:
    by_key, _, api = world
    c = by_key[{"eg": EG_KID, "elastic": ELASTIC_KID, "idle": f"bob-{IDLE_KID}"}[which]]
    d = _decide(c, "evict-pod")
    assert d.verdict is Verdict.KEEP, d.reason
    for w in words:
        assert w in d.reason, d.reason
    assert api.evictions == [] and api.deletes == []


def test_positive_control_a_bare_pod_that_is_no_kernel_pod_may_be_evicted(world: Any) -> None:
    by_key, _, _ = world
    c = by_key[f"bob-{IDLE_KID}"]
    plain = Candidate(key=c.key, node=c.node, pod=c.pod, user=c.user, gpu_uuids=c.gpu_uuids, allocated=True)
    d = _decide(plain, "evict-pod")
    assert d.verdict is Verdict.RECLAIM and d.action is ActionKind.EVICT_POD, d.reason


# --------------------------------------------------------------------------- end to end: a real EG, its kernel "in a pod"


async def test_eg_kernel_pod_reclaimed_through_the_real_enterprise_gateway_e2e(
    enterprise_gateway: JupyterProcess, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The daemon in enforce mode with action auto, against a real Enterprise Gateway whose kernel the node sees in
    an EG-labelled kernel pod (fake API server, real client; the kernel's process in the pod's cgroup through a fake
    /proc). auto picks shutdown-kernel through EG (the pod is the kernel's own: recovers the allocation), never an
    eviction; the kernel is gone from EG; the pod's removal (EG deletes it in a cluster) is verified as released."""
    eg = enterprise_gateway
    kid = await start_kernel(eg.url, eg.token, env=eg.extra["kernel_env"])
    await wake_kernel(eg.url, eg.token, kid)
    with FakeKube() as api:
        pod = _eg_pod(api, f"alice-{kid}", kid, CID["eg"])
        kubelet = FakeKubelet(tmp_path / "kubelet.sock").start()
        try:
            kubelet.pods = [kubelet_pod(f"alice-{kid}", "eg-kernels", {"kernel": [("nvidia.com/gpu", [gpu_uuid(0)])]})]
            proc = FakeProc(tmp_path / "proc")
            launcher = (SAMPLES / "cmdline" / "enterprise-gateway-launcher.bin").read_bytes().rstrip(b"\0")
            proc.add(8001, cmdline=[a.decode() for a in launcher.split(b"\0")],
                     cgroup=pod_cgroup(pod["metadata"]["uid"], CID["eg"]))
            fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)],
                            processes=[FakeProcess(pid=8001, gpu=0, memory=5 * GIB)])
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(api.kubeconfig())
            monkeypatch.setenv("EG_POD_TOKEN", eg.token)
            settings = parse_settings(f"""
mode: enforce
node_name: {NODE}
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
procfs_root: "{proc.root}"
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
gateways: [{{name: eg, url: "{eg.url}", kind: enterprise-gateway, token_env: EG_POD_TOKEN}}]
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{kubelet.socket_path}",
              resync_interval: 1s, timeout: 2s, user_label: kernel_username}}
policies: [{{name: eg-pods, idle_after: 3s, warn_before: 1s, action: auto}}]
limits: {{max_fraction_per_cycle: 1.0}}
""")
            daemon = Daemon(settings, build_adapters(settings))
            seen: list[Any] = []
            daemon.on_cycle = lambda snap, results: seen.append((snap, list(results)))
            task = asyncio.create_task(daemon.run(serve=False))
            try:
                deadline = time.monotonic() + 60
                while not any(r.result == "released" for _, rs in seen for r in rs):
                    if any(r.result == "success" for _, rs in seen for r in rs):  # what EG does in a cluster
                        with api._lock:
                            api.pods.pop(("eg-kernels", f"alice-{kid}"), None)
                        kubelet.pods = []
                        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[])
                    assert time.monotonic() < deadline and not task.done(), [d.reason for s, _ in seen[-1:]
                                                                              for d in s.decisions]
                    await asyncio.sleep(0.1)
            finally:
                daemon.stop()
                await asyncio.wait_for(task, 20)
        finally:
            kubelet.stop()
        (done,) = [r for _, rs in seen for r in rs if r.result == "success"]
        c = done.decision.candidate
        assert done.decision.action is ActionKind.SHUTDOWN_KERNEL and c.kernel_id == kid and c.kernel_pod
        assert c.user == "alice" and c.gateway == "eg" and "gateway eg" in done.detail
        assert actionkinds.recovers(done.decision.action, c) is Recovers.ALLOCATION
        assert "auto: shutdown-kernel (the gateway deletes the kernel pod) releases the GPU allocation" in \
            done.decision.reason
        assert api.evictions == [] and api.deletes == []
    status = await _eg_status(eg, kid)
    assert status == 404  # ended through EG itself


async def _eg_status(eg: JupyterProcess, kid: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{eg.url}/api/kernels/{kid}", headers=auth(eg.token)) as r:
        return r.status
