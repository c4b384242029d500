"""Invariant 17 (issue 9, class 8): only actions that release something; say what each action recovers.

Table tests over the pure parts (owner parsing, the action-kind table, the policy, ``auto``), the live executor
against the fake API server (the real ``kubernetes`` client), and the allocation-release check.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reclaimer.core import actionkinds
from reclaimer.act.actions import LiveExecutor
from reclaimer.core.config import parse_settings
from reclaimer.observe.kube import pod_info_from_json
from reclaimer.export.metrics import ACTIONS, Metrics
from reclaimer.core.actions import ActionKind, Recovers
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult, Candidate, Decision, OwnerRef, PodGpuAllocation, PodInfo, ServerRef
from reclaimer.core.model import PolicyState
from reclaimer.core.policy import decide, recheck
from tests.support.fake_kube import FakeKube, Reply
from tests.support.fake_kubelet import FakeKubelet
from tests.support.fake_kubelet import pod as fk_pod
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, gpu_uuid
from tests.support.policy_fixtures import (
    WARNED,
    warn_then_execute,
    KID,
    KID2,
    NODE,
    NOW,
    POD_UID,
    UUID0,
    activity,
    kernel,
    make_settings,
    pod,
    pod_candidate,
    policy,
    process,
    series,
    server,
    snapshot,
)

# --------------------------------------------------------------------------- owners as the API server writes them


def _pod_json(owner_refs: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"uid": POD_UID, "namespace": "team-a", "name": "nb"}
    if owner_refs is not ...:
        meta["ownerReferences"] = owner_refs
    return {"metadata": meta, "spec": {"nodeName": NODE}, "status": {"phase": "Running"}}


def ref(kind: str, name: str, controller: Any = True, api: str = "apps/v1") -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": api, "kind": kind, "name": name, "uid": "0000"}
    if controller is not ...:
        out["controller"] = controller
    return out


@pytest.mark.parametrize(
    "owner_refs,controller,known",
    [
        pytest.param(..., None, True, id="no-owner-references"),
        pytest.param([], None, True, id="empty-list"),
        pytest.param([ref("ReplicaSet", "nb-7f9")], ("ReplicaSet", "nb-7f9"), True, id="replicaset"),
        pytest.param([ref("StatefulSet", "nb-alice")], ("StatefulSet", "nb-alice"), True, id="statefulset"),
        pytest.param([ref("DaemonSet", "ds")], ("DaemonSet", "ds"), True, id="daemonset"),
        pytest.param([ref("Job", "train", api="batch/v1")], ("Job", "train"), True, id="job"),
        pytest.param([ref("JupyterKernel", "k1", api="kubeflow.tkestack.io/v1alpha1")], ("JupyterKernel", "k1"), True,
                     id="elastic-jupyter-operator-kernel"),
        pytest.param([ref("Notebook", "nb", api="kubeflow.org/v1")], ("Notebook", "nb"), True, id="kubeflow-notebook"),
        pytest.param([ref("Node", "gpu-node-1", api="v1")], ("Node", "gpu-node-1"), True, id="static-pod"),
        pytest.param([ref("ConfigMap", "cm", controller=False)], None, True, id="owner-that-is-not-a-controller"),
        pytest.param([ref("ConfigMap", "cm", controller=...)], None, True, id="controller-field-absent"),
        pytest.param([ref("ConfigMap", "cm", controller=False), ref("Job", "j")], ("Job", "j"), True,
                     id="controller-is-the-second-reference"),
        pytest.param([ref("ReplicaSet", "rs", controller="true")], ("ReplicaSet", "rs"), False,
                     id="controller-not-a-boolean-fails-closed"),
        pytest.param("ReplicaSet/rs", None, False, id="not-a-list"),
        pytest.param([{"kind": "ReplicaSet"}], None, False, id="reference-without-name"),
        pytest.param(["x"], None, False, id="reference-not-an-object"),
    ],
)
def test_invariant_17_owner_references_are_parsed_for_the_controller(
    owner_refs: Any, controller: tuple[str, str] | None, known: bool
) -> None:
    info = pod_info_from_json(_pod_json(owner_refs), "hub.jupyter.org/username")
    got = (info.controller.kind, info.controller.name) if info.controller is not None else None
    assert (got, info.owners_known) == (controller, known)
    if controller is not None:  # owner_kind / owner_name name the controller first
        assert (info.owner_kind, info.owner_name) == controller


def test_invariant_17_owner_references_through_the_real_client() -> None:
    with FakeKube() as api:
        api.add_pod("nb-alice-0", node=NODE, owner=("StatefulSet", "nb-alice"), labels={"notebook-name": "nb-alice"})
        api.add_pod("bare", node=NODE)
        pods = {p.name: p for p in api.kube_client(node_name=NODE).list_pods_on_node()}
    assert pods["nb-alice-0"].controller == OwnerRef("StatefulSet", "nb-alice", "v1", True)
    assert pods["bare"].controller is None and pods["bare"].owners_known


# --------------------------------------------------------------------------- what each action recovers


def owned(kind: str, name: str = "owner", labels: dict[str, str] | None = None) -> PodInfo:
    return replace(pod(labels=labels), owners=(OwnerRef(kind, name, "apps/v1", True),))


BARE = pod()
SERVER = server("alice", "")  # listed by the hub this cycle, its own activity old
STS_KUBEFLOW = owned("StatefulSet", "nb-alice", {"notebook-name": "nb-alice"})


def k(pod_info: PodInfo | None = BARE, *, allocated: bool = True, server: ServerRef | None = None,
      kernel_pod: bool = False, shared: bool = False) -> Candidate:
    c = kernel(pod_info=pod_info, server=server)
    return replace(c, allocated=allocated and pod_info is not None,
                   allocated_gpus=(UUID0,) if allocated and pod_info is not None else (), kernel_pod=kernel_pod,
                   shared_gpu=shared)


def p(pod_info: PodInfo = BARE, server: ServerRef | None = None) -> Candidate:
    return replace(pod_candidate(pod_info, server=server), allocated_gpus=(UUID0,))


A, M, N = Recovers.ALLOCATION, Recovers.MEMORY, Recovers.NONE


@pytest.mark.parametrize(
    "action,candidate,expected",
    [
        pytest.param(ActionKind.SHUTDOWN_KERNEL, k(), M, id="shutdown-kernel-in-notebook-pod-frees-memory-only"),
        pytest.param(ActionKind.SHUTDOWN_KERNEL, k(shared=True), M, id="shutdown-kernel-on-shared-gpu-frees-memory"),
        pytest.param(ActionKind.SHUTDOWN_KERNEL, k(None), M, id="shutdown-kernel-outside-kubernetes"),
        pytest.param(ActionKind.SHUTDOWN_KERNEL, k(kernel_pod=True), A, id="shutdown-kernel-of-eg-kernel-pod"),
        pytest.param(ActionKind.SHUTDOWN_KERNEL, k(owned("JupyterKernel"), kernel_pod=True), A,
                     id="shutdown-kernel-of-operator-kernel-pod"),
        pytest.param(ActionKind.SHUTDOWN_KERNEL, k(kernel_pod=True, allocated=False), M,
                     id="kernel-pod-without-known-allocation"),
        pytest.param(ActionKind.SHUTDOWN_KERNEL, p(), N, id="shutdown-kernel-of-a-pod-without-kernel"),
        pytest.param(ActionKind.STOP_SERVER, k(server=SERVER), A, id="stop-server-releases-the-allocation"),
        pytest.param(ActionKind.STOP_SERVER, k(None, server=SERVER), M, id="stop-server-outside-kubernetes"),
        pytest.param(ActionKind.STOP_SERVER, p(server=SERVER), A, id="stop-server-of-an-idle-allocation"),
        pytest.param(ActionKind.EVICT_POD, k(), A, id="evict-bare-pod-with-kernel"),
        pytest.param(ActionKind.EVICT_POD, p(), A, id="evict-bare-pod"),
        pytest.param(ActionKind.EVICT_POD, k(allocated=False), M, id="evict-pod-without-known-allocation"),
        pytest.param(ActionKind.EVICT_POD, k(None), N, id="evict-without-pod"),
        pytest.param(ActionKind.EVICT_POD, p(owned("ReplicaSet")), N, id="evict-replicaset-pod"),
        pytest.param(ActionKind.EVICT_POD, p(STS_KUBEFLOW), N, id="evict-kubeflow-notebook-pod"),
        pytest.param(ActionKind.EVICT_POD, p(replace(BARE, owners_known=False)), N, id="evict-owners-unknown"),
        pytest.param(ActionKind.NONE, k(), N, id="none"),
        pytest.param(ActionKind.AUTO, k(), N, id="auto-is-resolved-before-anything-acts"),
    ],
)
def test_invariant_17_what_each_action_recovers(action: ActionKind, candidate: Candidate, expected: Recovers) -> None:
    assert actionkinds.recovers(action, candidate) is expected


def test_invariant_17_one_table_of_action_kinds() -> None:
    executable = {ActionKind.SHUTDOWN_KERNEL, ActionKind.STOP_SERVER, ActionKind.EVICT_POD, ActionKind.STOP_NOTEBOOK}
    assert set(actionkinds.EXECUTABLE) == executable
    assert set(ACTIONS) == {a.value for a in executable}  # metric labels come from the table
    assert actionkinds.EVENT_ACTIONS == {ActionKind.SHUTDOWN_KERNEL: "ShutdownKernel",
                                         ActionKind.STOP_SERVER: "StopServer", ActionKind.EVICT_POD: "EvictPod",
                                         ActionKind.STOP_NOTEBOOK: "StopNotebook"}
    assert LiveExecutor()._executors().keys() == executable  # every executable kind has an executor


# --------------------------------------------------------------------------- the policy never plans a useless eviction


def evict_settings(action: str = "evict-pod", **extra: Any):
    # These tests are about what each action releases; bare allocations are opted in (invariant 12 tests the rest).
    return make_settings(policies=[policy(action=action, **{"reclaim_bare_allocations": True, **extra})])


def decide_one(c: Candidate, settings) -> Decision:
    (d,) = decide([c], snapshot(), settings, NOW, WARNED)
    return d


@pytest.mark.parametrize(
    "pod_info,verdict,words",
    [
        pytest.param(owned("ReplicaSet", "nb-7f9"), Verdict.KEEP,
                     ["pod is owned by ReplicaSet nb-7f9; eviction would be recreated", "scale down or delete its "
                      "ReplicaSet nb-7f9"], id="replicaset"),
        pytest.param(owned("Deployment", "web"), Verdict.KEEP, ["owned by Deployment web"], id="deployment"),
        pytest.param(owned("StatefulSet", "db"), Verdict.KEEP, ["owned by StatefulSet db; eviction would be"],
                     id="statefulset"),
        pytest.param(STS_KUBEFLOW, Verdict.KEEP,
                     ["pod is owned by StatefulSet nb-alice (Kubeflow Notebook nb-alice); eviction would be "
                      "recreated — use stop-notebook"], id="kubeflow-notebook-statefulset"),
        pytest.param(owned("Notebook", "nb"), Verdict.KEEP, ["owned by Notebook nb", "use stop-notebook"],
                     id="kubeflow-notebook-owner"),
        pytest.param(owned("DaemonSet", "ds"), Verdict.KEEP, ["owned by DaemonSet ds"], id="daemonset"),
        pytest.param(owned("Job", "train"), Verdict.KEEP, ["owned by Job train"], id="job"),
        pytest.param(owned("JupyterKernel", "k1"), Verdict.KEEP,
                     ["owned by JupyterKernel k1 (elastic-jupyter-operator)", "shut the kernel down through its "
                      "gateway"], id="elastic-jupyter-operator"),
        pytest.param(owned("Node", "gpu-node-1"), Verdict.KEEP, ["a static pod"], id="static-pod"),
        pytest.param(replace(BARE, owners_known=False), Verdict.UNKNOWN, ["ownerReferences unreadable"],
                     id="owners-unreadable-is-unknown"),
        pytest.param(replace(BARE, owners=(OwnerRef("ConfigMap", "cm", "v1", False),)), Verdict.RECLAIM, [],
                     id="non-controller-owner-positive-control"),
        pytest.param(BARE, Verdict.RECLAIM, [], id="bare-pod-positive-control"),
    ],
)
def test_invariant_17_never_evict_a_pod_its_controller_recreates(
    pod_info: PodInfo, verdict: Verdict, words: list[str]
) -> None:
    c = k(pod_info)
    if pod_info.controller is not None and pod_info.controller.kind == "JupyterKernel":
        c = replace(c, kernel_pod=True)
    d = decide_one(c, evict_settings())
    assert d.verdict is verdict, d.reason
    for w in words:
        assert w in d.reason
    if verdict is Verdict.KEEP:
        assert d.eta_seconds is None and actionkinds.recovers(d.action, d.candidate) is Recovers.NONE
        assert "GPU 0 at 0%" in d.reason  # the idle evidence is still shown


def test_invariant_17_pod_candidate_of_a_controller_is_never_evicted_and_says_what_works() -> None:
    d = decide_one(p(owned("ReplicaSet", "rs")), evict_settings())
    assert d.verdict is Verdict.KEEP
    assert "no action of gpu-reclaimer" not in d.reason and "scale down or delete its ReplicaSet rs" in d.reason
    d = decide_one(p(owned("ReplicaSet", "rs"), server=SERVER), evict_settings())
    assert d.verdict is Verdict.KEEP and "use stop-server" in d.reason


# --------------------------------------------------------------------------- auto


@pytest.mark.parametrize(
    "candidate,action,recovers,words",
    [
        pytest.param(k(kernel_pod=True), ActionKind.SHUTDOWN_KERNEL, A, "the gateway deletes the kernel pod",
                     id="eg-kernel-pod"),
        pytest.param(k(server=SERVER), ActionKind.STOP_SERVER, A, "auto: stop-server releases the GPU allocation",
                     id="kubespawner-kernel"),
        pytest.param(k(), ActionKind.EVICT_POD, A, "a pod no controller recreates", id="bare-pod-kernel"),
        pytest.param(k(STS_KUBEFLOW), ActionKind.SHUTDOWN_KERNEL, M,
                     "frees GPU memory only, the pod keeps its GPU allocation (use stop-notebook)",
                     id="kubeflow-kernel-memory-only"),
        pytest.param(k(owned("ReplicaSet", "rs")), ActionKind.SHUTDOWN_KERNEL, M,
                     "scale down or delete its ReplicaSet rs", id="replicaset-kernel-memory-only"),
        pytest.param(k(allocated=False), ActionKind.SHUTDOWN_KERNEL, M, "no GPU allocation known",
                     id="allocation-unknown-takes-the-mildest"),
        pytest.param(k(None), ActionKind.SHUTDOWN_KERNEL, M, "auto: shutdown-kernel frees the GPU memory",
                     id="outside-kubernetes"),
        pytest.param(k(replace(BARE, owners_known=False)), ActionKind.SHUTDOWN_KERNEL, M, "frees GPU memory only",
                     id="owners-unreadable-kernel"),
        pytest.param(p(), ActionKind.EVICT_POD, A, "a pod no controller recreates", id="bare-idle-allocation"),
        pytest.param(p(server=SERVER), ActionKind.STOP_SERVER, A, "stop-server", id="idle-allocation-of-a-server"),
    ],
)
def test_invariant_17_auto_picks_the_action_that_releases_the_allocation(
    candidate: Candidate, action: ActionKind, recovers: Recovers, words: str
) -> None:
    d = decide_one(candidate, evict_settings("auto"))
    assert (d.verdict, d.action, d.requested) == (Verdict.RECLAIM, action, ActionKind.AUTO), d.reason
    assert actionkinds.recovers(d.action, d.candidate) is recovers
    assert words in d.reason


def test_invariant_17_auto_never_evicts_a_controller_pod_candidate() -> None:
    d = decide_one(p(STS_KUBEFLOW), evict_settings("auto"))
    assert d.verdict is Verdict.KEEP and "use stop-notebook" in d.reason
    d = decide_one(p(replace(BARE, owners_known=False)), evict_settings("auto"))
    assert d.verdict is Verdict.UNKNOWN


def test_invariant_17_auto_falls_back_to_the_kernel_when_its_server_is_not_idle() -> None:
    """Two kernels of one server pod, one busy: stop-server would end it, so auto shuts the idle one down only."""
    idle = k(server=SERVER)
    busy = replace(kernel(KID2, server=SERVER, act=activity(KID2, state="busy"),
                          processes=(process(5555, kernel_id=KID2),)), allocated=True, allocated_gpus=(UUID0,))
    decisions = {d.candidate.kernel_id: d for d in
                 decide([idle, busy], snapshot(), evict_settings("auto"), NOW, WARNED)}
    d = decisions[KID]
    assert (d.verdict, d.action) == (Verdict.RECLAIM, ActionKind.SHUTDOWN_KERNEL), d.reason
    assert d.reason.startswith("auto: shutdown-kernel frees GPU memory only, the pod keeps its GPU allocation "
                               f"(stop-server would also end kernel:{KID2}")
    assert actionkinds.recovers(d.action, d.candidate) is Recovers.MEMORY
    assert decisions[KID2].verdict is Verdict.KEEP
    # The re-check right before acting accepts the milder plan (it would otherwise never act: a livelock).
    assert recheck(d, idle.activity, snapshot(), evict_settings("auto"), NOW) is d


def test_invariant_17_auto_positive_control_whole_server_idle_stops_it() -> None:
    other = replace(kernel(KID2, server=SERVER, processes=(process(5555, kernel_id=KID2),)), allocated=True,
                    allocated_gpus=(UUID0,))
    decisions = decide([k(server=SERVER), other], snapshot(), evict_settings("auto", **{}),
                       NOW, WARNED)
    actions = {d.action for d in decisions if d.verdict is Verdict.RECLAIM}
    assert actions == {ActionKind.STOP_SERVER}


def test_invariant_17_auto_is_a_valid_config_value_and_the_example_default() -> None:
    s = parse_settings("policies: [{name: a, action: auto}]", "<test>")
    assert s.policies[0].action == "auto"
    from pathlib import Path

    import yaml

    example = yaml.safe_load((Path(__file__).parent.parent / "examples/config.yaml").read_text())
    assert example["policies"][-1]["action"] == "auto"
    with pytest.raises(Exception, match="action"):
        parse_settings("policies: [{name: a, action: automatic}]", "<test>")


# --------------------------------------------------------------------------- the executor and the release check


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def api() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


def live_pod_decision(api: FakeKube, *, owner: tuple[str, str] | None = None) -> Decision:
    stored = api.add_pod("nb-alice", namespace="team-a", node=NODE, owner=owner)
    info = pod_info_from_json(stored, "hub.jupyter.org/username")
    cand = Candidate(key=f"pod:{info.uid}", node=NODE, pod=info, gpu_uuids=(UUID0,), allocated=True,
                     allocated_gpus=(UUID0,))
    return Decision(cand, Verdict.RECLAIM, ActionKind.EVICT_POD, "idle", policy="p", idle_seconds=1800, eta_seconds=0)


async def _still(d: Decision) -> Decision:
    return d


async def test_invariant_17_executor_refuses_a_controller_pod_even_if_planned(api: FakeKube) -> None:
    ex = LiveExecutor(kube=api.kube_client(node_name=NODE), clock=Clock())
    (r,) = await warn_then_execute(ex, [live_pod_decision(api, owner=("ReplicaSet", "rs"))], recheck=_still)
    assert r.result == "skipped" and "would release nothing" in r.detail
    assert api.evictions == [] and api.deletes == []


def alloc(name: str = "nb-alice", uuid: str = UUID0) -> PodGpuAllocation:
    return PodGpuAllocation("team-a", name, "notebook", (uuid,), (uuid,))


async def test_invariant_17_allocation_released_when_the_pod_is_gone(api: FakeKube) -> None:
    clock = Clock()
    ex = LiveExecutor(kube=api.kube_client(node_name=NODE), clock=clock, verify_within=60)
    (r,) = await warn_then_execute(ex, [live_pod_decision(api)], recheck=_still)
    assert r.result == "success" and ex.pending == 1
    clock.t += 5
    (done,) = await ex.verify_allocations([alloc()], clock.t, clock.t)  # the kubelet still lists it; the GET says 404
    assert (done.result, done.released_gpus) == ("released", 1) and "pod gone" in done.detail
    assert ex.pending == 0


async def test_invariant_17_allocation_not_counted_while_the_pod_is_still_there(api: FakeKube) -> None:
    clock = Clock()
    ex = LiveExecutor(kube=api.kube_client(node_name=NODE), clock=clock, verify_within=60)
    api.eviction_response = Reply(201, {"kind": "Status", "status": "Success"})  # accepted; the pod lingers
    (r,) = await warn_then_execute(ex, [live_pod_decision(api)], recheck=_still)
    assert r.result == "success"
    clock.t += 5
    assert await ex.verify_allocations([alloc()], clock.t, clock.t) == []  # still there, still listed: wait
    assert await ex.verify_allocations(None, clock.t, clock.t) == []  # pod-resources unknown proves nothing
    # A listing taken before the action proves nothing either.
    assert await ex.verify_allocations([], clock.t - 10, clock.t) == []
    clock.t += 60
    (done,) = await ex.verify_allocations([alloc()], clock.t, clock.t)
    assert (done.result, done.released_gpus) == ("unreleased", 0) and "still holds its GPU allocation" in done.detail


async def test_invariant_17_allocation_released_when_pod_resources_drops_the_gpu(api: FakeKube) -> None:
    clock = Clock()
    ex = LiveExecutor(kube=api.kube_client(node_name=NODE), clock=clock, verify_within=60)
    api.eviction_response = Reply(201, {"kind": "Status", "status": "Success"})
    await warn_then_execute(ex, [live_pod_decision(api)], recheck=_still)
    clock.t += 5
    (done,) = await ex.verify_allocations([alloc("someone-else")], clock.t, clock.t)
    assert (done.result, done.released_gpus) == ("released", 1) and "pod-resources" in done.detail


async def test_invariant_17_replaced_pod_counts_as_released(api: FakeKube) -> None:
    clock = Clock()
    ex = LiveExecutor(kube=api.kube_client(node_name=NODE), clock=clock, verify_within=60)
    d = live_pod_decision(api)
    await warn_then_execute(ex, [d], recheck=_still)
    api.add_pod("nb-alice", namespace="team-a", node=NODE)  # the user started a new server under the same name
    clock.t += 5
    (done,) = await ex.verify_allocations([alloc()], clock.t, clock.t)
    assert done.result == "released" and "another uid" in done.detail


async def test_invariant_17_memory_only_action_never_counts_an_allocation(api: FakeKube) -> None:
    """shutdown-kernel in a notebook pod frees memory; the allocation stays, and nothing claims otherwise."""

    class Gateway:
        async def shutdown(self, kernel_id: str) -> tuple[str, str]:
            return "success", "shut down"

    clock = Clock()
    ex = LiveExecutor(kernels=Gateway(), kube=api.kube_client(node_name=NODE), clock=clock)
    c = k()
    (r,) = await warn_then_execute(ex, [Decision(c, Verdict.RECLAIM, ActionKind.SHUTDOWN_KERNEL, "idle", "p", 1800, 0)],
                            recheck=_still)
    assert r.result == "success" and ex.pending == 1  # the memory check only
    clock.t += 500
    done = await ex.verify_allocations([], clock.t, clock.t)
    assert done == []


def test_invariant_17_counters_for_released_gpus_and_allocation_waste() -> None:
    m = Metrics(lambda: None)
    d = Decision(p(), Verdict.RECLAIM, ActionKind.EVICT_POD, "idle", "p", 1800, 0)
    m.record_action(ActionResult(d, "released", "pod gone", mode="enforce", released_gpus=2))
    m.record_action(ActionResult(d, "unreleased", "still there", mode="enforce"))
    m.add_held_idle({"team-a": 3.0}, {"team-b": 5.0})
    text = m.render()[0].decode()
    assert "reclaimer_released_gpus_total 2.0" in text
    assert 'reclaimer_actions_total{action="evict-pod",mode="enforce",result="released"} 1.0' in text
    assert 'reclaimer_actions_total{action="evict-pod",mode="enforce",result="unreleased"} 1.0' in text
    assert 'reclaimer_gpu_held_idle_seconds_total{namespace="team-a"} 3.0' in text
    assert 'reclaimer_gpu_allocation_held_idle_seconds_total{namespace="team-b"} 5.0' in text
    assert 'reclaimer_gpu_allocation_held_idle_seconds_total{namespace="team-a"}' not in text


# --------------------------------------------------------------------------- through the real daemon


@pytest.mark.e2e  # the real daemon, running for seconds
async def test_invariant_17_daemon_never_evicts_a_controller_pod_and_verifies_the_release(
    fake_nvml: FakeNvml, tmp_path: Path
) -> None:
    """Real daemon, real pynvml over the fake NVML library, the real kubernetes client against the fake API server,
    a real gRPC pod-resources server. Three idle GPU allocations, no process on any GPU; policy auto, enforce:
      GPU 0: pod of a ReplicaSet                         -> never evicted (keep, names what would work)
      GPU 1: pod of a Kubeflow Notebook's StatefulSet    -> never evicted (keep, "use stop-notebook")
      GPU 2: a bare pod (positive control)               -> evicted; allocation verified released
    Both waste counters and reclaimer_released_gpus_total are read from the daemon's /metrics.
    """
    from reclaimer.app.daemon import Daemon, build_adapters
    from reclaimer.app.demo import free_port

    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(3)], processes=[])
    with FakeKube() as api, FakeKubelet(tmp_path / "kubelet.sock") as kubelet:
        api.add_pod("web-7f9-x", namespace="team-a", node="e2e", owner=("ReplicaSet", "web-7f9"))
        api.add_pod("nb-alice-0", namespace="team-a", node="e2e", owner=("StatefulSet", "nb-alice"),
                    labels={"notebook-name": "nb-alice"})
        bare = api.add_pod("scratch", namespace="team-b", node="e2e")
        kubelet.pods = [fk_pod(name, ns, {"main": [("nvidia.com/gpu", [gpu_uuid(i)])]})
                        for i, (name, ns) in enumerate((("web-7f9-x", "team-a"), ("nb-alice-0", "team-a"),
                                                        ("scratch", "team-b")))]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        settings = parse_settings(f"""
mode: enforce
node_name: e2e
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{kubelet.socket_path}",
              resync_interval: 1s, timeout: 2s}}
policies:
  - {{name: all, idle_after: 3s, warn_before: 1s, action: auto, reclaim_bare_allocations: true}}
limits: {{max_actions_per_cycle: 5, cooldown: 1m, max_fraction_per_cycle: 1.0}}
""", "<e2e>")
        daemon = Daemon(settings, build_adapters(settings))
        cycles: list[tuple[Any, list[ActionResult]]] = []
        daemon.on_cycle = lambda snap, results: cycles.append((snap, list(results)))
        task = asyncio.create_task(daemon.run())
        try:
            deadline = time.monotonic() + 60
            while not any(r.result == "released" for _, rs in cycles for r in rs):
                assert not task.done(), "daemon stopped early"
                assert time.monotonic() < deadline, "timed out waiting for the allocation to be released"
                await asyncio.sleep(0.1)
            # Let the controller-owned pods stay reclaimable-looking for two more cycles: still never touched.
            seen = len(cycles)
            while len(cycles) < seen + 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            metrics = daemon.metrics.render()[0].decode()
        finally:
            daemon.stop()
            assert await asyncio.wait_for(task, 10) == 0

    (ev,) = api.evictions
    assert ev.path.endswith("/namespaces/team-b/pods/scratch/eviction")
    assert ev.body["deleteOptions"]["preconditions"]["uid"] == bare["metadata"]["uid"]
    assert api.deletes == []
    owned_reasons = {d.candidate.pod.name: d for snap, _ in cycles for d in snap.decisions
                     if d.candidate.pod is not None and d.candidate.pod.name != "scratch"}
    assert owned_reasons["web-7f9-x"].verdict is Verdict.KEEP
    assert "pod is owned by ReplicaSet web-7f9; eviction would be recreated" in owned_reasons["web-7f9-x"].reason
    assert owned_reasons["nb-alice-0"].verdict is Verdict.KEEP
    assert "(Kubeflow Notebook nb-alice); eviction would be recreated — use stop-notebook" in \
        owned_reasons["nb-alice-0"].reason
    never = {d.verdict for snap, _ in cycles for d in snap.decisions
             if d.candidate.pod is not None and d.candidate.pod.name != "scratch"}
    assert never <= {Verdict.KEEP, Verdict.UNKNOWN}
    released = [r for _, rs in cycles for r in rs if r.result == "released"]
    assert len(released) == 1 and released[0].released_gpus == 1
    assert "reclaimer_released_gpus_total 1.0" in metrics
    assert 'reclaimer_actions_total{action="evict-pod",mode="enforce",result="released"} 1.0' in metrics
    allocation = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^reclaimer_gpu_allocation_held_idle_seconds_total\{namespace="([^"]+)"\} (\S+)$', metrics, re.M)}
    assert allocation.keys() == {"team-a", "team-b"} and all(v > 0 for v in allocation.values())
    # No process held any GPU memory: the memory waste counter has no series at all.
    assert 'reclaimer_gpu_held_idle_seconds_total{' not in metrics


# --------------------------------------------------------------------------- the report


def test_invariant_17_report_says_what_each_verdict_recovers() -> None:
    from tests.support.export_fixtures import K_ALICE, POD_UID_TRAIN, node_snapshot
    from reclaimer.export.report import ReportSchemaError, build_report, render_json, report_from_json
    from reclaimer.export.table import render_table
    import json

    model = build_report(node_snapshot())
    report = json.loads(render_json(model))
    by_key = {e["key"]: e for e in report["kernels"]}
    alice, train = by_key[f"kernel:{K_ALICE}"], by_key[f"pod:{POD_UID_TRAIN}"]
    assert (alice["action"], alice["recovers"], alice["allocated"]) == ("shutdown-kernel", "memory", False)
    assert (train["action"], train["recovers"], train["allocated"]) == ("evict-pod", "allocation", True)
    assert train["allocated_gpus"] == [train["gpus"][0]["uuid"]]
    assert all(e["recovers"] in ("allocation", "memory", "none") for e in report["kernels"])
    assert report["summary"]["allocated_gpus_held_idle"] == 1
    assert report["summary"]["memory_held_idle_bytes"] > 0
    back = report_from_json(json.loads(render_json(model)))
    assert back == model
    table = render_table(back)
    header = next(line for line in table.splitlines() if line.startswith("NAMESPACE"))
    assert "ALLOC" in header.split() and "FREES" in header.split()
    row = next(line for line in table.splitlines() if "train-x" in line).split()  # MEM "0 B" is two words
    assert row[header.split().index("ALLOC") + 1] == "yes" and row[header.split().index("FREES") + 1] == "alloc"
    assert "1 GPU allocation;" in table
    bad = json.loads(render_json(model))
    bad["kernels"][0]["recovers"] = "everything"
    with pytest.raises(ReportSchemaError, match=r"kernels\[0\].recovers: expected one of allocation, memory, none"):
        report_from_json(bad)
    old = json.loads(render_json(model))  # a report from a daemon before round 2: no recovers, still rendered
    for e in old["kernels"]:
        for key in ("recovers", "allocated_gpus", "shared_gpu"):
            e.pop(key)
    assert "?" in render_table(report_from_json(old))
    assert report_from_json(old).summary.allocated_gpus_held_idle == 1


def test_invariant_17_join_marks_kernel_pods_shared_gpus_and_allocated_gpus() -> None:
    from reclaimer.core.candidates import join

    eg_pod = replace(pod("kernel-abc", uid="a1b2c3d4-0000-4000-8000-0000000000e6"), labels={"kernel_id": KID})
    nb_pod = pod("jupyter-bob", uid="a1b2c3d4-0000-4000-8000-0000000000b0")
    allocations = [PodGpuAllocation("team-a", "kernel-abc", "main", (UUID0,), (UUID0,)),
                   PodGpuAllocation("team-a", "jupyter-bob", "main", (UUID0,), (f"{UUID0}::3",))]
    result = join(node=NODE, processes=[process(1, kernel_id=KID, pod_uid=eg_pod.uid),
                                        process(2, kernel_id=KID2, pod_uid=nb_pod.uid)],
                  pods_by_uid={eg_pod.uid: eg_pod, nb_pod.uid: nb_pod}, allocations=allocations,
                  activities={}, kernel_pods={eg_pod.uid: KID})
    by_kernel = {c.kernel_id: c for c in result.candidates}
    eg, bob = by_kernel[KID], by_kernel[KID2]
    assert (eg.kernel_pod, eg.shared_gpu, eg.allocated_gpus) == (True, False, (UUID0,))
    assert (bob.kernel_pod, bob.shared_gpu, bob.allocated_gpus) == (False, True, (UUID0,))
    assert actionkinds.recovers(ActionKind.SHUTDOWN_KERNEL, eg) is Recovers.ALLOCATION
    assert actionkinds.recovers(ActionKind.SHUTDOWN_KERNEL, bob) is Recovers.MEMORY
    # A kernel-id label naming another kernel does not make the pod this kernel's own.
    other = join(node=NODE, processes=[process(1, kernel_id=KID, pod_uid=eg_pod.uid)],
                 pods_by_uid={eg_pod.uid: eg_pod}, allocations=allocations, activities={},
                 kernel_pods={eg_pod.uid: KID2})
    assert other.candidates[0].kernel_pod is False


def test_invariant_17_auto_says_its_choice_only_while_idle() -> None:
    busy = kernel(act=activity(state="busy"))
    d = decide_one(busy, evict_settings("auto"))
    assert (d.verdict, d.reason) == (Verdict.KEEP, "kernel busy")
    d = decide_one(replace(kernel(), allocated=True, allocated_gpus=(UUID0,)), evict_settings("auto"))
    assert d.reason.startswith("auto: evict-pod releases the GPU allocation")


def test_decide_reads_each_gpu_window_once_even_with_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many candidates share a GPU, and auto evaluates two plans: each GPU's window is still read once per cycle."""
    from reclaimer.core import policy as policy_mod

    calls: list[str] = []
    real = policy_mod._gpu_view
    monkeypatch.setattr(policy_mod, "_gpu_view", lambda uuid, *a: calls.append(uuid) or real(uuid, *a))
    cands = [replace(kernel(f"6f1c2a3b-0000-4000-8000-{i:012d}", server=server(f"u{i}", ""), user=f"u{i}",
                            pod_info=pod(f"jupyter-u{i}", uid=f"a1b2c3d4-0000-4000-8000-{i:012d}", user=f"u{i}")),
                     allocated=True, allocated_gpus=(UUID0,)) for i in range(20)]
    decisions = decide(cands, snapshot(), evict_settings("auto", **{}), NOW, PolicyState())
    assert calls == [UUID0]
    assert {d.action for d in decisions} == {ActionKind.STOP_SERVER}
    calls.clear()
    planned = replace(decisions[0], verdict=Verdict.RECLAIM)  # the breaker held all 20 back; re-check one anyway
    recheck(planned, cands[0].activity, snapshot(), evict_settings("auto"), NOW)  # outside plan: read afresh
    assert calls


_KINDS = ["ReplicaSet", "StatefulSet", "DaemonSet", "Job", "Notebook", "JupyterKernel", "Node", "ConfigMap"]


@settings(max_examples=150, deadline=None)
@given(
    owners=st.lists(st.tuples(st.sampled_from(_KINDS), st.booleans()), max_size=3),
    owners_known=st.booleans(),
    has_kernel=st.booleans(),
    allocated=st.booleans(),
    has_server=st.booleans(),
    kernel_pod=st.booleans(),
    action=st.sampled_from(["auto", "evict-pod", "stop-server", "shutdown-kernel"]),
)
def test_invariant_17_property_no_planned_action_releases_nothing(
    owners: list[tuple[str, bool]], owners_known: bool, has_kernel: bool, allocated: bool, has_server: bool,
    kernel_pod: bool, action: str,
) -> None:
    """Whatever the pod's owners, the candidate and the policy: a warn or reclaim always recovers something, and an
    eviction is only ever planned for a pod no controller recreates."""
    refs = tuple(OwnerRef(kind, f"o{i}", "v1", ctl) for i, (kind, ctl) in enumerate(owners))
    info = replace(pod(), owners=refs[:1] + tuple(r for r in refs[1:] if not r.controller), owners_known=owners_known)
    server = SERVER if has_server else None
    c = k(info, allocated=allocated, server=server, kernel_pod=kernel_pod and has_kernel) if has_kernel else \
        p(info, server=server)
    d = decide_one(c, evict_settings(action))
    if d.verdict in (Verdict.WARN, Verdict.RECLAIM):
        assert actionkinds.recovers(d.action, d.candidate) is not Recovers.NONE, d.reason
        if d.action is ActionKind.EVICT_POD:
            assert info.owners_known and info.controller is None, d.reason
    if action == "auto" and d.verdict is Verdict.RECLAIM and allocated and info.owners_known and \
            info.controller is None:
        assert actionkinds.recovers(d.action, d.candidate) is Recovers.ALLOCATION, d.reason


async def test_invariant_17_allocation_checks_stay_bounded_and_run_at_once(api: FakeKube) -> None:
    """Pods that never go: each check ends as unreleased at its deadline, so the pending list stays bounded; the
    GETs of one cycle are made together (one slow API server costs one timeout, not one per pod)."""
    clock = Clock()
    ex = LiveExecutor(kube=api.kube_client(node_name=NODE), clock=clock, verify_within=60)
    api.eviction_response = Reply(201, {"kind": "Status", "status": "Success"})
    unreleased = 0
    for cycle in range(20):
        stored = api.add_pod(f"nb-{cycle}", namespace="team-a", node=NODE)
        info = pod_info_from_json(stored, "hub.jupyter.org/username")
        cand = Candidate(key=f"pod:{info.uid}", node=NODE, pod=info, gpu_uuids=(UUID0,), allocated=True)
        await warn_then_execute(ex, [Decision(cand, Verdict.RECLAIM, ActionKind.EVICT_POD, "idle", "p", 1800, 0)],
                                recheck=_still)
        clock.t += 15
        gets = len(api.requests_to("GET", r"/pods/nb-"))
        done = await ex.verify_allocations(None, None, clock.t)
        assert len(api.requests_to("GET", r"/pods/nb-")) - gets == ex.tracked()["allocation_pending"] + len(done)
        unreleased += sum(r.result == "unreleased" for r in done)
        assert ex.tracked()["allocation_pending"] <= 60 / 15 + 1
    assert unreleased >= 15


@pytest.mark.e2e  # the real daemon, running for seconds
async def test_invariant_17_daemon_counts_a_release_only_once_the_pod_is_gone(
    fake_nvml: FakeNvml, tmp_path: Path
) -> None:
    """Through the real daemon: the eviction is accepted but the pod lingers (terminating, still listed by the
    kubelet): cycle after cycle nothing is counted released. Once the pod is gone, the release is counted, once."""
    from reclaimer.app.daemon import Daemon, build_adapters
    from reclaimer.app.demo import free_port

    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[])
    with FakeKube() as api, FakeKubelet(tmp_path / "kubelet.sock") as kubelet:
        api.add_pod("scratch", namespace="team-b", node="e2e")
        kubelet.pods = [fk_pod("scratch", "team-b", {"main": [("nvidia.com/gpu", [gpu_uuid(0)])]})]
        api.eviction_response = Reply(201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201})
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        settings = parse_settings(f"""
mode: enforce
node_name: e2e
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{kubelet.socket_path}",
              resync_interval: 1s, timeout: 2s}}
policies:
  - {{name: all, idle_after: 3s, warn_before: 1s, action: auto, reclaim_bare_allocations: true}}
limits: {{max_actions_per_cycle: 5, cooldown: 1m, max_fraction_per_cycle: 1.0}}
""", "<e2e>")
        daemon = Daemon(settings, build_adapters(settings))
        cycles: list[list[ActionResult]] = []
        daemon.on_cycle = lambda snap, results: cycles.append(list(results))
        task = asyncio.create_task(daemon.run())

        def results() -> list[str]:
            return [r.result for rs in cycles for r in rs]

        try:
            deadline = time.monotonic() + 60
            while "success" not in results():
                assert not task.done() and time.monotonic() < deadline, results()
                await asyncio.sleep(0.1)
            evicted_at = len(cycles)
            while len(cycles) < evicted_at + 4:  # four cycles with the pod still there
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            lingering = daemon.metrics.render()[0].decode()
            assert "released" not in results() and "unreleased" not in results()
            with api._lock:  # the pod's termination finishes; the kubelet forgets its devices
                del api.pods[("team-b", "scratch")]
            kubelet.pods = []
            while "released" not in results():
                assert time.monotonic() < deadline, results()
                await asyncio.sleep(0.1)
            done = daemon.metrics.render()[0].decode()
        finally:
            daemon.stop()
            assert await asyncio.wait_for(task, 10) == 0

    assert "reclaimer_released_gpus_total 0.0" in lingering
    assert "reclaimer_released_gpus_total 1.0" in done
    assert results().count("released") == 1 and len(api.evictions) == 1
