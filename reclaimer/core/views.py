"""Read-only views of one decide cycle that the report and the metrics share.

What a candidate uses of each GPU, whether it is known to be idle, its namespace, user and ``kernel_id`` label, and
the waste counter's increments (GPU-seconds held idle). Pure: computed from the core model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from reclaimer.core import actionkinds
from reclaimer.core.labels import NO_NAMESPACE
from reclaimer.core.model import Candidate, CycleSnapshot, Decision, GpuSample, SamplerSnapshot
from reclaimer.core.verdicts import Verdict


def finite(value: float | None) -> float | None:
    """``value`` when it is a finite number, else ``None`` (unknown)."""
    # JSON has no NaN/Infinity; a non-finite measurement is as good as unknown.
    return value if value is None or math.isfinite(value) else None


# --------------------------------------------------------------------------- per-kernel GPU usage


@dataclass(frozen=True, slots=True)
class KernelGpuUsage:
    """What one candidate uses of one GPU. ``None``: unknown."""

    uuid: str
    memory_bytes: int | None
    utilization: float | None


def _latest_up(sampler: SamplerSnapshot, uuid: str) -> GpuSample | None:
    sample = sampler.latest(uuid)
    return sample if sample is not None and sample.up else None


def _sole_holder(sample: GpuSample, own_pids: set[int]) -> bool:
    """True when every process on the GPU belongs to the candidate (so GPU utilisation is its utilisation)."""
    return sample.processes is not None and {p.pid for p in sample.processes} <= own_pids


def kernel_gpu_usage(candidate: Candidate, sampler: SamplerSnapshot) -> tuple[KernelGpuUsage, ...]:
    """Per GPU the candidate holds: the memory its processes use and their utilisation.

    Memory is the sum over its processes (unknown if any is unknown); with no process of its own on a GPU whose
    process list is known, it is 0 (an allocated GPU held by a pod without a process). Utilisation is the sum of
    per-process SM utilisation when all are known; otherwise the GPU's own utilisation when the candidate is its
    only user; otherwise unknown.
    """
    usages: list[KernelGpuUsage] = []
    for uuid in candidate.gpu_uuids:
        procs = [p for p in candidate.processes if p.gpu_uuid == uuid]
        sample = _latest_up(sampler, uuid)
        memory: int | None
        if procs:
            mems = [p.used_memory_bytes for p in procs]
            memory = None if any(m is None for m in mems) else sum(m for m in mems if m is not None)
        else:
            memory = 0 if sample is not None and sample.processes is not None else None
        utilization: float | None = None
        sm = [finite(p.sm_utilization) for p in procs]
        if procs and all(u is not None for u in sm):
            utilization = min(1.0, sum(u for u in sm if u is not None))
        elif sample is not None and _sole_holder(sample, {p.pid for p in procs}):
            utilization = finite(sample.utilization)
        usages.append(KernelGpuUsage(uuid, memory, utilization))
    return tuple(usages)


def metric_kernel_id(candidate: Candidate) -> str:
    """The ``kernel_id`` label / report key: the kernel id, or the candidate key (``pod:<uid>``) for pod candidates.

    Pod candidates (GPUs allocated, no kernel) need a unique value so joins ``on(kernel_id)`` stay one-to-one.
    """
    return candidate.kernel_id or candidate.key


def candidate_namespace(candidate: Candidate) -> str:
    """The pod's namespace, or ``NO_NAMESPACE`` for kernels outside Kubernetes."""
    return candidate.pod.namespace if candidate.pod is not None else NO_NAMESPACE


def candidate_user(candidate: Candidate) -> str | None:
    if candidate.user:
        return candidate.user
    if candidate.server is not None:
        return candidate.server.user
    return candidate.pod.user if candidate.pod is not None else None


def is_idle(decision: Decision) -> bool:
    """Known to be idle now (the policy measured an idle stretch); unknown is never idle."""
    return decision.verdict != Verdict.UNKNOWN and decision.idle_seconds is not None and decision.idle_seconds > 0


# --------------------------------------------------------------------------- the waste counter


def memory_holdings(c: Candidate) -> tuple[str, ...]:
    """GPUs on which ``c`` holds GPU memory: a kernel's GPUs (a pod with no process on its GPUs holds none)."""
    return c.gpu_uuids if c.kernel_id is not None or c.processes else ()


allocation_holdings = actionkinds.allocated_gpus  # GPUs whose nvidia.com/gpu allocation the candidate's pod holds


def held_idle_increments(
    snap_prev_time: float | None,
    snap: CycleSnapshot,
    threshold_for: Callable[[Decision], float],
    holdings: Callable[[Candidate], Iterable[str]] = memory_holdings,
) -> dict[str, float]:
    """GPU-seconds held idle per namespace since the previous cycle, for ``reclaimer_gpu_held_idle_seconds_total``
    (``holdings=memory_holdings``: GPU memory held idle) or ``reclaimer_gpu_allocation_held_idle_seconds_total``
    (``holdings=allocation_holdings``: GPU allocations held idle).

    Each sample of a held GPU taken in ``(snap_prev_time, snap.generated_at]`` (all samples up to
    ``generated_at`` when ``snap_prev_time`` is None) counts one sample interval, shared equally among the
    candidates holding that GPU, for each holder whose threshold its known utilisation is below. Samples with
    unknown utilisation (or a GPU that is down) count nothing. Pod namespace, or ``NO_NAMESPACE`` outside Kubernetes.
    """
    holders: dict[str, list[Decision]] = {}
    for d in snap.decisions:
        for uuid in dict.fromkeys(holdings(d.candidate)):
            holders.setdefault(uuid, []).append(d)
    lower = -math.inf if snap_prev_time is None else snap_prev_time
    interval = snap.sampler.sample_interval
    out: dict[str, float] = {}
    for uuid, decisions in holders.items():
        thresholds = [(candidate_namespace(d.candidate), threshold_for(d)) for d in decisions]
        share = interval / len(decisions)
        for s in snap.sampler.samples.get(uuid, ()):
            if not (lower < s.timestamp <= snap.generated_at) or not s.up or s.utilization is None:
                continue
            for namespace, threshold in thresholds:
                if s.utilization < threshold:
                    out[namespace] = out.get(namespace, 0.0) + share
    return out
