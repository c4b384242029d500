"""One decide cycle of one node, as the sequence of its stages.

``Pipeline.cycle`` reads top to bottom as the pipeline does:

1. snapshot the sampler (the window of NVML samples the sampler thread keeps);
2. pods (the API server's list, cached) and GPU allocations (kubelet pod-resources), side by side;
3. attribute each GPU process to a kernel through /proc;
4. observe the kernels at the configured gateways, then (only for candidates that need it) the hub and the
   servers it names, the whole target of each stop-server / evict-pod, and the Kubeflow notebook servers; every
   view joined into candidates (core.candidates, pure) again whenever one told more (``NodeView``, ``_views``);
5. plan (core.policy, pure: ``now`` is an argument); every reclaim unknown while a credential is refused;
6. execute the plan (the executor re-checks each reclaim right before acting: ``recheck``), verify what earlier
   actions freed;
7. export: the snapshot, and what this cycle adds to the cumulative counters (export.accounting).

Blocking calls (procfs, the kubernetes client, the kubelet socket) run on one thread per stage (observe.stall)
within a timeout shorter than the decide interval, so one slow dependency never stalls the loop, the scrape or
the other dependencies. The hub fallback (its cached server listing and the kernels of the servers it names) is
its own class in app.hubfallback: it composes the hub adapter with what the gateways and /proc said, which no
single adapter may do. The loops, endpoints and lifecycle are app.daemon's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import structlog

from reclaimer.act.actions import DryRunExecutor, LiveExecutor
from reclaimer.app.adapters import Adapters
from reclaimer.app.hubfallback import HubFallback, describe
from reclaimer.core import actionkinds, keys, policy
from reclaimer.core import candidates as join_mod
from reclaimer.core.config import Settings
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
    ProcessSample,
    SamplerSnapshot,
    ServerRef,
    halted_reason,
)
from reclaimer.core.results import ALREADY_GONE, BLOCKED, SUCCESS
from reclaimer.core.sources import KUBEFLOW_GATEWAY
from reclaimer.core.verdicts import Verdict
from reclaimer.observe.attribution import Attributor
from reclaimer.observe.gateway import claimed_by_a_gateway
from reclaimer.observe.hub import pod_server
from reclaimer.observe.sampler import Sampler
from reclaimer.observe.stall import STAGES, CallTimedOut, StageState, StageWorker, Stalled

if TYPE_CHECKING:
    from reclaimer.export.accounting import ExportAccounting
    from reclaimer.export.metrics import Metrics

log = structlog.get_logger(__name__)
T = TypeVar("T")

GatewayLists = dict[str, tuple[list[KernelActivity] | None, str | None]]
ServerLists = dict[tuple[str, str], list[KernelActivity] | None]


def gpu_processes(samp: SamplerSnapshot) -> list[tuple[str, ProcessSample]]:
    """(GPU uuid, process) for every process of each GPU's newest tick (none from a GPU that is down)."""
    return [
        (uuid, p)
        for uuid, series in samp.samples.items()
        if series and series[-1].up and series[-1].processes
        for p in series[-1].processes
    ]


def listed_at(samp: SamplerSnapshot) -> dict[str, float]:
    """When each GPU's process list was read: a process started after that is not the one listed (invariant 19)."""
    return {uuid: series[-1].timestamp for uuid, series in samp.samples.items() if series}


def halt_if_refused(decisions: Sequence[Decision], credentials: Mapping[str, str | None]) -> list[Decision]:
    """Every reclaim unknown while a credential is refused (even after re-reading its file): what the daemon sees
    may be partial and what it would do may fail half-way. Nothing is acted on until it is accepted again."""
    halted = halted_reason(credentials)
    if not halted:
        return list(decisions)
    return [
        replace(d, verdict=Verdict.UNKNOWN, reason=f"actions halted ({halted}); was: {d.reason}")
        if d.verdict is Verdict.RECLAIM
        else d
        for d in decisions
    ]


@dataclass
class NodeView:
    """What one cycle has learnt about the node so far; each observing stage adds to it, ``Pipeline._join`` turns
    it into candidates."""

    samples: SamplerSnapshot
    processes: list[AttributedProcess]
    pods_by_uid: dict[str, PodInfo]
    kernel_pods: dict[str, str]  # pod uid -> the kernel id its labels name
    allocations: list[PodGpuAllocation] | None  # None: unknown
    activities: dict[str, KernelActivity]  # kernel id -> what its gateway (or the hub, or Kubeflow) says
    servers: list[ServerRef] | None = field(default_factory=list)  # the hub's user servers (None: unknown)
    kernel_servers: dict[str, ServerRef] = field(default_factory=dict)  # kernel id -> the server it was found in
    server_lists: ServerLists = field(default_factory=dict)  # every kernel of a server (a whole target)
    gateway_lists: GatewayLists = field(default_factory=dict)  # every kernel of a gateway (a whole target)


class Pipeline:
    """The stages of one decide cycle and what they keep between cycles (policy state, caches, dependency health)."""

    def __init__(
        self,
        settings: Settings,
        adapters: Adapters,
        *,
        sampler: Sampler,
        executor: DryRunExecutor | LiveExecutor,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        from reclaimer.export.accounting import ExportAccounting

        self.settings = settings
        self.adapters = adapters
        self.sampler = sampler
        self.executor = executor
        self.metrics = metrics
        self.clock = clock
        self.state = PolicyState()
        self.attributor = Attributor(procfs_root=settings.procfs_root)
        # One thread per blocking stage: a /proc read or API call that never returns stalls its stage, nothing else.
        self.stages = {stage: StageWorker(stage) for stage in ("procfs", "pod-list", "pod-resources")}
        self.call_timeout = max(0.5, min(10.0, settings.decide_interval * 0.6))
        self.hub: HubFallback | None = (
            HubFallback(adapters.hub, settings, clock=clock, timeout=self.call_timeout, procfs=self.stages["procfs"])
            if adapters.hub is not None
            else None
        )
        self.accounting: ExportAccounting = ExportAccounting(metrics, settings)
        self.kube_ok: bool | None = None
        self.podres_ok: bool | None = None
        self._allocation_seen: dict[str, float] = {}  # pod uid -> first cycle that saw its allocation

    # ------------------------------------------------------------------ the cycle

    async def cycle(self, now: float) -> tuple[CycleSnapshot, list[ActionResult]]:
        """One decide cycle at ``now`` over the samples held now. Never raises for a dependency's failure."""
        t0 = time.perf_counter()
        # 1. the samples: the window the sampler thread keeps, and the GPU processes of the newest tick
        samp = self.sampler.snapshot()
        procs = gpu_processes(samp)
        # 2. pods (cached list) and their GPU allocations (kubelet), side by side
        allocations_at = self.clock()
        (pods_by_uid, kernel_pods), allocations = await asyncio.gather(self._pods(), self._allocations())
        self._note_allocations(pods_by_uid, allocations, now)
        # 3. GPU processes -> kernels through /proc
        attributed = await self._attribute(procs, kernel_pods, listed_at(samp))
        # 4. the gateways' view of those kernels; then the hub, whole targets and Kubeflow where candidates need them
        activities = await self.observe({p.kernel_id for p in attributed if p.kernel_id})
        view = NodeView(samp, attributed, pods_by_uid, kernel_pods, allocations, activities)
        joined = await self._views(view)
        observed_at = self.clock()
        # 5. plan: pure policy over the candidates and the samples (nothing reclaimed while a credential is refused)
        planned = policy.plan(joined.candidates, samp, self.settings, now, self.state)
        self.state = planned.state
        if planned.breaker.new_trip:
            log.warning("circuit breaker tripped", cause=planned.breaker.cause, reason=planned.breaker.reason)
        credentials = self.credentials()
        decisions = halt_if_refused(planned.decisions, credentials)
        # 6. act (each reclaim re-checked right before: ``recheck``), then verify what earlier actions freed
        results = await self.executor.execute(decisions, recheck=self.recheck)
        results += self.executor.verify(self.sampler.snapshot(), self.clock())
        results += await self.executor.verify_allocations(allocations, allocations_at, self.clock())
        decisions = self._with_holds(decisions, self.clock())
        self.remember(results, now)
        # 7. export: the snapshot the endpoints serve, the counters, one log line
        snap = CycleSnapshot(
            node=self.settings.node_name,
            mode=self.settings.mode,
            generated_at=now,
            sampler=samp,
            decisions=tuple(decisions),
            unattributed=joined.unattributed,
            gpu_idle_seconds=policy.gpu_idle_by_device(samp, decisions, self.settings, now),
            gateway_up=self.adapters.gateways.gateway_up() if self.adapters.gateways is not None else {},
            observed_at=observed_at,
            breaker=planned.breaker,
            credentials=credentials,
        )
        self._export(snap, results, gpu_processes=len(procs), started=t0)
        return snap, results

    async def _views(self, view: NodeView) -> join_mod.JoinResult:
        """Step 4 past the gateways: join the views into candidates, and ask the hub, the targets' listings and the
        Kubeflow notebook servers only for the candidates that need them (joining again whenever one told more)."""
        joined = self._join(view)
        if self.hub is not None:
            # The hub is asked only for candidates that need it: a kernel no gateway could tell about, or a
            # candidate whose pod names a user (its server is part of what a decision covers).
            unobserved = any(
                c.kernel_id and (view.activities.get(c.kernel_id) is None or view.activities[c.kernel_id].error)
                for c in joined.candidates
            )
            annotation = self.settings.kubernetes.server_name_annotation
            named = frozenset(
                (c.pod.user, c.pod.annotations.get(annotation, ""))
                for c in joined.candidates
                if c.pod is not None and c.pod.user
            )
            if unobserved or named:
                view.servers = await self.hub.servers(True, named)
                joined = self._join(view)
            if unobserved and view.servers:
                found = await self.hub.kernels(joined, view.activities, view.servers, view.server_lists)
                view.kernel_servers.update(found)
                joined = self._join(view)
        if await self._list_targets(joined, view.samples, view.kernel_pods, view.server_lists, view.gateway_lists):
            joined = self._join(view)
        return await self._notebooks(joined)

    def _join(self, view: NodeView) -> join_mod.JoinResult:
        """Every view of the node so far into candidates (core.candidates, pure)."""
        s = self.settings
        return join_mod.join(
            node=s.node_name,
            processes=view.processes,
            pods_by_uid=view.pods_by_uid,
            allocations=view.allocations,
            activities=view.activities,
            servers=view.servers,
            kernel_servers=view.kernel_servers,
            server_name_annotation=s.kubernetes.server_name_annotation,
            server_kernels=view.server_lists,
            gateway_kernels=view.gateway_lists,
            kernel_pods=view.kernel_pods,
            first_seen=view.samples.first_seen,
            allocation_seen=self._allocation_seen,
            hub_error=self.hub.error if self.hub is not None else None,
            pods_listed_at=self.adapters.pods.last_success_at if self.adapters.pods is not None else None,
        )

    def _export(
        self, snap: CycleSnapshot, results: Sequence[ActionResult], *, gpu_processes: int, started: float
    ) -> None:
        """What the cycle adds to the counters, the series rendered once for the scrapes, and the cycle's log line."""
        self.accounting.record(snap, results)
        self.metrics.prepare(snap)  # the per-kernel series are rendered here, once, not in every scrape
        seconds = time.perf_counter() - started  # the whole cycle, this export included
        self.metrics.decide_duration_seconds.observe(seconds)
        counts: dict[str, int] = {}
        for d in snap.decisions:
            counts[d.verdict.value] = counts.get(d.verdict.value, 0) + 1
        log.info(
            "cycle",
            mode=snap.mode,
            gpus=len(snap.sampler.devices),
            gpu_processes=gpu_processes,
            candidates=len(snap.decisions),
            unattributed=len(snap.unattributed),
            actions=len(results),
            duration_ms=round(seconds * 1000, 1),
            stalled=sorted(stage for stage, st in self.stalls().items() if st.stalled),
            **counts,
        )

    # ------------------------------------------------------------------ health of the stages and credentials

    def stalls(self) -> dict[str, StageState]:
        """Every stage's stall state (the NVML sampling tick included), for /readyz and the metrics."""
        out = {stage: worker.state() for stage, worker in self.stages.items()}
        out["nvml"] = self.sampler.stall_state()
        return {stage: out[stage] for stage in STAGES if stage in out}

    def credentials(self) -> dict[str, str | None]:
        """Every credential the daemon holds -> why it was refused (None: not refused)."""
        a = self.adapters
        out: dict[str, str | None] = {}
        for client in a.gateways.clients if a.gateways is not None else ():
            if client.credential is not None:
                out[keys.gateway_credential(client.name)] = client.credential.rejected
        if a.hub is not None and a.hub.credential is not None:
            out[keys.HUB_CREDENTIAL] = a.hub.credential.rejected
        if a.notebooks is not None and a.notebooks.credential is not None:
            out[keys.KUBEFLOW_CREDENTIAL] = a.notebooks.credential.rejected
        if a.kube is not None:
            out[keys.KUBERNETES_CREDENTIAL] = a.kube.rejected
        return out

    def close(self) -> None:
        for worker in self.stages.values():
            worker.close()

    # ------------------------------------------------------------------ 2. pods and allocations

    async def _in_stage(self, stage: str, fn: Callable[..., T], *args: object, what: str) -> T:
        """``fn(*args)`` on the stage's own thread within the call timeout (raises Stalled / CallTimedOut)."""
        return await self.stages[stage].call(fn, *args, timeout=self.call_timeout, what=what)

    async def _pods(self) -> tuple[dict[str, PodInfo], dict[str, str]]:
        pods = self.adapters.pods
        if pods is None:
            return {}, {}
        try:
            await self._in_stage("pod-list", pods.refresh_if_due, what="pod list from the API server")
            self.kube_ok = bool(pods.up)
        except Exception as exc:
            self.kube_ok = False
            log.warning("pod list failed; using last known pods", error=describe(exc))
        return {p.uid: p for p in pods.pods()}, dict(pods.kernel_ids())

    async def _allocations(self) -> list[PodGpuAllocation] | None:
        pod_resources = self.adapters.pod_resources
        if pod_resources is None:
            return None
        try:
            out = await self._in_stage("pod-resources", pod_resources, what="kubelet pod-resources List")
            self.podres_ok = True
            return list(out)
        except Exception as exc:
            self.podres_ok = False
            log.warning("pod-resources unavailable", error=describe(exc))
            return None

    def _note_allocations(
        self, pods_by_uid: Mapping[str, PodInfo], allocations: Sequence[PodGpuAllocation] | None, now: float
    ) -> None:
        """Invariant 10: a pod holds its allocation from the first cycle that saw it (pods no longer holding one
        are forgotten; an unknown allocation list changes nothing)."""
        if allocations is not None:
            held = join_mod.allocated_gpus_by_pod(pods_by_uid, allocations)
            self._allocation_seen = {uid: self._allocation_seen.get(uid, now) for uid in held}

    # ------------------------------------------------------------------ 3. attribution

    async def _attribute(
        self,
        procs: list[tuple[str, ProcessSample]],
        pod_kernel_ids: Mapping[str, str],
        listed_at: Mapping[str, float] | None = None,
    ) -> list[AttributedProcess]:
        """GPU processes -> kernels through /proc on the procfs stage's thread. A read that blocks (a process stuck in
        the driver) leaves every process unattributed with the reason (unknown, never idle) and stalls only this
        stage: the cycle, the metrics and the report go on."""
        attributor = self.attributor
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

    # ------------------------------------------------------------------ 4. gateways, hub, whole targets, Kubeflow

    async def observe(self, kernel_ids: set[str], confirm: bool = False) -> dict[str, KernelActivity]:
        """What the configured gateways say about ``kernel_ids`` (each unknown, with the reason, when they cannot)."""
        gateways = self.adapters.gateways
        if gateways is not None:
            try:  # keeps reclaimer_gateway_up meaningful when no kernel here asks a gateway anything
                await asyncio.wait_for(
                    gateways.probe_quiet(older_than=max(60.0, self.settings.decide_interval)), self.call_timeout
                )
            except Exception as exc:
                log.debug("gateway probe did not finish", error=describe(exc, "gateway probe", self.call_timeout))
        if not kernel_ids:
            return {}
        now = self.clock()
        if gateways is None:
            return {k: KernelActivity(k, "", now, error="no gateway configured") for k in kernel_ids}
        try:
            observing = (
                gateways.observe(sorted(kernel_ids), confirm=True) if confirm else gateways.observe(sorted(kernel_ids))
            )
            return dict(await asyncio.wait_for(observing, self.call_timeout + 1))
        except Exception as exc:
            names = ", ".join(c.name for c in gateways.clients)
            error = describe(
                exc, f"gateway observation of {len(kernel_ids)} kernel(s) (gateways: {names})", self.call_timeout + 1
            )
            log.warning("gateway observation failed", error=error, kernels=len(kernel_ids))
            return {k: KernelActivity(k, "", now, error=error) for k in kernel_ids}

    async def _list_targets(
        self,
        result: join_mod.JoinResult,
        samp: SamplerSnapshot,
        pod_kernel_ids: Mapping[str, str],
        server_lists: ServerLists,
        gateway_lists: GatewayLists,
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
                server: ServerRef | None = c.server
                if c.server.origin is None and c.pod is not None:  # a pod's server, reached at the pod's IP
                    server = pod_server(c.pod, c.server, self.settings.hub.server_port) if self.settings.hub else None
                if key not in server_lists and self.hub is not None:
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
        hub, pool = self.hub, self.adapters.gateways

        async def server_listing(key: tuple[str, str], server: ServerRef) -> None:
            assert hub is not None
            server_lists[key] = await hub.server_kernels(server)

        async def gateway_listing(name: str) -> None:
            assert pool is not None
            try:
                got = await asyncio.wait_for(pool.listing(name), self.call_timeout)
                gateway_lists[name] = (got.kernels, got.error)
            except Exception as exc:
                gateway_lists[name] = (None, f"listing failed: {type(exc).__name__}")

        await asyncio.gather(
            *(server_listing(k, v) for k, v in servers.items()), *(gateway_listing(g) for g in sorted(gateways))
        )
        return True

    async def _notebook_ref(self, namespace: str, name: str) -> NotebookRef:
        assert self.adapters.notebooks is not None
        try:
            return await asyncio.wait_for(self.adapters.notebooks.kernels(namespace, name), self.call_timeout)
        except Exception as exc:  # unknown, never idle
            return NotebookRef(namespace, name, None, f"notebook server: {type(exc).__name__}", self.clock())

    async def _notebooks(self, joined: join_mod.JoinResult) -> join_mod.JoinResult:
        """Kubeflow notebook pods: each notebook server's kernels (stop-notebook's whole target), asked at the URL
        built from ``kubeflow.notebook_url``; a kernel no configured gateway knows is observed there."""
        notebooks = self.adapters.notebooks
        if notebooks is None:
            return joined
        wanted = {
            (c.pod.namespace, nb)
            for c in joined.candidates
            if c.pod is not None and (nb := actionkinds.kubeflow_notebook(c.pod)) is not None
        }
        await notebooks.prune(wanted)
        if not wanted:
            return joined
        refs = dict(zip(wanted, await asyncio.gather(*(self._notebook_ref(ns, nb) for ns, nb in wanted)), strict=True))
        out = []
        for c in joined.candidates:
            nb = actionkinds.kubeflow_notebook(c.pod) if c.pod is not None else None
            if nb is None:
                out.append(c)
                continue
            assert c.pod is not None
            ref = refs[(c.pod.namespace, nb)]
            c = replace(c, notebook=ref)
            if c.kernel_id is not None and not claimed_by_a_gateway(c.activity):
                seen = next((k for k in ref.kernels or () if k.kernel_id == c.kernel_id), None)
                if seen is not None:
                    c = replace(c, activity=seen, gateway=seen.gateway if seen.error is None else None)
            out.append(c)
        return replace(joined, candidates=tuple(out))

    # ------------------------------------------------------------------ 6. re-check right before acting

    async def recheck(self, d: Decision) -> Decision:
        """Right before acting: fresh gateway view and the newest samples must still say reclaim. For a pod-bound
        candidate the pod itself is read again (a GET, not the cached list: an exemption added after the warning
        wins); for stop-server / evict-pod the server is asked of the hub again and every kernel of the target is
        listed again."""
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
            got = await self.observe({c.kernel_id}, confirm=True)
            fresh = got.get(c.kernel_id)
            if (fresh is None or fresh.error) and c.server is not None and self.adapters.hub is not None:
                listed = await asyncio.wait_for(self.adapters.hub.server_kernels(c.server), self.call_timeout)
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
            if hub is None or self.hub is None:
                return c, "no hub to ask for the server again"
            try:
                servers = await asyncio.wait_for(hub.user_servers(c.server.user), self.call_timeout)
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
            kernels = await self.hub.server_kernels(server)
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
        gateways = self.adapters.gateways
        if c.target_source.startswith(join_mod.GATEWAY_TARGET) and gateways is not None:
            name = c.target_source.removeprefix(join_mod.GATEWAY_TARGET)
            try:
                got = await asyncio.wait_for(gateways.listing(name), self.call_timeout)
                kernels, error = got.kernels, got.error
            except Exception as exc:
                kernels, error = None, f"listing failed: {type(exc).__name__}"
            return replace(c, target_kernels=tuple(kernels) if kernels is not None else None, target_error=error), None
        return c, None

    # ------------------------------------------------------------------ after acting

    def _with_holds(self, decisions: Sequence[Decision], now: float) -> list[Decision]:
        """A reclaim the executor is backing off from says so in its reason (the report and the logs show it)."""
        out = []
        for d in decisions:
            held = self.executor.hold(d.candidate.key, now) if d.verdict is Verdict.RECLAIM else None
            out.append(replace(d, reason=f"{d.reason}; {held}") if held else d)
        return out

    def remember(self, results: Sequence[ActionResult], now: float) -> None:
        """Start the cooldown of every target acted on; forget cooldowns that ended long ago."""
        acted = {r.decision.candidate.key for r in results if r.result in (SUCCESS, ALREADY_GONE, BLOCKED)}
        last = dict(self.state.last_action_at)
        last.update(dict.fromkeys(acted, now))
        # Forget cooldowns that ended long ago: bounded by the actions of the last two cooldowns, not by history.
        horizon = now - 2 * self.settings.limits.cooldown
        if acted or any(v < horizon for v in last.values()):
            self.state = replace(self.state, last_action_at={k: v for k, v in last.items() if v >= horizon})
