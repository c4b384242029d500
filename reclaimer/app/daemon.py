"""Wire the pipeline together: sample -> attribute -> observe -> decide -> act -> export.

The sampler runs in its own thread; everything else runs on one asyncio loop. Blocking calls (procfs, the
kubernetes client, the kubelet socket) go through ``asyncio.to_thread`` with timeouts shorter than the decide
interval, so one slow dependency never stalls the loop, the scrape or the other dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from reclaimer.act.actions import DryRunExecutor, LiveExecutor, executor_for
from reclaimer.core import actionkinds, policy
from reclaimer.core import candidates as join_mod
from reclaimer.core.config import Settings, format_duration
from reclaimer.core.errors import StartupError
from reclaimer.core.model import (
    ActionResult,
    AttributedProcess,
    Candidate,
    CycleSnapshot,
    Decision,
    KernelActivity,
    NotebookRef,
    PodGpuAllocation,
    PodInfo,
    PolicyState,
    SamplerSnapshot,
    ServerRef,
    Verdict,
    halted_reason,
)
from reclaimer.observe.attribution import Attributor
from reclaimer.observe.gateway import claimed_by_a_gateway
from reclaimer.observe.hub import locate_servers, pod_server
from reclaimer.observe.kubeflow import KUBEFLOW_GATEWAY
from reclaimer.observe.sampler import GpuBackend, Sampler, open_backend
from reclaimer.observe.stall import STAGES, CallTimedOut, StageState, StageWorker, Stalled

log = structlog.get_logger(__name__)
MAX_CACHED_SERVERS = 20_000  # a larger hub listing is used for the cycle but not kept


def create_guarded_task(coro: Coroutine[Any, Any, Any], name: str, tasks: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
    """Start a background task whose failure is logged at once, not when (if ever) it is awaited."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("background task failed", task=name, error=repr(t.exception()), exc_info=t.exception())

    task.add_done_callback(done)
    return task


@dataclass
class Adapters:
    """The edges the daemon talks to; any of them may be missing (no Kubernetes, no hub, no gateways)."""

    backend: GpuBackend
    gateways: Any | None = None  # gateway.GatewayPool
    hub: Any | None = None  # hub.HubClient
    kube: Any | None = None  # kube.KubeClient
    pods: Any | None = None  # kube.PodCache
    pod_resources: Callable[[], Sequence[PodGpuAllocation]] | None = None
    notebooks: Any | None = None  # kubeflow.NotebookServers


@dataclass
class Daemon:
    settings: Settings
    adapters: Adapters
    clock: Callable[[], float] = time.time
    executor: DryRunExecutor | LiveExecutor | None = None
    sampler: Sampler | None = None
    _snapshot: CycleSnapshot | None = None
    _state: PolicyState = field(default_factory=PolicyState)
    _attributor: Attributor | None = None
    _last_cycle_at: float | None = None
    _last_cycle_started: float | None = None
    _cycles: int = 0
    _stop: asyncio.Event | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _kube_ok: bool | None = None
    _podres_ok: bool | None = None
    _hub_ok: bool | None = None
    _hub_error: str | None = None  # why the hub listing is unknown this cycle (None: listed, or not asked)
    # One thread per blocking stage: a /proc read or API call that never returns stalls its stage, nothing else.
    _stages: dict[str, StageWorker] = field(default_factory=dict)
    _allocation_seen: dict[str, float] = field(default_factory=dict)  # pod uid -> first cycle that saw its allocation
    _hub_servers: list[ServerRef] | None = None  # the hub's last listing (bounded: MAX_CACHED_SERVERS)
    _hub_listed_at: float | None = None
    metrics: Any | None = None
    on_cycle: Callable[[CycleSnapshot, Sequence[ActionResult]], None] | None = None

    def __post_init__(self) -> None:
        from reclaimer.export.metrics import Metrics

        s = self.settings
        self._attributor = Attributor(procfs_root=s.procfs_root)
        self._stages = {stage: StageWorker(stage) for stage in ("procfs", "pod-list", "pod-resources")}
        if self.metrics is None:
            self.metrics = Metrics(
                self.snapshot, nvml_error_counts=self.adapters.backend.error_counts, stalls=self.stalls
            )
        hist = self.metrics.gateway_request_duration_seconds
        for client in getattr(self.adapters.gateways, "clients", ()):
            client.on_request = lambda name, secs, _h=hist: _h.labels(gateway=name).observe(secs)
        if self.sampler is None:
            self.sampler = Sampler(
                self.adapters.backend,
                interval=s.sample_interval,
                window_seconds=s.longest_window,
                clock=self.clock,
                on_tick=self.metrics.sample_duration_seconds.observe,
                idle_thresholds={p.gpu_idle_below for p in s.policies},
            )
        if self.executor is None:
            self.executor = executor_for(
                s.mode,
                kernels=self.adapters.gateways,
                servers=self.adapters.hub,
                kube=self.adapters.kube,
                notebooks=self.adapters.notebooks,
                clock=self.clock,
                verify_within=max(120.0, 4 * s.decide_interval),
            )

    # ------------------------------------------------------------------ DaemonView (server.py)

    def snapshot(self) -> CycleSnapshot | None:
        return self._snapshot

    def health(self, now: float) -> tuple[bool, str]:
        """Liveness: our own loops tick. Never depends on a gateway, the API server or the GPU."""
        assert self.sampler is not None
        if self.sampler.ticks > 0 and not self.sampler.alive and not self.sampler.stopping:
            return False, "sampler thread stopped"
        started = self._last_cycle_started
        if started is not None and now - started > 10 * self.settings.decide_interval + 60:
            return False, f"decide loop has not started a cycle for {format_duration(now - started)}"
        return True, "ok"

    def stalls(self) -> dict[str, StageState]:
        """Every stage's stall state (the NVML sampling tick included), for /readyz and the metrics."""
        assert self.sampler is not None
        out = {stage: worker.state() for stage, worker in self._stages.items()}
        out["nvml"] = self.sampler.stall_state()
        return {stage: out[stage] for stage in STAGES if stage in out}

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
        assert self.sampler is not None
        snap = self._snapshot
        stalled = {
            stage: f"{st.what} has not returned for {format_duration(st.running_for)}"
            for stage, st in self.stalls().items()
            if st.stalled
        }
        gw = dict(snap.gateway_up) if snap else {}
        details: dict[str, Any] = {
            "sampler": "ok" if self.sampler.ticks > 0 and not self.sampler.wedged(now) else "waiting for samples",
            "observation": "ok" if snap is not None and snap.observed_at is not None else "waiting for first cycle",
            "gateways": {k: ("up" if v else "down" if v is False else "unknown") for k, v in gw.items()},
            "kubernetes": "disabled" if self.adapters.pods is None else ("ok" if self._kube_ok else "unavailable"),
            "pod_resources": "disabled"
            if self.adapters.pod_resources is None
            else ("ok" if self._podres_ok else "unavailable"),
            "hub": "disabled"
            if self.adapters.hub is None
            else ("ok" if self._hub_ok else "unknown" if self._hub_ok is None else "unavailable"),
            "cycles": self._cycles,
            "stalled": stalled,  # stage -> what has not returned: its part of the pipeline is unknown meanwhile
        }
        refused = {k: v for k, v in self._credentials().items() if v}
        details["credentials"] = {k: (f"refused: {v}" if v else "ok") for k, v in self._credentials().items()}
        if refused:
            details["actions"] = f"halted: {halted_reason(refused)}"
        ready = details["sampler"] == "ok" and details["observation"] == "ok" and not stalled and not refused
        return ready, details

    # ------------------------------------------------------------------ credentials (issue 10 item 6)

    def _credentials(self) -> dict[str, str | None]:
        """Every credential the daemon holds -> why it was refused (None: not refused)."""
        out: dict[str, str | None] = {}
        for client in getattr(self.adapters.gateways, "clients", ()):
            source = getattr(client, "credential", None)
            if source is not None:
                out[f"gateway:{client.name}"] = source.rejected
        hub_source = getattr(self.adapters.hub, "credential", None)
        if hub_source is not None:
            out["hub"] = hub_source.rejected
        notebook_source = getattr(self.adapters.notebooks, "credential", None)
        if notebook_source is not None:
            out["kubeflow"] = notebook_source.rejected
        if self.adapters.kube is not None and hasattr(self.adapters.kube, "rejected"):
            out["kubernetes"] = self.adapters.kube.rejected
        return out

    # ------------------------------------------------------------------ one cycle

    async def _in_stage(self, stage: str, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """``fn(*args)`` on the stage's own thread within the call timeout (raises Stalled / CallTimedOut)."""
        return await self._stages[stage].call(fn, *args, timeout=self._call_timeout(), what=what)

    def _call_timeout(self) -> float:
        return max(0.5, min(10.0, self.settings.decide_interval * 0.6))

    async def _pods(self) -> tuple[dict[str, PodInfo], dict[str, str]]:
        pods = self.adapters.pods
        if pods is None:
            return {}, {}
        try:
            await self._in_stage("pod-list", pods.refresh_if_due, what="pod list from the API server")
            self._kube_ok = bool(getattr(pods, "up", True))
        except Exception as exc:
            self._kube_ok = False
            log.warning("pod list failed; using last known pods", error=_describe(exc))
        return {p.uid: p for p in pods.pods()}, dict(pods.kernel_ids())

    async def _allocations(self) -> list[PodGpuAllocation] | None:
        if self.adapters.pod_resources is None:
            return None
        try:
            out = await self._in_stage("pod-resources", self.adapters.pod_resources, what="kubelet pod-resources List")
            self._podres_ok = True
            return list(out)
        except Exception as exc:
            self._podres_ok = False
            log.warning("pod-resources unavailable", error=_describe(exc))
            return None

    async def _servers(self, wanted: bool, missing: frozenset[tuple[str, str]] = frozenset()) -> list[ServerRef] | None:
        """The hub's user servers, asked only when a candidate needs them, from a listing at most ``hub.cache_ttl``
        old; a server a candidate names that the cached listing lacks makes one fresh listing (at most one per decide
        interval). A failed or partial listing leaves no cache and is None: unknown, never "no servers"
        (``_hub_error`` says why). Each server keeps the time it was listed (``listed_at``)."""
        hub = self.adapters.hub
        if hub is None or not wanted:
            return []
        now = self.clock()
        age = now - self._hub_listed_at if self._hub_listed_at is not None else math.inf
        cached = self._hub_servers
        if cached is not None and age < self.settings.hub.cache_ttl:
            known = {(s.user, s.server_name) for s in cached}
            if not (missing - known) or age < self.settings.decide_interval:
                return list(cached)
        try:
            servers = await asyncio.wait_for(hub.list_servers(), self._call_timeout())
            self._hub_ok = servers is not None
            self._hub_error = None if servers is not None else "the hub did not answer every page usably"
        except Exception as exc:
            self._hub_ok = False
            servers = None
            self._hub_error = f"hub listing failed: {type(exc).__name__}"
            log.warning("hub unavailable", error=_describe(exc, "hub server list", self._call_timeout()))
        if servers is None or len(servers) > MAX_CACHED_SERVERS:
            self._hub_servers, self._hub_listed_at = None, None
            return None if servers is None else list(servers)
        self._hub_servers, self._hub_listed_at = list(servers), now
        return list(servers)

    async def _observe(self, kernel_ids: set[str], confirm: bool = False) -> dict[str, KernelActivity]:
        gateways = self.adapters.gateways
        if gateways is not None:
            try:  # keeps reclaimer_gateway_up meaningful when no kernel here asks a gateway anything
                await asyncio.wait_for(
                    gateways.probe_quiet(older_than=max(60.0, self.settings.decide_interval)), self._call_timeout()
                )
            except Exception as exc:
                log.debug("gateway probe did not finish", error=_describe(exc, "gateway probe", self._call_timeout()))
        if not kernel_ids:
            return {}
        now = self.clock()
        if self.adapters.gateways is None:
            return {k: KernelActivity(k, "", now, error="no gateway configured") for k in kernel_ids}
        try:
            observing = (
                self.adapters.gateways.observe(sorted(kernel_ids), confirm=True)
                if confirm
                else self.adapters.gateways.observe(sorted(kernel_ids))
            )
            return dict(await asyncio.wait_for(observing, self._call_timeout() + 1))
        except Exception as exc:
            names = ", ".join(c.name for c in getattr(self.adapters.gateways, "clients", ()))
            error = _describe(
                exc, f"gateway observation of {len(kernel_ids)} kernel(s) (gateways: {names})", self._call_timeout() + 1
            )
            log.warning("gateway observation failed", error=error, kernels=len(kernel_ids))
            return {k: KernelActivity(k, "", now, error=error) for k in kernel_ids}

    async def _server_kernels(self, server: ServerRef) -> list[KernelActivity] | None:
        """Every kernel of one user server (through the hub); None when it could not be listed."""
        assert self.adapters.hub is not None
        try:
            got = await asyncio.wait_for(self.adapters.hub.server_kernels(server), self._call_timeout())
            return list(got) if got is not None else None
        except Exception as exc:
            log.warning(
                "hub kernel listing failed",
                user=server.user,
                server_name=server.server_name,
                error=_describe(exc, "hub kernel listing", self._call_timeout()),
            )
            return None

    async def _hub_kernels(
        self,
        result: join_mod.JoinResult,
        activities: dict[str, KernelActivity],
        servers: list[ServerRef],
        listings: dict[tuple[str, str], list[KernelActivity] | None],
    ) -> dict[str, ServerRef]:
        """Kernels of JupyterHub user servers are observed in their server when no configured gateway knows them.

        Each kernel's server is located exactly (``hub.locate_servers``) and listed directly with a token that opens only
        that server. Returns the server of each kernel found (with its direct address), and puts its activity into
        ``activities``; every listing made lands in ``listings`` (the whole target of a stop-server / evict-pod).
        """
        hub = self.adapters.hub
        missing = [
            c
            for c in result.candidates
            if c.kernel_id
            and (activities.get(c.kernel_id) is None or activities[c.kernel_id].error)
            and not claimed_by_a_gateway(activities.get(c.kernel_id))
        ]  # invariant 14: no third source
        if hub is None or not missing:
            return {}
        try:
            located = await self._in_stage(
                "procfs",
                locate_servers,
                missing,
                servers,
                self.settings.procfs_root,
                self.settings.hub.server_port,
                what="/proc reads locating user servers",
            )
        except Exception as exc:
            log.warning("cannot locate the servers of hub kernels", error=_describe(exc))
            return {}
        wanted = {(s.user, s.server_name, s.origin): s for s in located.values()}

        async def listed(server: ServerRef) -> tuple[ServerRef, list[KernelActivity] | None]:
            return server, await self._server_kernels(server)

        found: dict[str, ServerRef] = {}
        for server, kernels in await asyncio.gather(*(listed(s) for s in wanted.values())):
            listings[(server.user, server.server_name)] = kernels
            for ka in kernels or ():
                if located.get(ka.kernel_id) == server:
                    activities[ka.kernel_id] = ka
                    found[ka.kernel_id] = server
        return found

    async def _attribute(
        self,
        procs: list[tuple[str, Any]],
        pod_kernel_ids: Mapping[str, str],
        listed_at: Mapping[str, float] | None = None,
    ) -> list[AttributedProcess]:
        """GPU processes -> kernels through /proc on the procfs stage's thread. A read that blocks (a process stuck in
        the driver) leaves every process unattributed with the reason (unknown, never idle) and stalls only this
        stage: the cycle, the metrics and the report go on."""
        assert self._attributor is not None
        attributor = self._attributor
        try:
            return list(
                await self._in_stage(
                    "procfs",
                    lambda: attributor.attribute(procs, pod_kernel_ids=pod_kernel_ids, listed_at=listed_at),
                    what=f"/proc reads for {len(procs)} GPU process(es)",
                )
            )
        except (Stalled, CallTimedOut) as exc:
            reason = f"attribution unknown: {exc}"
            if isinstance(exc, Stalled):
                log.warning("attribution skipped", error=str(exc))
            return [
                AttributedProcess(
                    pid=p.pid,
                    starttime=None,
                    gpu_uuid=uuid,
                    used_memory_bytes=p.used_memory_bytes,
                    sm_utilization=p.sm_utilization,
                    reason=reason,
                )
                for uuid, p in procs
            ]

    async def _list_targets(
        self,
        result: join_mod.JoinResult,
        samp: SamplerSnapshot,
        pod_kernel_ids: Mapping[str, str],
        server_lists: dict[tuple[str, str], list[KernelActivity] | None],
        gateway_lists: dict[str, tuple[list[KernelActivity] | None, str | None]],
    ) -> bool:
        """List the whole target (every kernel) of each candidate whose policy stops its server or evicts its pod:
        the server's kernels through the hub, or the listing of the gateway that serves the pod's kernels. Returns
        whether anything new was listed."""
        models = {d.uuid: d.model for d in samp.devices}
        servers: dict[tuple[str, str], ServerRef] = {}
        gateways: set[str] = set()
        for c in result.candidates:
            chosen = policy.select_policy(c, self.settings, models)
            if chosen is None or not actionkinds.may_end_target(chosen.action):
                continue
            if c.server is not None:
                key = (c.server.user, c.server.server_name)
                server = c.server
                if server.origin is None and c.pod is not None:  # a pod's server, reached at the pod's IP
                    server = pod_server(c.pod, server, self.settings.hub.server_port) if self.settings.hub else None
                if key not in server_lists and self.adapters.hub is not None:
                    if server is None:
                        server_lists[key] = None  # no direct address yet (no pod IP): its kernels are unknown
                    else:
                        servers[key] = server
            elif c.pod is not None and c.kernel_id and pod_kernel_ids.get(c.pod.uid) != c.kernel_id:
                gw = c.activity.gateway if c.activity is not None and c.activity.error is None else None
                if gw and gw not in gateway_lists and self.adapters.gateways is not None:
                    gateways.add(gw)
        if not servers and not gateways:
            return False

        async def server_listing(key: tuple[str, str], server: ServerRef) -> None:
            server_lists[key] = await self._server_kernels(server)

        async def gateway_listing(name: str) -> None:
            try:
                got = await asyncio.wait_for(self.adapters.gateways.listing(name), self._call_timeout())
                gateway_lists[name] = (got.kernels, got.error)
            except Exception as exc:
                gateway_lists[name] = (None, f"listing failed: {type(exc).__name__}")

        await asyncio.gather(
            *(server_listing(k, v) for k, v in servers.items()), *(gateway_listing(g) for g in sorted(gateways))
        )
        return True

    async def cycle(self) -> tuple[CycleSnapshot, list[ActionResult]]:
        """One decide cycle over the samples held now. Never raises for a dependency's failure."""
        assert self.sampler is not None and self._attributor is not None and self.executor is not None
        s = self.settings
        t0 = time.perf_counter()
        now = self.clock()
        self._last_cycle_started = now
        samp = self.sampler.snapshot()
        procs = [
            (uuid, p)
            for uuid, series in samp.samples.items()
            if series and series[-1].up and series[-1].processes
            for p in series[-1].processes
        ]
        allocations_at = self.clock()
        (pods_by_uid, pod_kernel_ids), allocations = await asyncio.gather(self._pods(), self._allocations())
        # When each GPU's process list was read: a process started after that is not the one listed (invariant 19).
        listed_at = {uuid: series[-1].timestamp for uuid, series in samp.samples.items() if series}
        attributed = await self._attribute(procs, pod_kernel_ids, listed_at)
        kernel_ids = {p.kernel_id for p in attributed if p.kernel_id}
        activities = await self._observe(kernel_ids)
        servers: list[ServerRef] | None = []
        kernel_servers: dict[str, ServerRef] = {}
        server_lists: dict[tuple[str, str], list[KernelActivity] | None] = {}
        gateway_lists: dict[str, tuple[list[KernelActivity] | None, str | None]] = {}

        if allocations is not None:  # invariant 10: a pod holds its allocation from the first cycle that saw it
            held = join_mod.allocated_gpus_by_pod(pods_by_uid, allocations)
            self._allocation_seen = {uid: self._allocation_seen.get(uid, now) for uid in held}

        def joined_with() -> join_mod.JoinResult:
            return join_mod.join(
                node=s.node_name,
                processes=attributed,
                pods_by_uid=pods_by_uid,
                allocations=allocations,
                activities=activities,
                servers=servers,
                kernel_servers=kernel_servers,
                server_name_annotation=s.kubernetes.server_name_annotation,
                server_kernels=server_lists,
                gateway_kernels=gateway_lists,
                kernel_pods=pod_kernel_ids,
                first_seen=samp.first_seen,
                allocation_seen=self._allocation_seen,
                hub_error=self._hub_error,
                pods_listed_at=getattr(self.adapters.pods, "last_success_at", None),
            )

        joined = joined_with()
        if self.adapters.hub is not None:
            # The hub is asked only for candidates that need it: a kernel no gateway could tell about, or a
            # candidate whose pod names a user (its server is part of what a decision covers).
            unobserved = any(
                c.kernel_id and (activities.get(c.kernel_id) is None or activities[c.kernel_id].error)
                for c in joined.candidates
            )
            named = frozenset(
                (c.pod.user, c.pod.annotations.get(s.kubernetes.server_name_annotation, ""))
                for c in joined.candidates
                if c.pod is not None and c.pod.user
            )
            if unobserved or named:
                servers = await self._servers(True, named)
                joined = joined_with()
            if unobserved and servers:
                kernel_servers.update(await self._hub_kernels(joined, activities, servers, server_lists))
                joined = joined_with()
        if await self._list_targets(joined, samp, pod_kernel_ids, server_lists, gateway_lists):
            joined = joined_with()
        joined = await self._notebooks(joined)
        observed_at = self.clock()
        planned = policy.plan(joined.candidates, samp, s, now, self._state)
        decisions, self._state = planned.decisions, planned.state
        if planned.breaker.new_trip:
            log.warning("circuit breaker tripped", cause=planned.breaker.cause, reason=planned.breaker.reason)
        credentials = self._credentials()
        halted = halted_reason(credentials)
        if halted:
            # A credential the other side refused even after re-reading its file: what the daemon sees may be
            # partial and what it would do may fail half-way. Nothing is acted on until it is accepted again.
            decisions = [
                replace(d, verdict=Verdict.UNKNOWN, reason=f"actions halted ({halted}); was: {d.reason}")
                if d.verdict is Verdict.RECLAIM
                else d
                for d in decisions
            ]
        results = await self.executor.execute(decisions, recheck=self._recheck)
        results += self.executor.verify(self.sampler.snapshot(), self.clock())
        results += await self.executor.verify_allocations(allocations, allocations_at, self.clock())
        decisions = self._with_holds(decisions, self.clock())
        self._remember(results, now)
        gpu_idle = self._gpu_idle(samp, decisions, now)
        gw_up = self.adapters.gateways.gateway_up() if self.adapters.gateways is not None else {}
        snap = CycleSnapshot(
            node=s.node_name,
            mode=s.mode,
            generated_at=now,
            sampler=samp,
            decisions=tuple(decisions),
            unattributed=joined.unattributed,
            gpu_idle_seconds=gpu_idle,
            gateway_up=gw_up,
            observed_at=observed_at,
            breaker=planned.breaker,
            credentials=credentials,
        )
        self._account(snap, results)
        self._snapshot = snap
        self.metrics.prepare(snap)  # the per-kernel series are rendered here, once, not in every scrape
        self._cycles += 1
        self._last_cycle_at = now
        duration = time.perf_counter() - t0
        self.metrics.decide_duration_seconds.observe(duration)
        counts: dict[str, int] = {}
        for d in decisions:
            counts[d.verdict.value] = counts.get(d.verdict.value, 0) + 1
        log.info(
            "cycle",
            mode=s.mode,
            gpus=len(samp.devices),
            gpu_processes=len(procs),
            candidates=len(decisions),
            unattributed=len(joined.unattributed),
            actions=len(results),
            duration_ms=round(duration * 1000, 1),
            stalled=sorted(stage for stage, st in self.stalls().items() if st.stalled),
            **counts,
        )
        if self.on_cycle is not None:
            self.on_cycle(snap, results)
        return snap, results

    async def _notebook_ref(self, namespace: str, name: str) -> NotebookRef:
        try:
            return await asyncio.wait_for(self.adapters.notebooks.kernels(namespace, name), self._call_timeout())
        except Exception as exc:  # unknown, never idle
            return NotebookRef(namespace, name, None, f"notebook server: {type(exc).__name__}", self.clock())

    async def _notebooks(self, joined: join_mod.JoinResult) -> join_mod.JoinResult:
        """Kubeflow notebook pods: each notebook server's kernels (stop-notebook's whole target), asked at the URL
        built from ``kubeflow.notebook_url``; a kernel no configured gateway knows is observed there."""
        if self.adapters.notebooks is None:
            return joined
        wanted = {
            (c.pod.namespace, nb)
            for c in joined.candidates
            if c.pod is not None and (nb := actionkinds.kubeflow_notebook(c.pod)) is not None
        }
        await self.adapters.notebooks.prune(wanted)
        if not wanted:
            return joined
        refs = dict(zip(wanted, await asyncio.gather(*(self._notebook_ref(ns, nb) for ns, nb in wanted))))
        out = []
        for c in joined.candidates:
            nb = actionkinds.kubeflow_notebook(c.pod) if c.pod is not None else None
            if nb is None:
                out.append(c)
                continue
            ref = refs[(c.pod.namespace, nb)]
            c = replace(c, notebook=ref)
            if c.kernel_id is not None and not claimed_by_a_gateway(c.activity):
                seen = next((k for k in ref.kernels or () if k.kernel_id == c.kernel_id), None)
                if seen is not None:
                    c = replace(c, activity=seen, gateway=seen.gateway if seen.error is None else None)
            out.append(c)
        return replace(joined, candidates=tuple(out))

    async def _recheck(self, d: Decision) -> Decision:
        """Right before acting: fresh gateway view and the newest samples must still say reclaim. For a pod-bound
        candidate the pod itself is read again (a GET, not the cached list: an exemption added after the warning
        wins); for stop-server / evict-pod the server is asked of the hub again and every kernel of the target is
        listed again."""
        assert self.sampler is not None
        c = d.candidate
        fresh: KernelActivity | None = None
        notebook_kernel = False
        nb = c.notebook
        if nb is not None and self.adapters.notebooks is not None:
            # The notebook server's kernels again: stop-notebook ends all of them; its own kernel may be seen there.
            ref = await self._notebook_ref(nb.namespace, nb.name)
            d = replace(d, candidate=replace(c, notebook=ref))
            c = d.candidate
            if c.kernel_id is not None and c.gateway == KUBEFLOW_GATEWAY:
                fresh = next((k for k in ref.kernels or () if k.kernel_id == c.kernel_id), None)
                notebook_kernel = True
        if c.kernel_id is not None and not notebook_kernel:
            # Every gateway is asked again (not only the one cached): two answering for one id is unknown (inv. 14).
            got = await self._observe({c.kernel_id}, confirm=True)
            fresh = got.get(c.kernel_id)
            if (fresh is None or fresh.error) and c.server is not None and self.adapters.hub is not None:
                listed = await asyncio.wait_for(self.adapters.hub.server_kernels(c.server), self._call_timeout())
                fresh = next((k for k in listed or () if k.kernel_id == c.kernel_id), fresh)
        refreshed, problem = await self._reread_target(d, fresh)
        if problem is not None:
            return policy.recheck_failed(d, problem)
        return policy.recheck(d, fresh, self.sampler.snapshot(), self.settings, self.clock(), refreshed=refreshed)

    async def _reread_target(self, d: Decision, fresh: KernelActivity | None) -> tuple[Candidate, str | None]:
        """The candidate with its pod, server and whole target read again now; or the reason they cannot be."""
        c = d.candidate
        kube = self.adapters.kube
        if c.pod is not None and kube is not None:
            try:
                # On the API server's stage thread: a GET that hangs stalls that stage only, never the cycle.
                pod = await self._in_stage(
                    "pod-list",
                    kube.get_pod,
                    c.pod.namespace,
                    c.pod.name,
                    what=f"GET pod {c.pod.namespace}/{c.pod.name}",
                )
            except Exception as exc:
                return c, f"cannot read pod {c.pod.namespace}/{c.pod.name} again ({exc})"
            if pod is None:
                return c, f"pod {c.pod.namespace}/{c.pod.name} is gone"
            if pod.uid != c.pod.uid:
                return c, f"pod {c.pod.namespace}/{c.pod.name} was replaced (uid {pod.uid}, planned for {c.pod.uid})"
            c = replace(c, pod=pod)
        if actionkinds.spec(d.action).whole != "target":
            return c, None
        hub = self.adapters.hub
        if c.server is not None:
            if hub is None:
                return c, "no hub to ask for the server again"
            try:
                servers = await asyncio.wait_for(hub.user_servers(c.server.user), self._call_timeout())
            except Exception as exc:
                servers = None
                log.warning("hub user lookup failed", user=c.server.user, error=str(exc))
            if servers is None:
                return c, f"cannot ask the hub for {c.server.user}'s servers again"
            server = next((s for s in servers if s.server_name == c.server.server_name), None)
            if server is None:
                return c, f"the hub no longer lists server {c.server.label}"
            # Reached where the cycle found it (the pod's IP, or the server process's loopback port).
            server = replace(server, origin=c.server.origin, pid=server.pid or c.server.pid)
            if server.origin is None and c.pod is not None and self.settings.hub is not None:
                server = pod_server(c.pod, server, self.settings.hub.server_port) or server
            kernels = await self._server_kernels(server)
            return replace(
                c,
                server=server,
                target_kernels=tuple(kernels) if kernels is not None else None,
                target_error=None if kernels is not None else "its kernel list could not be read",
            ), None
        if c.target_source.startswith(join_mod.KERNEL_POD_TARGET):
            return replace(
                c,
                target_kernels=(fresh,) if fresh is not None and fresh.error is None else None,
                target_error="its kernel's state is unknown",
            ), None
        if c.target_source.startswith(join_mod.GATEWAY_TARGET) and self.adapters.gateways is not None:
            name = c.target_source.removeprefix(join_mod.GATEWAY_TARGET)
            try:
                got = await asyncio.wait_for(self.adapters.gateways.listing(name), self._call_timeout())
                kernels, error = got.kernels, got.error
            except Exception as exc:
                kernels, error = None, f"listing failed: {type(exc).__name__}"
            return replace(c, target_kernels=tuple(kernels) if kernels is not None else None, target_error=error), None
        return c, None

    def _with_holds(self, decisions: Sequence[Decision], now: float) -> list[Decision]:
        """A reclaim the executor is backing off from says so in its reason (the report and the logs show it)."""
        assert self.executor is not None
        out = []
        for d in decisions:
            held = self.executor.hold(d.candidate.key, now) if d.verdict is Verdict.RECLAIM else None
            out.append(replace(d, reason=f"{d.reason}; {held}") if held else d)
        return out

    def _remember(self, results: Sequence[ActionResult], now: float) -> None:
        acted = {r.decision.candidate.key for r in results if r.result in ("success", "already-gone", "blocked")}
        last = dict(self._state.last_action_at)
        last.update(dict.fromkeys(acted, now))
        # Forget cooldowns that ended long ago: bounded by the actions of the last two cooldowns, not by history.
        horizon = now - 2 * self.settings.limits.cooldown
        if acted or any(v < horizon for v in last.values()):
            self._state = replace(self._state, last_action_at={k: v for k, v in last.items() if v >= horizon})

    def _threshold(self, d: Decision) -> float:
        for p in self.settings.policies:
            if p.name == d.policy:
                return p.gpu_idle_below
        return self.settings.policies[-1].gpu_idle_below

    def _gpu_idle(self, samp: SamplerSnapshot, decisions: Sequence[Decision], now: float) -> dict[str, float | None]:
        holder_threshold: dict[str, float] = {}
        for d in decisions:
            for u in d.candidate.gpu_uuids:
                holder_threshold[u] = min(holder_threshold.get(u, 1.0), self._threshold(d))
        default = min(p.gpu_idle_below for p in self.settings.policies)
        return {
            dev.uuid: policy.gpu_idle_seconds(
                samp.samples.get(dev.uuid, ()),
                holder_threshold.get(dev.uuid, default),
                now,
                samp.started_at,
                samp.sample_interval,
                samp.history.get(dev.uuid),
            )
            for dev in samp.devices
        }

    def _account(self, snap: CycleSnapshot, results: Sequence[ActionResult]) -> None:
        from reclaimer.core.views import allocation_holdings, candidate_namespace, held_idle_increments

        prev = self._snapshot.generated_at if self._snapshot is not None else None
        self.metrics.add_held_idle(
            held_idle_increments(prev, snap, self._threshold),
            held_idle_increments(prev, snap, self._threshold, allocation_holdings),
        )
        self.metrics.forget_quiet_namespaces(
            {candidate_namespace(d.candidate) for d in snap.decisions}, snap.generated_at
        )
        for r in results:
            self.metrics.record_action(r)
        if snap.breaker.new_trip:
            self.metrics.record_breaker_trip(snap.breaker)

    # ------------------------------------------------------------------ loops

    async def decide_loop(self) -> None:
        """Cycles on a fixed grid (no drift); a cycle that overruns skips the missed slots."""
        assert self._stop is not None
        interval = self.settings.decide_interval
        start = time.monotonic()
        k = 0
        while not self._stop.is_set():
            try:
                await self.cycle()
            except Exception as exc:  # a bug in one cycle must not end the daemon
                log.error("cycle failed", error=repr(exc), exc_info=exc)
            k = max(k + 1, int((time.monotonic() - start) / interval) + 1)
            delay = start + k * interval - time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, delay))

    async def wait_first_samples(self, timeout: float) -> None:
        assert self.sampler is not None
        deadline = time.monotonic() + timeout
        while self.sampler.ticks == 0 and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, self.settings.sample_interval))

    async def run(self, *, once: bool = False, serve: bool = True) -> int:
        from reclaimer.export.server import BearerToken, make_app
        from reclaimer.export.server import serve as serve_app

        assert self.sampler is not None
        # An unusable token file is a start-up error naming the file, before anything runs.
        token = BearerToken(self.settings.listen_token_file) if serve and self.settings.listen_token_file else None
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        self.sampler.start()
        runner = None
        try:
            if serve:
                host, port = self.settings.listen_host_port
                runner = await serve_app(make_app(self, self.metrics, token), host, port)
                log.info(
                    "serving",
                    listen=self.settings.listen,
                    endpoints="/metrics /healthz /readyz /report",
                    bearer_token_on="/metrics /report" if token is not None else "none",
                )
            await self.wait_first_samples(timeout=max(5.0, 5 * self.settings.sample_interval))
            if once:
                await self.cycle()
                return 0
            create_guarded_task(self.decide_loop(), "decide-loop", self._tasks)
            await self._stop.wait()
            log.info("stopping", reason="signal")
            return 0
        finally:
            await self.close(runner)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self, runner: Any = None) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3)
        if runner is not None:
            await runner.cleanup()
        assert self.sampler is not None
        stopped = await asyncio.to_thread(self.sampler.stop, 2.0)
        for worker in self._stages.values():
            worker.close()
        for closer in (self.adapters.gateways, self.adapters.hub, self.adapters.notebooks):
            if closer is not None and hasattr(closer, "close"):
                with contextlib.suppress(Exception):
                    await closer.close()
        if not stopped:  # the sampling thread is inside an NVML call: shutting NVML down now could block too
            log.warning("sampler thread still in an NVML call; leaving NVML as it is", stage="nvml")
            return
        with contextlib.suppress(Exception):
            self.adapters.backend.close()


# ---------------------------------------------------------------------- building the adapters from Settings


def _describe(exc: BaseException, what: str = "call", timeout: float | None = None) -> str:
    """What failed, in words: a timeout names what timed out and after how long (``str(TimeoutError())`` is "")."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"{what} did not finish within {timeout:g}s" if timeout is not None else f"{what} timed out"
    return str(exc) or f"{what} failed: {type(exc).__name__}"


def build_adapters(settings: Settings, backend: GpuBackend | None = None) -> Adapters:
    """Open every configured edge. A missing optional dependency (Kubernetes with enabled: auto) is logged, not fatal."""
    from reclaimer.observe.gateway import GatewayClient, GatewayPool

    if backend is None:
        backend = open_backend(settings.gpu)
    adapters = Adapters(backend=backend)
    if settings.gateways:
        adapters.gateways = GatewayPool([GatewayClient(g) for g in settings.gateways])
    if settings.hub is not None:
        from reclaimer.observe.hub import HubClient

        adapters.hub = HubClient(settings.hub)
    if settings.kubeflow is not None:
        from reclaimer.observe.kubeflow import NotebookServers

        adapters.notebooks = NotebookServers(settings.kubeflow)
    k = settings.kubernetes
    if k.enabled is not False:
        from reclaimer.observe.kube import KubeClient, KubeUnavailable, PodCache

        try:
            adapters.kube = KubeClient.from_settings(k, node_name=settings.node_name)
        except KubeUnavailable as exc:
            if k.enabled is True:
                raise StartupError(f"kubernetes.enabled is true but no cluster config was found: {exc}") from None
            log.info("kubernetes not configured; running without pod metadata", cause=str(exc))
        if adapters.kube is not None:
            from reclaimer.observe.podresources import list_gpu_allocations

            adapters.pods = PodCache(adapters.kube, settings.node_name, k)
            adapters.pod_resources = lambda: list_gpu_allocations(
                k.pod_resources_socket, timeout=min(2.0, k.timeout), mig_parents=backend.mig_parents()
            )
    return adapters


def run_daemon(settings: Settings, once: bool = False) -> int:
    """`reclaimer run`: the daemon until SIGTERM (or one full cycle with ``once``)."""
    from reclaimer.export.logs import configure_logging, log_effective_config

    configure_logging(settings.log_level)
    log_effective_config(settings)
    adapters = build_adapters(settings)
    daemon = Daemon(settings, adapters)

    async def main() -> int:
        return await daemon.run(once=once)

    return asyncio.run(main())


def run_report(
    settings: Settings, window: float, output: str, source_url: str | None, token_file: str | None = None
) -> int:
    """`reclaimer report`: from a running daemon's /report, or one-shot (sample for ``window``, observe, decide)."""
    from reclaimer.export.logs import configure_logging
    from reclaimer.export.report import build_report, render_json, report_from_json
    from reclaimer.export.table import render_table

    configure_logging("warning", stream=sys.stderr)
    if source_url:
        token = None
        if token_file:
            from reclaimer.export.server import _read_token_file

            token = _read_token_file(token_file)
        report = report_from_json(asyncio.run(_fetch_report(source_url, timeout=10.0, token=token)))
    else:
        adapters = build_adapters(settings)
        # The report never acts: it shows what the configured mode would do now, over `window` of samples.
        sampler = Sampler(
            adapters.backend,
            interval=settings.sample_interval,
            window_seconds=max(window, settings.sample_interval) + settings.sample_interval,
        )
        daemon = Daemon(settings, adapters, executor=DryRunExecutor(), sampler=sampler)

        async def main() -> CycleSnapshot:
            sampler.start()
            try:
                await daemon.wait_first_samples(timeout=max(5.0, 5 * settings.sample_interval))
                await asyncio.sleep(window)  # the sampling window itself, not a synchronisation
                snap, _ = await daemon.cycle()
                return snap
            finally:
                await daemon.close()

        report = build_report(asyncio.run(main()))
    sys.stdout.write(render_json(report) if output == "json" else render_table(report))
    sys.stdout.write("\n")
    return 0


async def _fetch_report(url: str, timeout: float, token: str | None = None) -> dict[str, Any]:
    import aiohttp

    from reclaimer.core.errors import ReclaimerError

    target = url.rstrip("/") + "/report"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(target, allow_redirects=False, headers=headers) as resp:
                if resp.status == 401:
                    hint = "the token was refused" if token else "it needs a bearer token: pass --token-file"
                    raise ReclaimerError(f"{target} answered HTTP 401: {hint}")
                if resp.status != 200:
                    raise ReclaimerError(f"{target} answered HTTP {resp.status}")
                return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise ReclaimerError(f"cannot read {target}: {exc or type(exc).__name__}") from None
