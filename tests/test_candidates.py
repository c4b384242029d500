"""The join of attributed GPU processes, pods, allocations and gateway views into policy candidates."""

from __future__ import annotations

import pytest

from reclaimer.core.candidates import join
from reclaimer.core.keys import kernel_key, pod_key
from reclaimer.core.model import AttributedProcess, KernelActivity, PodGpuAllocation, PodInfo, ServerRef

K1 = "6f1c2d3e-0000-4000-8000-000000000001"
K2 = "6f1c2d3e-0000-4000-8000-000000000002"
POD_A = PodInfo(uid="aaaaaaaa-0000-4000-8000-00000000000a", namespace="team-a", name="jupyter-alice",
                user="alice", annotations={"hub.jupyter.org/servername": ""})
POD_B = PodInfo(uid="bbbbbbbb-0000-4000-8000-00000000000b", namespace="team-b", name="kernel-pod-b",
                labels={"kernel_id": K2})
POD_C = PodInfo(uid="cccccccc-0000-4000-8000-00000000000c", namespace="team-c", name="idle-alloc")


def proc(pid: int, gpu: str, kernel: str | None = None, pod: str | None = None, mem: int = 1 << 30,
         reason: str = "") -> AttributedProcess:
    return AttributedProcess(pid=pid, starttime=100 + pid, gpu_uuid=gpu, used_memory_bytes=mem, sm_utilization=None,
                             pod_uid=pod, kernel_id=kernel, kernel_pid=pid if kernel else None, reason=reason)


def activity(kid: str, gateway: str = "eg", error: str | None = None) -> KernelActivity:
    return KernelActivity(kid, gateway, 0.0, kernel_name="python3", execution_state="idle", error=error)


PODS = {p.uid: p for p in (POD_A, POD_B, POD_C)}


def test_kernel_processes_are_grouped_with_their_children_and_pod():
    r = join(node="n1", processes=[proc(10, "GPU-0", K1, POD_A.uid), proc(11, "GPU-1", K1, POD_A.uid)],
             pods_by_uid=PODS, allocations=None, activities={K1: activity(K1)})
    (c,) = r.candidates
    assert c.key == kernel_key(K1)
    assert c.gpu_uuids == ("GPU-0", "GPU-1")
    assert [p.pid for p in c.processes] == [10, 11]
    assert c.pod == POD_A and c.user == "alice" and c.gateway == "eg"
    assert r.unattributed == ()


def test_kernel_pod_process_attributed_by_label_joins_its_pod():
    r = join(node="n1", processes=[proc(20, "GPU-2", K2, POD_B.uid)], pods_by_uid=PODS, allocations=None,
             activities={})
    (c,) = r.candidates
    assert c.kernel_id == K2 and c.pod == POD_B
    assert c.activity is None  # no gateway answered: the policy will say unknown


def test_join_never_overrides_the_attributors_refusal_with_a_pod_label():
    # The attributor left this process unattributed (connection file and kernel_id label disagree): it stays so.
    p = proc(21, "GPU-2", None, POD_B.uid, reason="kernel id label disagrees with the connection file")
    r = join(node="n1", processes=[p], pods_by_uid=PODS, allocations=None, activities={})
    assert r.candidates == () and r.unattributed == (p,)


def test_process_of_no_kernel_is_unattributed_never_a_candidate():
    p = proc(30, "GPU-3", None, None, reason="no kernel connection file among 4 ancestors")
    r = join(node="n1", processes=[p], pods_by_uid=PODS, allocations=None, activities={})
    assert r.candidates == ()
    assert r.unattributed == (p,)


def test_pod_holding_allocated_gpu_with_no_process_is_a_candidate():
    allocs = [PodGpuAllocation("team-c", "idle-alloc", "main", ("GPU-5",)),
              PodGpuAllocation("team-a", "jupyter-alice", "notebook", ("GPU-0",))]
    r = join(node="n1", processes=[proc(10, "GPU-0", K1, POD_A.uid)], pods_by_uid=PODS, 
             allocations=allocs, activities={K1: activity(K1)})
    keys = [c.key for c in r.candidates]
    assert keys == sorted([kernel_key(K1), pod_key(POD_C.uid)])
    pod_c = next(c for c in r.candidates if c.key == pod_key(POD_C.uid))
    assert pod_c.allocated and pod_c.gpu_uuids == ("GPU-5",) and pod_c.kernel_id is None
    kernel = next(c for c in r.candidates if c.kernel_id == K1)
    assert kernel.allocated  # alice's pod holds the allocation; shutting the kernel down would not free it


@pytest.mark.parametrize("allocations", [pytest.param(None, id="kubelet-unknown"), pytest.param([], id="none")])
def test_no_pod_candidates_without_allocation_facts(allocations):
    r = join(node="n1", processes=[], pods_by_uid=PODS, allocations=allocations, activities={})
    assert r.candidates == ()


def test_kernel_spread_over_two_pods_binds_to_no_pod():
    r = join(node="n1", processes=[proc(10, "GPU-0", K1, POD_A.uid), proc(40, "GPU-1", K1, POD_C.uid)],
             pods_by_uid=PODS, allocations=None, activities={})
    assert r.candidates[0].pod is None


def test_gateway_error_leaves_gateway_unset():
    r = join(node="n1", processes=[proc(10, "GPU-0", K1)], pods_by_uid={}, allocations=None,
             activities={K1: activity(K1, error="HTTP 503")})
    assert r.candidates[0].gateway is None and r.candidates[0].activity.error == "HTTP 503"


def test_hub_server_matched_on_user_and_server_name():
    servers = [ServerRef("alice", "gpu"), ServerRef("alice", ""), ServerRef("bob", "")]
    r = join(node="n1", processes=[proc(10, "GPU-0", K1, POD_A.uid)], pods_by_uid=PODS, 
             allocations=None, activities={}, servers=servers)
    assert r.candidates[0].server == ServerRef("alice", "")


def test_join_is_deterministic_whatever_the_input_order():
    procs = [proc(10, "GPU-0", K1, POD_A.uid), proc(20, "GPU-2", K2, POD_B.uid), proc(30, "GPU-3")]
    a = join(node="n1", processes=procs, pods_by_uid=PODS, allocations=None, activities={})
    b = join(node="n1", processes=list(reversed(procs)), pods_by_uid=PODS, allocations=None,
             activities={})
    assert a == b


def test_kernel_server_found_through_the_hub_when_no_pod_names_it():
    """Plain host running JupyterHub: no pod, the daemon found the kernel in bob's server via the hub."""
    bob = ServerRef("bob", "gpu", url="/user/bob/gpu/")
    r = join(node="n1", processes=[proc(10, "GPU-0", K1)], pods_by_uid={}, allocations=None,
             activities={}, kernel_servers={K1: bob})
    (c,) = r.candidates
    assert c.server == bob and c.user == "bob" and c.pod is None


# --------------------------------------------------------------------------- the whole target (invariants 12, 13)

POD_G = PodInfo(uid="dddddddd-0000-4000-8000-00000000000d", namespace="team-d", name="lab-server")
ALLOC_A = PodGpuAllocation("team-a", "jupyter-alice", "notebook", ("GPU-9",))


@pytest.mark.parametrize(
    "kwargs, pod_uid, kid, kernels, source, error",
    [
        pytest.param(dict(servers=[ServerRef("alice", "")], server_kernels={("alice", ""): [activity(K1),
                                                                                           activity(K2)]}),
                     POD_A.uid, K1, (K1, K2), "server alice", None, id="server-listing"),
        pytest.param(dict(servers=[ServerRef("alice", "")], server_kernels={("alice", ""): None}),
                     POD_A.uid, K1, None, "server alice", "its kernel list could not be read", id="server-unreadable"),
        pytest.param(dict(servers=[ServerRef("alice", "")]), POD_A.uid, K1, None, "server alice",
                     "its kernels were not listed this cycle", id="server-not-listed"),
        pytest.param(dict(kernel_pods={POD_B.uid: K2}), POD_B.uid, K2, (K2,), "kernel pod team-b/kernel-pod-b", None,
                     id="kernel-pod-is-its-kernel"),
        pytest.param(dict(gateway_kernels={"lab": ([activity(K1, "lab"), activity(K2, "lab")], None)}), POD_G.uid,
                     K1, (K1, K2), "gateway lab", None, id="server-in-a-pod-listed-by-its-gateway"),
        pytest.param(dict(gateway_kernels={"lab": (None, "listing refused (HTTP 403)")}), POD_G.uid, K1, None,
                     "gateway lab", "the gateway does not list its kernels (listing refused (HTTP 403))",
                     id="gateway-refuses-listing"),
        pytest.param({}, POD_G.uid, K1, None, "pod team-d/lab-server",
                     "no JupyterHub server, kernel pod or gateway listing names its kernels", id="nothing-lists-it"),
    ],
)
def test_invariant_12_whole_target_of_a_kernel(kwargs: dict, pod_uid: str, kid: str, kernels: tuple | None,
                                               source: str, error: str | None) -> None:
    pods = {**PODS, POD_G.uid: POD_G}
    r = join(node="n1", processes=[proc(10, "GPU-0", kid, pod_uid)], pods_by_uid=pods, allocations=None,
             activities={kid: activity(kid, "lab" if pod_uid == POD_G.uid else "eg")}, **kwargs)
    (c,) = r.candidates
    assert (c.target_source, c.target_error) == (source, error)
    assert (None if c.target_kernels is None else tuple(k.kernel_id for k in c.target_kernels)) == kernels


def test_invariant_12_whole_target_of_a_pod_without_processes() -> None:
    r = join(node="n1", processes=[], pods_by_uid=PODS, allocations=[ALLOC_A], activities={},
             servers=[ServerRef("alice", "")], server_kernels={("alice", ""): [activity(K2)]})
    (c,) = r.candidates
    assert c.kernel_id is None and c.server == ServerRef("alice", "")
    assert [k.kernel_id for k in c.target_kernels] == [K2] and c.target_source == "server alice"


def test_invariant_13_failed_hub_listing_is_unknown_not_empty() -> None:
    r = join(node="n1", processes=[proc(10, "GPU-0", K1, POD_A.uid), proc(20, "GPU-2", K2, POD_B.uid)],
             pods_by_uid=PODS, allocations=[ALLOC_A], activities={}, servers=None, hub_error="HTTP 503")
    by_key = {c.key: c for c in r.candidates}
    # alice's pod names a user: her server is unknown, not absent. The kernel pod names no user: no server to know.
    assert by_key[kernel_key(K1)].server_error == "the hub's server list is unknown this cycle (HTTP 503)"
    assert by_key[kernel_key(K2)].server_error is None
    empty = join(node="n1", processes=[proc(10, "GPU-0", K1, POD_A.uid)], pods_by_uid=PODS, allocations=None,
                 activities={}, servers=[])
    assert empty.candidates[0].server is None and empty.candidates[0].server_error is None


def test_invariant_13_named_server_pod_never_gets_the_default_server() -> None:
    pod = PodInfo(uid=POD_A.uid, namespace="team-a", name="jupyter-alice-gpu", user="alice",
                  annotations={"hub.jupyter.org/servername": "gpu"})
    r = join(node="n1", processes=[proc(10, "GPU-0", K1, pod.uid)], pods_by_uid={pod.uid: pod}, allocations=None,
             activities={}, servers=[ServerRef("alice", "")])
    assert r.candidates[0].server is None
