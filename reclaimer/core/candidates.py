"""Join attributed GPU processes, pods, GPU allocations and gateway views into policy candidates. Pure.

A candidate is either a Jupyter kernel holding GPUs (through its own processes or its children), or a pod that
the kubelet says holds GPUs with no process on them at all. Everything else on a GPU is "unattributed", with
the reason, and is never a candidate: unknown is never idle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypedDict

from reclaimer.core.keys import kernel_key, pod_key
from reclaimer.core.model import (
    AttributedProcess,
    Candidate,
    KernelActivity,
    PodGpuAllocation,
    PodInfo,
    ServerRef,
)

# How Candidate.target_source starts, by where the target's kernels were listed (the re-check lists them again there).
SERVER_TARGET = "server "
KERNEL_POD_TARGET = "kernel pod "
GATEWAY_TARGET = "gateway "


@dataclass(frozen=True, slots=True)
class JoinResult:
    candidates: tuple[Candidate, ...]
    unattributed: tuple[AttributedProcess, ...]


def server_for_pod(pod: PodInfo | None, servers: Sequence[ServerRef], server_name_annotation: str) -> ServerRef | None:
    """The JupyterHub server a pod runs, matched on user and server name (KubeSpawner's label / annotation)."""
    if pod is None or not pod.user:
        return None
    name = pod.annotations.get(server_name_annotation, "")
    for s in servers:
        if s.user == pod.user and s.server_name == name:
            return s
    return None


def allocated_gpus_by_pod(
    pods_by_uid: Mapping[str, PodInfo], allocations: Sequence[PodGpuAllocation] | None
) -> dict[str, set[str]]:
    """pod uid -> the GPU uuids the kubelet says it holds (pods the API does not know are left out)."""
    pods_by_name = {(pod.namespace, pod.name): pod for pod in pods_by_uid.values()}
    out: dict[str, set[str]] = {}
    for a in allocations or ():
        pod = pods_by_name.get((a.namespace, a.pod))
        if pod is not None:
            out.setdefault(pod.uid, set()).update(a.gpu_uuids)
    return out


def _kernel_held_since(
    procs: Iterable[AttributedProcess], first_seen: Mapping[str, Mapping[int, float]] | None
) -> float | None:
    """The latest first sighting among a kernel's GPU processes (never before the process started); None: unknown."""
    if first_seen is None:
        return None
    held: float | None = None
    for p in procs:
        seen = first_seen.get(p.gpu_uuid, {}).get(p.pid)
        if seen is None:
            return None
        if p.started_at is not None:
            seen = max(seen, p.started_at)
        held = seen if held is None else max(held, seen)
    return held


def join(
    *,
    node: str,
    processes: Iterable[AttributedProcess],
    pods_by_uid: Mapping[str, PodInfo],
    allocations: Sequence[PodGpuAllocation] | None,
    activities: Mapping[str, KernelActivity],
    servers: Sequence[ServerRef] | None = (),
    kernel_servers: Mapping[str, ServerRef] | None = None,
    server_name_annotation: str = "hub.jupyter.org/servername",
    server_kernels: Mapping[tuple[str, str], Sequence[KernelActivity] | None] | None = None,
    gateway_kernels: Mapping[str, tuple[Sequence[KernelActivity] | None, str | None]] | None = None,
    kernel_pods: Mapping[str, str] | None = None,
    first_seen: Mapping[str, Mapping[int, float]] | None = None,
    allocation_seen: Mapping[str, float] | None = None,
    pods_listed_at: float | None = None,
    hub_error: str | None = None,
) -> JoinResult:
    """Group GPU processes by kernel; add pods that hold allocated GPUs with no process on them.

    ``allocations`` None means the kubelet could not be asked: then no pod candidate is made (unknown is never idle).
    ``servers`` None means the hub's listing failed or was partial (``hub_error`` says how): unknown, not empty.
    ``kernel_servers``: the JupyterHub server found holding a kernel (plain hosts, where no pod names it).
    ``kernel_pods``: pod uid -> the kernel id its kernel-id label names (the pod is that kernel's own pod).
    ``first_seen`` (the sampler's, per GPU: pid -> first sample of its presence) and ``allocation_seen`` (pod uid ->
    when the daemon first saw its allocation) give each candidate its ``held_since`` (invariant 10).
    ``pods_listed_at``: when ``pods_by_uid`` was listed; carried by every candidate with a pod (invariant 16).
    The whole target of each candidate (``Candidate.target_kernels``) comes from ``server_kernels`` (by (user,
    server name); None: the server's kernels could not be read), the kernel itself for a kernel pod
    (``kernel_pods``: pod uid -> kernel id label), or ``gateway_kernels`` (by gateway name: (kernels, error)).
    """
    by_kernel: dict[str, list[AttributedProcess]] = {}
    unattributed: list[AttributedProcess] = []
    busy_pods: set[str] = set()
    for p in processes:
        # The attributor already applied kernel-pod labels, and refused them where they conflict: never re-apply.
        kid = p.kernel_id
        if p.pod_uid is not None:
            busy_pods.add(p.pod_uid)
        if kid is None:
            unattributed.append(p)
            continue
        by_kernel.setdefault(kid, []).append(p)

    pods_by_name = {(pod.namespace, pod.name): pod for pod in pods_by_uid.values()}
    allocated_gpus: dict[str, set[str]] = {}  # pod uid -> gpu uuids
    shared: set[str] = set()  # pod uids holding a time-slicing / MPS replica
    for a in allocations or ():
        pod = pods_by_name.get((a.namespace, a.pod))
        if pod is not None:
            allocated_gpus.setdefault(pod.uid, set()).update(a.gpu_uuids)
            if a.shared:
                shared.add(pod.uid)

    listed = servers if servers is not None else ()
    server_problem = (
        None
        if servers is not None
        else (f"the hub's server list is unknown this cycle ({hub_error or 'failed or partial'})")
    )

    def target(
        kid: str | None, pod: PodInfo | None, server: ServerRef | None, activity: KernelActivity | None
    ) -> _Target:
        return _target(kid, pod, server, activity, server_kernels or {}, gateway_kernels or {}, kernel_pods or {})

    candidates: list[Candidate] = []
    for kid, procs in by_kernel.items():
        pod_uids = {p.pod_uid for p in procs if p.pod_uid}
        # A kernel whose processes sit in several pods is inconsistent: keep no pod so no pod action can bind to it.
        pod = pods_by_uid.get(next(iter(pod_uids))) if len(pod_uids) == 1 else None
        activity = activities.get(kid)
        # A server located for this kernel (with its direct address) first; it is the one the pod names, if any.
        server = (kernel_servers or {}).get(kid) or server_for_pod(pod, listed, server_name_annotation)
        gpus = tuple(sorted({p.gpu_uuid for p in procs}))
        candidates.append(
            Candidate(
                key=kernel_key(kid),
                node=node,
                kernel_id=kid,
                gateway=activity.gateway if activity and activity.error is None else None,
                activity=activity,
                pod=pod,
                server=server,
                user=(pod.user if pod else None) or (server.user if server else None),
                gpu_uuids=gpus,
                processes=tuple(sorted(procs, key=lambda p: (p.gpu_uuid, p.pid))),
                allocated=bool(pod and allocated_gpus.get(pod.uid)),
                allocated_gpus=tuple(sorted(allocated_gpus.get(pod.uid, ()))) if pod else (),
                shared_gpu=bool(pod and pod.uid in shared),
                kernel_pod=bool(pod and (kernel_pods or {}).get(pod.uid) == kid),
                held_since=_kernel_held_since(procs, first_seen),
                server_error=server_problem if server is None and (pod is None or pod.user) else None,
                **target(kid, pod, server, activity),
            )
        )

    if allocations is not None:
        for uid, uuids in allocated_gpus.items():
            if uid in busy_pods:
                continue
            pod = pods_by_uid[uid]
            server = server_for_pod(pod, listed, server_name_annotation)
            candidates.append(
                Candidate(
                    key=pod_key(uid),
                    node=node,
                    pod=pod,
                    server=server,
                    user=pod.user or (server.user if server else None),
                    gpu_uuids=tuple(sorted(uuids)),
                    allocated=True,
                    # A kernel pod (EG / elastic-jupyter-operator) whose kernel holds no GPU process: still the
                    # kernel's own pod, which only its gateway may end.
                    kernel_pod=uid in (kernel_pods or {}),
                    held_since=_pod_held_since(pod, (allocation_seen or {}).get(uid)),
                    server_error=server_problem if server is None and pod.user else None,
                    **target(None, pod, server, None),
                )
            )

    unattributed.sort(key=lambda p: (p.gpu_uuid, p.pid))
    candidates = [_with_strangers(c, unattributed) for c in candidates] if unattributed else candidates
    if pods_listed_at is not None:
        candidates = [replace(c, pod_listed_at=pods_listed_at) if c.pod is not None else c for c in candidates]
    candidates.sort(key=lambda c: c.key)
    return JoinResult(tuple(candidates), tuple(unattributed))


def _with_strangers(c: Candidate, unattributed: Sequence[AttributedProcess]) -> Candidate:
    """Invariant 15: the unattributed GPU processes in the candidate's own pod, or (a kernel without a pod) in one of
    its processes' containers. Such a process may be the kernel's own work (re-parented, or its walk failed)."""
    if c.kernel_id is None:
        return c  # a pod candidate exists only while no process at all runs in its pod
    if c.pod is not None:
        mine = tuple(p for p in unattributed if p.pod_uid == c.pod.uid)
    else:
        containers = {p.container_id for p in c.processes if p.container_id}
        mine = tuple(p for p in unattributed if p.container_id is not None and p.container_id in containers)
    return replace(c, unattributed=mine) if mine else c


def _pod_held_since(pod: PodInfo, allocation_seen: float | None) -> float | None:
    """When the daemon first saw the pod's allocation, never before the pod started; None: unknown."""
    if allocation_seen is None:
        return None
    return max(allocation_seen, pod.started_at) if pod.started_at is not None else allocation_seen


class _Target(TypedDict, total=False):
    """The Candidate.target_* fields."""

    target_source: str
    target_kernels: tuple[KernelActivity, ...] | None
    target_error: str | None


def _target(
    kid: str | None,
    pod: PodInfo | None,
    server: ServerRef | None,
    activity: KernelActivity | None,
    server_kernels: Mapping[tuple[str, str], Sequence[KernelActivity] | None],
    gateway_kernels: Mapping[str, tuple[Sequence[KernelActivity] | None, str | None]],
    kernel_pods: Mapping[str, str],
) -> _Target:
    """Every kernel that stopping the candidate's server or evicting its pod would end (Candidate.target_*)."""
    if server is not None:
        source = f"{SERVER_TARGET}{server.label}"
        key = (server.user, server.server_name)
        if key not in server_kernels:
            return {"target_source": source, "target_error": "its kernels were not listed this cycle"}
        listing = server_kernels[key]
        if listing is None:
            return {"target_source": source, "target_error": "its kernel list could not be read"}
        return {"target_source": source, "target_kernels": tuple(listing)}
    if pod is not None and kid is not None and kernel_pods.get(pod.uid) == kid:
        # A kernel pod (Enterprise Gateway, elastic-jupyter-operator) runs that one kernel and nothing else.
        source = f"{KERNEL_POD_TARGET}{pod.namespace}/{pod.name}"
        if activity is None or activity.error is not None:
            return {"target_source": source, "target_error": "its kernel's state is unknown"}
        return {"target_source": source, "target_kernels": (activity,)}
    gateway = activity.gateway if activity is not None and activity.error is None else None
    if pod is not None and kid is not None and gateway is not None and gateway in gateway_kernels:
        # A server in a pod configured as a gateway: whatever that gateway lists may run in the pod.
        listing, error = gateway_kernels[gateway]
        source = f"{GATEWAY_TARGET}{gateway}"
        if listing is None:
            return {"target_source": source, "target_error": f"the gateway does not list its kernels ({error})"}
        return {"target_source": source, "target_kernels": tuple(listing)}
    what = f"pod {pod.namespace}/{pod.name}" if pod is not None else "this candidate"
    return {
        "target_source": what,
        "target_error": "no JupyterHub server, kernel pod or gateway listing names its kernels",
    }
