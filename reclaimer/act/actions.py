"""Carry out a plan of decisions: record it (dry-run) or act on it (enforce).

The policy always produces the same plan; which executor runs it is the only difference between the modes.
DryRunExecutor makes zero mutating calls and zero Events. LiveExecutor warns in an earlier cycle than it acts,
re-checks right before acting, acts at most once per decision, never escalates within a cycle, never forces, and
verifies what the action should give back: the GPU memory (the processes gone from the samples) and, for an action
that ends the pod, the GPU allocation (the pod gone, or pod-resources no longer listing its GPUs), each on its own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from reclaimer.core import actionkinds, modes
from reclaimer.core.actions import ActionKind, Recovers
from reclaimer.core.config import format_duration
from reclaimer.core.model import ActionResult, Decision, PodGpuAllocation, PodInfo, SamplerSnapshot, ServerRef
from reclaimer.core.redact import redact_line
from reclaimer.core.results import (
    BLOCKED,
    BLOCKED_PDB,
    DONE,
    DRY_RUN,
    FAILED,
    RELEASED,
    RETRY_AFTER,
    SKIPPED,
    UNRELEASED,
    UNVERIFIED,
    VERIFIED,
    AdapterOutcome,
)
from reclaimer.core.sources import HUB_GATEWAY, KUBEFLOW_GATEWAY
from reclaimer.core.verdicts import Verdict

log = structlog.get_logger(__name__)

EVENT_ACTIONS = actionkinds.EVENT_ACTIONS


class KernelStopper(Protocol):
    """Shuts a kernel down at the gateway that serves it (observe.gateway.GatewayPool)."""

    async def shutdown(self, kernel_id: str) -> AdapterOutcome: ...


class ServerStopper(Protocol):
    """Stops a user's server, or one kernel inside it, through JupyterHub (observe.hub.HubClient)."""

    async def stop_server(self, user: str, server_name: str = "") -> AdapterOutcome: ...

    async def shutdown_server_kernel(self, server: ServerRef, kernel_id: str) -> AdapterOutcome: ...


class Eviction(Protocol):
    """What one eviction request answered (observe.kube.EvictionResult)."""

    @property
    def result(self) -> str: ...  # one of reclaimer.core.results.EVICTION_RESULTS

    @property
    def detail(self) -> str: ...

    @property
    def retry_after(self) -> float | None: ...  # seconds the API server asked us to wait


class PodEvicter(Protocol):
    """Evicts pods, stops Kubeflow notebooks, reads a pod again, creates Events (observe.kube.KubeClient)."""

    def evict(self, namespace: str, name: str, uid: str) -> Eviction: ...

    def stop_notebook(self, namespace: str, name: str, now: float | None = None) -> AdapterOutcome: ...

    def create_event(self, pod: PodInfo, *, reason: str, action: str, note: str, type: str = "Normal") -> bool: ...

    def get_pod(self, namespace: str, name: str) -> PodInfo | None: ...  # None: gone


class NotebookKernelStopper(Protocol):
    """Shuts a kernel down inside a Kubeflow notebook server (observe.kubeflow.NotebookServers)."""

    async def shutdown_kernel(self, namespace: str, name: str, kernel_id: str) -> AdapterOutcome: ...


Recheck = Callable[[Decision], Awaitable[Decision]]
# What an operation gives back: (result, detail) from its adapter, or an ActionResult when skipped before any call.
Outcome = tuple[str, str] | ActionResult


def _context(d: Decision) -> dict[str, Any]:
    c = d.candidate
    return {
        "key": c.key,
        "kernel_id": c.kernel_id,
        "gateway": c.gateway,
        "namespace": c.pod.namespace if c.pod else None,
        "pod": c.pod.name if c.pod else None,
        "action": d.action.value,
        "policy": d.policy,
    }


def held_memory(d: Decision) -> int:
    return sum(p.used_memory_bytes or 0 for p in d.candidate.processes)


class DryRunExecutor:
    """Records what enforce would do. Makes no call to anything outside this process.

    ``records`` keeps the latest would-act result per candidate still in the plan (bounded by what is live: a
    busy node in dry-run for months must not grow); ``recorded_total`` counts them all.
    """

    mode = modes.DRY_RUN

    def __init__(self) -> None:
        self.records: dict[str, ActionResult] = {}
        self.recorded_total = 0

    async def execute(self, plan: Sequence[Decision], recheck: Recheck | None = None) -> list[ActionResult]:
        out: list[ActionResult] = []
        for d in plan:
            if d.verdict is Verdict.RECLAIM and d.action is not ActionKind.NONE:
                log.info("reclaim", would=True, mode=self.mode, reason=d.reason, **_context(d))
                out.append(ActionResult(d, DRY_RUN, "would act", mode=self.mode))
            elif d.verdict is Verdict.WARN:
                log.info("warn", would=True, mode=self.mode, reason=d.reason, eta_seconds=d.eta_seconds, **_context(d))
        live = {d.candidate.key for d in plan}
        self.records = {k: r for k, r in self.records.items() if k in live}
        self.records.update((r.decision.candidate.key, r) for r in out)
        self.recorded_total += len(out)
        return out

    def hold(self, key: str, now: float) -> str | None:
        """Dry-run never acts, so nothing is ever backed off."""
        return None

    def tracked(self) -> dict[str, int]:
        """Sizes of the per-key structures (for the soak and the bounds tests)."""
        return {"records": len(self.records)}

    def verify(self, sampler: SamplerSnapshot, now: float) -> list[ActionResult]:
        return []

    async def verify_allocations(
        self, allocations: Sequence[PodGpuAllocation] | None, listed_at: float | None, now: float
    ) -> list[ActionResult]:
        return []


@dataclass
class _AllocationPending:
    """An action that should release its pod's GPU allocation: the pod must go (or stop holding the GPUs)."""

    result: ActionResult
    namespace: str
    name: str
    uid: str
    gpus: frozenset[str]
    acted_at: float
    deadline: float


@dataclass
class _Pending:
    """An action that succeeded; its GPU memory must disappear from the samples before ``deadline``."""

    result: ActionResult
    pids: frozenset[tuple[str, int]]  # (gpu uuid, pid) the candidate had
    acted_at: float
    deadline: float


@dataclass(slots=True)
class _Backoff:
    """A target whose last action failed or was refused: not tried again before ``not_before``."""

    not_before: float
    failures: int  # consecutive failed attempts (0 for a 429/PDB refusal, which names its own retry time)
    last: str  # what happened last time, for the skip detail and the report reason


@dataclass
class LiveExecutor:
    """Acts for real. Every outcome is a bounded ``result`` label; failures are retried later, never escalated.

    A failed action backs off exponentially per target (``failure_backoff`` doubling up to ``failure_backoff_max``):
    a broken gateway gets one attempt and one Warning Event per back-off step, not one per cycle. Every per-key
    structure is pruned to the candidates in the current plan (plus back-offs still running), so it stays bounded
    by what is live.
    """

    kernels: KernelStopper | None = None
    servers: ServerStopper | None = None
    kube: PodEvicter | None = None
    notebooks: NotebookKernelStopper | None = None
    clock: Callable[[], float] = field(default=lambda: __import__("time").time())
    verify_within: float = 120.0
    default_backoff: float = 300.0
    failure_backoff: float = 60.0
    failure_backoff_max: float = 3600.0
    mode: str = modes.ENFORCE
    _warned: set[str] = field(default_factory=set)
    _backoff: dict[str, _Backoff] = field(default_factory=dict)
    _pending: list[_Pending] = field(default_factory=list)
    _allocation_pending: list[_AllocationPending] = field(default_factory=list)

    def hold(self, key: str, now: float) -> str | None:
        """Why ``key`` is not acted on now (a running back-off), in words for the report; None when it is not held."""
        b = self._backoff.get(key)
        if b is None or b.not_before <= now:
            return None
        after = f"after {b.failures} failed attempt{'s' if b.failures != 1 else ''} " if b.failures else ""
        return f"backing off {after}({b.last}); next try in {format_duration(b.not_before - now)}"

    def tracked(self) -> dict[str, int]:
        """Sizes of the per-key structures (for the soak and the bounds tests)."""
        return {
            "warned": len(self._warned),
            "backoff": len(self._backoff),
            "pending": len(self._pending),
            "allocation_pending": len(self._allocation_pending),
        }

    def _fail(self, key: str, now: float, detail: str) -> None:
        previous = self._backoff.get(key)
        failures = (previous.failures if previous else 0) + 1
        delay = min(self.failure_backoff * 2 ** min(failures - 1, 30), self.failure_backoff_max)
        self._backoff[key] = _Backoff(now + delay, failures, redact_line(str(detail)))

    async def execute(self, plan: Sequence[Decision], recheck: Recheck | None = None) -> list[ActionResult]:
        now = self.clock()
        out: list[ActionResult] = []
        # An idle episode lasts while the plan carries its warning time (or does not know): a candidate that went back
        # to work starts a new episode and will be warned again.
        self._warned &= {
            d.candidate.key
            for d in plan
            if d.warned_at is not None or d.verdict in (Verdict.WARN, Verdict.RECLAIM, Verdict.UNKNOWN)
        }
        warned_before = set(self._warned)
        # A back-off ends with its candidate (gone from the plan) unless it still runs: a target that vanishes for a
        # cycle (an attribution glitch) must not come back to a fresh retry and another Warning Event.
        live = {d.candidate.key for d in plan}
        self._backoff = {k: b for k, b in self._backoff.items() if k in live or b.not_before > now}
        for d in plan:
            if d.verdict is Verdict.WARN or (d.warned_at is not None and d.verdict is not Verdict.RECLAIM):
                await self._warn(d)
            elif d.verdict is Verdict.RECLAIM and d.action is not ActionKind.NONE:
                if d.candidate.key not in warned_before:
                    # Invariant 11, defence in depth (the policy already waits): never act in the cycle that warns.
                    await self._warn(d)
                    out.append(self._record(d, SKIPPED, "warned now; acting no earlier than a later cycle"))
                    continue
                held = self.hold(d.candidate.key, now)
                if held is not None:
                    out.append(self._record(d, SKIPPED, held))
                    continue
                if recheck is not None:
                    try:
                        fresh = await recheck(d)
                    except Exception as exc:  # unknown is never idle
                        out.append(self._record(d, SKIPPED, f"re-check failed: {exc}"))
                        continue
                    if fresh.verdict is not Verdict.RECLAIM:
                        reason = fresh.reason if fresh.reason.startswith("re-check:") else f"re-check: {fresh.reason}"
                        out.append(self._record(d, SKIPPED, reason))
                        continue
                out.append(await self._act(d))
        return out

    def _record(self, d: Decision, result: str, detail: str, reclaimed: int = 0) -> ActionResult:
        r = ActionResult(d, result, detail, reclaimed, mode=self.mode)
        level = "warning" if result in (FAILED, BLOCKED, UNVERIFIED) else "info"
        getattr(log, level)("action", result=result, detail=detail, would=False, mode=self.mode, **_context(d))
        return r

    async def _event(self, d: Decision, *, reason: str, action: str, note: str, type: str = "Normal") -> None:
        pod = d.candidate.pod
        if self.kube is None or pod is None:
            return
        try:
            await asyncio.to_thread(self.kube.create_event, pod, reason=reason, action=action, note=note, type=type)
        except Exception as exc:  # an Event failure never changes the action's outcome
            log.warning("event failed", error=str(exc), **_context(d))

    async def _warn(self, d: Decision) -> None:
        if d.candidate.key in self._warned:
            return
        self._warned.add(d.candidate.key)
        eta = format_duration(d.eta_seconds or 0)
        log.info("warn", would=False, mode=self.mode, eta_seconds=d.eta_seconds, reason=d.reason, **_context(d))
        await self._event(
            d,
            reason="GPUIdleWarning",
            action="Warn",
            type="Warning",
            note=f"GPU idle: {d.action.value} in {eta} unless the kernel becomes active. {d.reason}",
        )

    async def _act(self, d: Decision) -> ActionResult:
        c = d.candidate
        carry_out = self._executors().get(d.action)
        if carry_out is None:
            return self._record(d, SKIPPED, f"unknown action {d.action.value}")
        try:
            outcome = await carry_out(d)
        except Exception as exc:  # a crash in an adapter is a failed action, retried next cycle
            outcome = (FAILED, f"{type(exc).__name__}: {exc}")
        if isinstance(outcome, ActionResult):  # skipped before any call
            return outcome
        result, detail = outcome
        if result == FAILED:
            self._fail(c.key, self.clock(), detail)
            retry = format_duration(self._backoff[c.key].not_before - self.clock())
            failure_event = actionkinds.spec(d.action).failure_event  # None: the API server's answer says it
            if failure_event is not None:
                await self._event(
                    d,
                    reason=failure_event,
                    action=EVENT_ACTIONS[d.action],
                    type="Warning",
                    note=f"{d.action.value} failed, next try in {retry}: {detail}"[:1024],
                )
            return self._record(d, FAILED, f"{detail}; next try in {retry}")
        if result in DONE:
            self._backoff.pop(c.key, None)
            r = self._record(d, result, detail)
            await self._event(d, reason="GPUIdle", action=EVENT_ACTIONS[d.action], note=d.reason)
            acted = self.clock()
            pids = frozenset((p.gpu_uuid, p.pid) for p in c.processes)
            if pids:
                self._pending.append(_Pending(r, pids, acted, acted + self.verify_within))
            gpus = actionkinds.allocated_gpus(c)
            if c.pod is not None and gpus and actionkinds.recovers(d.action, c) is Recovers.ALLOCATION:
                self._allocation_pending.append(
                    _AllocationPending(
                        r, c.pod.namespace, c.pod.name, c.pod.uid, frozenset(gpus), acted, acted + self.verify_within
                    )
                )
            return r
        return self._record(d, result, detail)

    def _executors(self) -> dict[ActionKind, Callable[[Decision], Awaitable[Outcome]]]:
        """How each executable kind is carried out: the method ``OPERATIONS`` maps its row's ``operation`` to."""
        out: dict[ActionKind, Callable[[Decision], Awaitable[Outcome]]] = {}
        for kind in actionkinds.EXECUTABLE:
            operation = OPERATIONS.get(actionkinds.spec(kind).operation or "")
            if operation is not None:
                out[kind] = functools.partial(operation, self)
        return out

    async def _stop_notebook(self, d: Decision) -> Outcome:
        c = d.candidate
        if self.kube is None or c.notebook is None:
            return self._record(d, SKIPPED, "no Kubeflow Notebook known for this candidate")
        return await asyncio.to_thread(self.kube.stop_notebook, c.notebook.namespace, c.notebook.name, self.clock())

    async def _shutdown_kernel(self, d: Decision) -> Outcome:
        c = d.candidate
        if c.kernel_id is None:
            return self._record(d, SKIPPED, "no kernel to shut down")
        if c.gateway == HUB_GATEWAY and c.server is not None and self.servers is not None:
            # Seen only through the user's server (JupyterHub): shut it down there, not via a gateway.
            return await self.servers.shutdown_server_kernel(c.server, c.kernel_id)
        if c.gateway == KUBEFLOW_GATEWAY and c.notebook is not None and self.notebooks is not None:
            # Seen only through its Kubeflow notebook server: shut it down there.
            return await self.notebooks.shutdown_kernel(c.notebook.namespace, c.notebook.name, c.kernel_id)
        if self.kernels is not None:
            return await self.kernels.shutdown(c.kernel_id)
        return self._record(d, SKIPPED, "no gateway to shut the kernel down through")

    async def _stop_server(self, d: Decision) -> Outcome:
        c = d.candidate
        # Only the server the hub listed: never the user's default server as a fallback (invariant 13).
        if self.servers is None or c.server is None or not c.server.user:
            return self._record(d, SKIPPED, "no JupyterHub server listed for this candidate")
        return await self.servers.stop_server(c.server.user, c.server.server_name)

    async def _evict_pod(self, d: Decision) -> Outcome:
        c = d.candidate
        if self.kube is None or c.pod is None:
            return self._record(d, SKIPPED, "no pod known for this candidate")
        if actionkinds.recovers(d.action, c) is Recovers.NONE:  # the policy never plans this; never act on it
            return self._record(
                d,
                SKIPPED,
                f"evicting {c.pod.namespace}/{c.pod.name} would release nothing (a controller recreates it)",
            )
        ev = await asyncio.to_thread(self.kube.evict, c.pod.namespace, c.pod.name, c.pod.uid)
        result, detail = self._eviction_outcome(d, ev)
        if ev.result == BLOCKED_PDB:
            await self._event(
                d,
                reason="EvictionBlockedByPDB",
                action=EVENT_ACTIONS[d.action],
                type="Warning",
                note=f"eviction blocked by a PodDisruptionBudget: {ev.detail}"[:1024],
            )
        return result, detail

    def _eviction_outcome(self, d: Decision, ev: Eviction) -> tuple[str, str]:
        now = self.clock()
        if ev.result in DONE:
            return ev.result, ev.detail
        if ev.result in (BLOCKED_PDB, RETRY_AFTER):
            why = (
                "eviction blocked by a PodDisruptionBudget" if ev.result == BLOCKED_PDB else "API asked to retry later"
            )
            self._backoff[d.candidate.key] = _Backoff(now + (ev.retry_after or self.default_backoff), 0, why)
            return BLOCKED, ev.detail
        # 500 (several PDBs), 403, 409 (pod replaced) and anything else: no action, and never a DELETE instead.
        return FAILED, f"{ev.result}: {ev.detail}"

    def verify(self, sampler: SamplerSnapshot, now: float) -> list[ActionResult]:
        """Check pending actions against the newest samples: memory released -> verified, deadline passed ->
        unverified."""
        done: list[ActionResult] = []
        still: list[_Pending] = []
        latest = {uuid: sampler.latest(uuid) for uuid in {u for p in self._pending for u, _ in p.pids}}
        for p in self._pending:
            remaining = 0
            known = True
            for uuid, pid in p.pids:
                s = latest.get(uuid)
                if s is None or not s.up or s.processes is None or s.timestamp <= p.acted_at:
                    known = False
                    continue
                remaining += sum(1 for ps in s.processes if ps.pid == pid)
            if known and remaining == 0:
                freed = held_memory(p.result.decision)
                done.append(replace(p.result, result=VERIFIED, detail="GPU memory released", reclaimed_bytes=freed))
                log.info(VERIFIED, reclaimed_bytes=freed, **_context(p.result.decision))
            elif now > p.deadline:
                done.append(
                    replace(
                        p.result,
                        result=UNVERIFIED,
                        detail=f"GPU memory still held {format_duration(self.verify_within)} after acting",
                    )
                )
                log.warning(UNVERIFIED, **_context(p.result.decision))
            else:
                still.append(p)
        self._pending = still
        return done

    async def verify_allocations(
        self, allocations: Sequence[PodGpuAllocation] | None, listed_at: float | None, now: float
    ) -> list[ActionResult]:
        """Check actions that should have released a pod's GPU allocation: the pod is gone (GET 404, or another
        uid under that name) or the kubelet's pod-resources (``allocations``, listed at ``listed_at``, after the
        action) no longer lists those GPUs for it -> ``released``; still held at the deadline -> ``unreleased``.
        A failing GET or an unknown listing proves nothing either way: the check waits for the next cycle.
        """
        done: list[ActionResult] = []
        still: list[_AllocationPending] = []
        # One GET per pending pod, all at once: a slow API server costs one timeout per cycle, not one per pod.
        gone = await asyncio.gather(*(self._pod_gone(p) for p in self._allocation_pending))
        for p, released in zip(self._allocation_pending, gone, strict=True):
            if released is None and allocations is not None and listed_at is not None and listed_at > p.acted_at:
                holding = {u for a in allocations if (a.namespace, a.pod) == (p.namespace, p.name) for u in a.gpu_uuids}
                if not holding & p.gpus:
                    released = "pod-resources no longer lists its GPUs"
            context = _context(p.result.decision)
            if released is not None:
                n = len(p.gpus)
                done.append(
                    replace(
                        p.result,
                        result=RELEASED,
                        released_gpus=n,
                        reclaimed_bytes=0,
                        detail=f"GPU allocation released ({n} GPU{'s' if n != 1 else ''}): {released}",
                    )
                )
                log.info("allocation released", gpus=n, how=released, **context)
            elif now > p.deadline:
                done.append(
                    replace(
                        p.result,
                        result=UNRELEASED,
                        reclaimed_bytes=0,
                        detail=f"pod {p.namespace}/{p.name} still holds its GPU allocation "
                        f"{format_duration(self.verify_within)} after acting",
                    )
                )
                log.warning("allocation not released", **context)
            else:
                still.append(p)
        self._allocation_pending = still
        return done

    async def _pod_gone(self, p: _AllocationPending) -> str | None:
        if self.kube is None:
            return None
        try:
            pod = await asyncio.to_thread(self.kube.get_pod, p.namespace, p.name)
        except Exception as exc:  # unknown: neither released nor held
            log.warning("allocation check: reading the pod failed", error=str(exc), namespace=p.namespace, pod=p.name)
            return None
        if pod is None:
            return "pod gone"
        if pod.uid != p.uid:
            return "pod replaced (another uid)"
        return None

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._allocation_pending)


# How each operation the table names (reclaimer.core.actionkinds, ``ActionSpec.operation``) is carried out: one
# LiveExecutor method each. A new action kind adds its row there and its method here.
OPERATIONS: dict[str, Callable[[LiveExecutor, Decision], Awaitable[Outcome]]] = {
    "shutdown_kernel": LiveExecutor._shutdown_kernel,
    "stop_server": LiveExecutor._stop_server,
    "evict_pod": LiveExecutor._evict_pod,
    "stop_notebook": LiveExecutor._stop_notebook,
}


def executor_for(
    mode: str,
    *,
    kernels: KernelStopper | None = None,
    servers: ServerStopper | None = None,
    kube: PodEvicter | None = None,
    notebooks: NotebookKernelStopper | None = None,
    clock: Callable[[], float] | None = None,
    verify_within: float = 120.0,
) -> DryRunExecutor | LiveExecutor:
    """Dry-run gets no adapters at all: it cannot call anything even by mistake."""
    if mode != modes.ENFORCE:
        return DryRunExecutor()
    live = LiveExecutor(kernels=kernels, servers=servers, kube=kube, notebooks=notebooks, verify_within=verify_within)
    if clock is not None:
        live.clock = clock
    return live
