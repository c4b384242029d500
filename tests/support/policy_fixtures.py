"""Builders for policy tests: real Settings (parsed from YAML), sampler snapshots, kernel and pod candidates.

The default world is reclaimable: GPU 0 at 0% for three hours, kernel idle for two, default policy
(idle_after 30m, warn_before 5m, shutdown-kernel). Tests change one thing and look at the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import yaml

from reclaimer.core.config import Settings, parse_settings
from reclaimer.core.policy import fold_presence
from reclaimer.core.model import (
    AttributedProcess,
    Candidate,
    GpuDevice,
    GpuPresence,
    GpuSample,
    KernelActivity,
    PodInfo,
    PolicyState,
    ProcessSample,
    SamplerSnapshot,
    ServerRef,
)

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
INTERVAL = 5.0
STARTED = NOW - 3 * 3600
NODE = "gpu-node-1"
GIB = 1 << 30
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"
KID = "6f1c2a3b-0000-4000-8000-000000000001"
KID2 = "6f1c2a3b-0000-4000-8000-000000000002"
POD_UID = "a1b2c3d4-0000-4000-8000-00000000aaaa"
# Candidates' pod data is "listed" here: fresh whatever ``now`` a test decides at (invariant 16 is tested on its own).
FRESH_LISTING = 4_000_000_000.0

Util = float | None | Callable[[float], float | None]


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def make_settings(**top: Any) -> Settings:
    """Settings parsed from YAML like the daemon's; keyword arguments are top-level keys (policies, limits, ...)."""
    data: dict[str, Any] = {"node_name": NODE, **top}
    return parse_settings(yaml.safe_dump(data), "<test>")


def policy(name: str = "default", **fields: Any) -> dict[str, Any]:
    return {"name": name, **fields}


def series(
    uuid: str = UUID0,
    index: int = 0,
    *,
    start: float = STARTED,
    end: float = NOW,
    interval: float = INTERVAL,
    util: Util = 0.0,
    memory_used: int | None = 2 * GIB,
    processes: tuple[ProcessSample, ...] | None = (),
    patch: Mapping[float, Mapping[str, Any]] | None = None,
) -> tuple[GpuSample, ...]:
    """Samples every ``interval`` from ``start`` to ``end`` inclusive; ``patch`` replaces fields at given times."""
    out = []
    n = int((end - start) / interval + 1e-9)
    for i in range(n + 1):
        ts = start + i * interval
        fields: dict[str, Any] = {
            "timestamp": ts,
            "index": index,
            "uuid": uuid,
            "up": True,
            "utilization": util(ts) if callable(util) else util,
            "memory_used_bytes": memory_used,
            "memory_total_bytes": 80 * GIB,
            "processes": processes,
        }
        fields.update((patch or {}).get(ts, {}))
        out.append(GpuSample(**fields))
    return tuple(out)


def device(uuid: str = UUID0, index: int = 0, model: str = "NVIDIA A100-SXM4-80GB") -> GpuDevice:
    return GpuDevice(index=index, uuid=uuid, model=model, mig_mode=False, memory_total_bytes=80 * GIB)


def snapshot(
    *all_series: tuple[GpuSample, ...],
    devices: Iterable[GpuDevice] | None = None,
    started_at: float = STARTED,
    interval: float = INTERVAL,
    last_sample_at: float | None = None,
) -> SamplerSnapshot:
    """A sampler snapshot of the given series (default: GPU 0 idle for 3h); devices follow the series."""
    if not all_series:
        all_series = (series(),)
    by_uuid = {s[0].uuid: s for s in all_series if s}
    if devices is None:
        devices = [device(s[0].uuid, s[0].index) for s in all_series if s]
    newest = max((s[-1].timestamp for s in all_series if s), default=None)
    # As the sampler: each GPU's presence folded sample by sample (first sightings, unreadable moments).
    presence: dict[str, GpuPresence] = {}
    for uuid, samples in by_uuid.items():
        for s in samples:
            if s.timestamp >= started_at:
                presence[uuid] = fold_presence(presence.get(uuid), s, interval)
    return SamplerSnapshot(
        first_seen={u: p.first_seen for u, p in presence.items()},
        unreadable={u: (p.unreadable_at, p.unreadable) for u, p in presence.items() if p.unreadable_at is not None},
        devices=tuple(devices),
        samples=by_uuid,
        started_at=started_at,
        sample_interval=interval,
        last_sample_at=last_sample_at if last_sample_at is not None else newest,
    )


def pod(
    name: str = "jupyter-alice",
    namespace: str = "team-a",
    *,
    uid: str = POD_UID,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    user: str | None = "alice",
    node_name: str | None = NODE,
) -> PodInfo:
    return PodInfo(
        uid=uid,
        namespace=namespace,
        name=name,
        node_name=node_name,
        labels=dict(labels or {"app": "jupyterhub"}),
        annotations=dict(annotations or {}),
        user=user,
        phase="Running",
        started_at=STARTED - 3600,
        containers_running=True,
    )


def activity(
    kernel_id: str = KID,
    *,
    state: str | None = "idle",
    idle_for: float | None = 2 * 3600,
    gateway: str = "eg",
    kernel_name: str | None = "python3",
    error: str | None = None,
    observed_at: float = NOW - 1,
) -> KernelActivity:
    return KernelActivity(
        kernel_id=kernel_id,
        gateway=gateway,
        observed_at=observed_at,
        kernel_name=kernel_name,
        execution_state=state,
        last_activity=None if idle_for is None else utc(NOW - idle_for),
        connections=0,
        error=error,
    )


def process(
    pid: int = 4242,
    gpu_uuid: str = UUID0,
    *,
    kernel_id: str | None = KID,
    pod_uid: str | None = POD_UID,
    memory: int | None = 2 * GIB,
    sm: float | None = None,
    starttime: int | None = 123456,
) -> AttributedProcess:
    return AttributedProcess(
        pid=pid,
        starttime=starttime,
        gpu_uuid=gpu_uuid,
        used_memory_bytes=memory,
        sm_utilization=sm,
        pod_uid=pod_uid,
        container_id="c0ffee",
        kernel_id=kernel_id,
        kernel_pid=pid,
    )


_UNSET: Any = object()


def server(user: str = "alice", name: str = "", *, idle_for: float | None = 2 * 3600, ready: bool | None = True,
           listed_at: float | None = NOW - 1) -> ServerRef:
    """A JupyterHub server as this cycle's hub listing shows it; its own activity 2h old by default."""
    return ServerRef(
        user=user,
        server_name=name,
        last_activity=None if idle_for is None else utc(NOW - idle_for),
        url=f"/user/{user}/{name}/" if name else f"/user/{user}/",
        ready=ready,
        listed_at=listed_at,
    )


def kernel(
    kernel_id: str = KID,
    *,
    gpus: tuple[str, ...] = (UUID0,),
    act: KernelActivity | None = _UNSET,
    pod_info: PodInfo | None = _UNSET,
    processes: tuple[AttributedProcess, ...] | None = None,
    server: ServerRef | None = None,
    user: str | None = "alice",
    gateway: str | None = "eg",
    held_since: float | None = STARTED,
    target: tuple[KernelActivity, ...] | None = _UNSET,
) -> Candidate:
    """A kernel candidate; by default idle for 2h, in pod team-a/jupyter-alice, one 2 GiB process per GPU, its
    processes on their GPUs since the sampler started (``held_since``).

    Its whole target (what stop-server / evict-pod would end) is by default the kernel alone, listed by its server
    when one is given, else by its pod; ``target`` replaces that list (None: could not be listed).
    """
    pod_value = pod() if pod_info is _UNSET else pod_info
    act_value = activity(kernel_id) if act is _UNSET else act
    if processes is None:
        pod_uid = pod_value.uid if pod_value is not None else None
        processes = tuple(
            process(4242 + i, uuid, kernel_id=kernel_id, pod_uid=pod_uid) for i, uuid in enumerate(gpus)
        )
    if target is _UNSET:
        target = (act_value,) if act_value is not None else None
    source = f"server {server.label}" if server is not None else (
        f"pod {pod_value.namespace}/{pod_value.name}" if pod_value is not None else "")
    return Candidate(
        key=f"kernel:{kernel_id}",
        node=NODE,
        kernel_id=kernel_id,
        gateway=gateway,
        activity=act_value,
        pod=pod_value,
        server=server,
        user=user,
        gpu_uuids=gpus,
        processes=processes,
        held_since=held_since,
        pod_listed_at=FRESH_LISTING if pod_value is not None else None,
        target_kernels=target,
        target_source=source,
        target_error=None if target is not None else "listing failed",
    )


def pod_candidate(
    pod_info: PodInfo | None = None,
    *,
    gpus: tuple[str, ...] = (UUID0,),
    held_since: float | None = STARTED,
    server: ServerRef | None = None,
    target: tuple[KernelActivity, ...] | None = (),
) -> Candidate:
    """A pod holding allocated GPUs with no process on them (allocation seen since the sampler started); with
    ``server``, its JupyterHub server and that server's kernels (``target``, none by default)."""
    pod_value = pod_info or pod()
    return Candidate(
        key=f"pod:{pod_value.uid}",
        node=NODE,
        pod=pod_value,
        user=pod_value.user,
        gpu_uuids=gpus,
        allocated=True,
        held_since=held_since,
        pod_listed_at=FRESH_LISTING,
        server=server,
        target_kernels=target if server is not None else None,
        target_source=f"server {server.label}" if server is not None else "",
        target_error=None if server is not None and target is not None else "not listed",
    )


def kernel_uuid(i: int) -> str:
    return f"6f1c2a3b-0000-4000-8000-{i:012d}"


def pod_uid(i: int) -> str:
    return f"a1b2c3d4-0000-4000-8000-{i:012d}"


class _WarnedAt(Mapping[str, float]):
    """``PolicyState.warned_at`` for a world where every candidate's idle episode was warned at ``at``."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __getitem__(self, key: str) -> float:
        return self.at

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(())

    def __len__(self) -> int:
        return 0


def warned_long_ago(at: float = NOW - 3600, **state: Any) -> PolicyState:
    """A policy state in which every candidate was warned long ago: the warn-then-wait gate (invariant 11) is open,
    so a test sees the verdict the idle arithmetic gives. Keyword arguments are other PolicyState fields."""
    return PolicyState(warned_at=_WarnedAt(at), **state)


WARNED = warned_long_ago()


async def warn_then_execute(ex: Any, plan: list[Any], recheck: Any = None) -> list[Any]:
    """Invariant 11 for executor tests: the plan's warning goes out in one cycle, its action in a later one; returns
    the later cycle's results (``ex`` a LiveExecutor, ``plan`` Decisions)."""
    from dataclasses import replace

    from reclaimer.core.verdicts import Verdict

    assert await ex.execute([replace(d, verdict=Verdict.WARN) for d in plan], recheck=recheck) == []
    return await ex.execute(plan, recheck=recheck)
