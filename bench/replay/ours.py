"""Ours: the real decision code driven over the simulated world. This module is the ONE adapter between the world
and gpu-reclaimer; when the policy's inputs change, this is the file to change.

What is real: ``reclaimer.core.config.parse_settings`` (the policy as YAML, validated like the daemon's),
``reclaimer.observe.sampler.Sampler`` (its ring and window, ticked on the simulated clock through a ``GpuBackend``),
``reclaimer.core.candidates.join`` (processes + pods + allocations + gateway views -> candidates),
``reclaimer.core.policy.decide`` and ``reclaimer.core.policy.recheck``. What stands in for the edges: NVML (``SimBackend``
reads the world's GPU processes), attribution (the world knows which kernel and pod each process belongs to; the
daemon finds it through /proc), the gateway and hub (views built from the world at the same instant), and the
executor (``_execute`` changes the world as the live executor's adapters would). The policy state is carried
from cycle to cycle as the daemon carries it (``policy.plan``'s next state, then ``Daemon._remember``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import yaml

from bench.replay.world import GPU_MODEL, Kernel, Pod, Server, World
from reclaimer.core import candidates as join_mod
from reclaimer.core import policy
from reclaimer.core.config import Settings, parse_settings
from reclaimer.core.sources import HUB_GATEWAY
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import AttributedProcess, Decision, GpuDevice, GpuSample, KernelActivity, PodGpuAllocation, PodInfo, PolicyState, ProcessSample, ServerRef
from reclaimer.observe.sampler import Sampler

USER_LABEL = "hub.jupyter.org/username"
# Inputs the join accepts (main grows them issue by issue): what is not accepted yet is not passed.
_JOIN_ACCEPTS = frozenset(inspect.signature(join_mod.join).parameters)
_SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerRef))
_POD_FIELDS = frozenset(f.name for f in dataclasses.fields(PodInfo))
_PROCESS_FIELDS = frozenset(f.name for f in dataclasses.fields(AttributedProcess))
EG_GATEWAY = "eg"
RELEASING_ACTION = {"kernel-in-pod": "stop-server", "kernel-pod": "shutdown-kernel"}  # frees the allocation


def settings_for(policies: Sequence[Mapping[str, Any]], *, sample_interval: float, decide_interval: float,
                 limits: Mapping[str, Any] | None = None) -> Settings:
    """The daemon's Settings, parsed from YAML exactly as ``reclaimer run --config`` would."""
    data: dict[str, Any] = {"node_name": "replay", "mode": "enforce", "sample_interval": sample_interval,
                            "decide_interval": decide_interval, "policies": [dict(p) for p in policies]}
    if limits:
        data["limits"] = dict(limits)
    return parse_settings(yaml.safe_dump(data, sort_keys=False), "<replay policy>")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class SimBackend:
    """``sampler.GpuBackend`` over one simulated node: device utilisation is the sum of its processes'."""

    def __init__(self, world: World, node: str) -> None:
        self.world = world
        self.node = world.nodes[node]
        self._devices = tuple(GpuDevice(i, u, GPU_MODEL, False, self.node.memory_total)
                              for i, u in enumerate(self.node.gpu_uuids))

    def devices(self) -> tuple[GpuDevice, ...]:
        return self._devices

    def sample(self, now: float) -> list[GpuSample]:
        out = []
        for d in self._devices:
            procs = self.world.gpu_processes(d.uuid)
            out.append(GpuSample(
                timestamp=now, index=d.index, uuid=d.uuid, up=True,
                utilization=min(1.0, sum(u for _, _, u, _ in procs)),
                memory_used_bytes=sum(m for _, _, _, m in procs), memory_total_bytes=self.node.memory_total,
                processes=tuple(ProcessSample(k.pids[name], m, u) for k, name, u, m in procs),
            ))
        return out

    def mig_parents(self) -> dict[str, str]:
        return {}

    def error_counts(self) -> dict[tuple[str, str], int]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class NodeDaemon:
    """What one node's daemon holds between cycles: its sampler and its policy state."""

    name: str
    settings: Settings
    sampler: Sampler
    state: PolicyState = field(default_factory=PolicyState)
    allocation_seen: dict[str, float] = field(default_factory=dict)  # pod uid -> first cycle that saw its allocation


class Ours:
    """gpu-reclaimer with ``policies`` (dicts as in the config file), in enforce mode, one daemon per node."""

    def __init__(self, name: str, policies: Sequence[Mapping[str, Any]], *, sample_interval: float = 30.0,
                 decide_interval: float = 60.0, limits: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.policies = [dict(p) for p in policies]
        self.sample_interval = sample_interval
        self.decide_interval = decide_interval
        self.limits = limits
        self.settings = settings_for(self.policies, sample_interval=sample_interval, decide_interval=decide_interval,
                                     limits=limits)
        self.windows = {p.name: p.idle_after for p in self.settings.policies}
        self.period = decide_interval
        self.daemons: dict[str, NodeDaemon] = {}
        self.verdicts: Counter[str] = Counter()
        self.demotions: Counter[str] = Counter()  # breaker / rate limit / cooldown / shared target, by cycle
        self.world: World | None = None

    def describe(self) -> str:
        p = self.settings.policies[0]
        return (f"{p.action}, idle_after {p.idle_after / 60:g} min, warn_before {p.warn_before / 60:g} min, "
                f"gpu_idle_below {p.gpu_idle_below:g}")

    # ------------------------------------------------------------------ lifecycle

    def attach(self, world: World) -> None:
        self.world = world
        for node in world.nodes:
            settings = self.settings.model_copy(update={"node_name": node})
            sampler = Sampler(SimBackend(world, node), interval=settings.sample_interval,
                              window_seconds=settings.longest_window, clock=lambda: world.now,
                              wait=lambda _timeout: True)
            sampler.start()  # records started_at; the thread takes at most one tick and ends (wait says stop)
            sampler.stop()
            if sampler.ticks == 0:
                sampler.tick()
            self.daemons[node] = NodeDaemon(node, settings, sampler)

    def sample(self, now: float) -> None:
        """One sampling tick on every node (the world steps at the sample interval)."""
        for d in self.daemons.values():
            if now > (d.sampler.snapshot().last_sample_at or -1):
                d.sampler.tick()

    def act(self, now: float) -> None:
        assert self.world is not None
        for d in self.daemons.values():
            self._cycle(d, now)

    # ------------------------------------------------------------------ one decide cycle on one node

    def _cycle(self, d: NodeDaemon, now: float) -> None:
        world = self.world
        assert world is not None
        pods = world.pods_on(d.name)
        if not any(p.gpu_uuids for p in pods):
            return  # nothing holds a GPU here: the daemon would find no candidate
        view = self._view(world, d.name, pods, now)
        snapshot = d.sampler.snapshot()
        # As the daemon: a pod holds its allocation from the first cycle that saw it (invariant 10).
        d.allocation_seen = {a_uid: d.allocation_seen.get(a_uid, now) for a_uid in view.allocated_pods}
        optional = {"kernel_pods": view.kernel_pods, "server_kernels": view.server_kernels,
                    "first_seen": getattr(snapshot, "first_seen", None), "allocation_seen": d.allocation_seen,
                    "pods_listed_at": now}  # the replay's pod list never fails (invariant 16)
        joined = join_mod.join(node=d.name, processes=view.processes, pods_by_uid=view.pods,
                               allocations=view.allocations, activities=view.activities, servers=view.servers,
                               server_name_annotation=self.settings.kubernetes.server_name_annotation,
                               **{k: v for k, v in optional.items() if k in _JOIN_ACCEPTS})
        planned = policy.plan(joined.candidates, snapshot, d.settings, now, d.state)
        decisions, d.state = planned.decisions, planned.state
        if planned.breaker.new_trip:
            self.demotions["breaker trips"] += 1
        for dec in decisions:
            self.verdicts[dec.verdict.value] += 1
        for note in ("circuit breaker", "rate limit", "cooldown", "would also end", "covered by"):
            if any(note in dec.reason for dec in decisions if dec.verdict is not Verdict.RECLAIM):
                self.demotions[note] += 1
        acted = []
        for dec in decisions:
            if dec.verdict is not Verdict.RECLAIM:
                continue
            fresh = view.activities.get(dec.candidate.kernel_id) if dec.candidate.kernel_id else None
            dec = policy.recheck(dec, fresh, d.sampler.snapshot(), d.settings, now)
            if dec.verdict is Verdict.RECLAIM and self._execute(dec, world):
                acted.append(dec.candidate.key)
        if acted:  # as Daemon._remember: cooldowns keyed on the candidate, pruned after 2 x cooldown
            last = dict(d.state.last_action_at)
            last.update({k: now for k in acted})
            horizon = now - 2 * d.settings.limits.cooldown
            d.state = replace(d.state, last_action_at={k: v for k, v in last.items() if v >= horizon})

    def _execute(self, dec: Decision, world: World) -> bool:
        c = dec.candidate
        window = self.windows.get(dec.policy or "", max(self.windows.values()))
        action = dec.action.value
        if dec.action is ActionKind.SHUTDOWN_KERNEL and c.kernel_id is not None:
            k = world.kernel_by_actual_id(c.kernel_id)
            return k is not None and world.shutdown_kernel(k, self.name, action, window) is not None
        if dec.action is ActionKind.EVICT_POD and c.pod is not None:
            return world.delete_pod(c.pod.uid, self.name, action, window) is not None
        if dec.action is not ActionKind.NONE:  # stop-server (and stop-notebook: the whole server stops)
            user = c.server.user if c.server is not None else c.user
            if user is None and c.pod is not None:
                owner = world.owner(c.pod.uid)
                user = owner.user if isinstance(owner, Server) else owner.server.user if owner else None
            server = next((s for s in world.servers.values() if s.user == user and s.alive()), None)
            return server is not None and world.stop_server(server, self.name, action, window) is not None
        return False

    # ------------------------------------------------------------------ what the daemon's edges would report

    @dataclass
    class _View:
        pods: dict[str, PodInfo]
        processes: list[AttributedProcess]
        allocations: list[PodGpuAllocation]
        activities: dict[str, KernelActivity]
        servers: list[ServerRef]
        kernel_pods: dict[str, str]  # pod uid -> kernel id (the kube adapter reads the kernel_id label)
        server_kernels: dict[tuple[str, str], list[KernelActivity]]  # every kernel of each server, as it lists them
        allocated_pods: list[str]  # uids of the pods pod-resources lists with GPUs

    def _view(self, world: World, node: str, pods: Sequence[Pod], now: float) -> Ours._View:
        infos: dict[str, PodInfo] = {}
        processes: list[AttributedProcess] = []
        allocations: list[PodGpuAllocation] = []
        activities: dict[str, KernelActivity] = {}
        kernel_pods: dict[str, str] = {}
        gateway = HUB_GATEWAY if world.shape == "kernel-in-pod" else EG_GATEWAY
        for pod in pods:
            owner = world.owner(pod.uid)
            if owner is None:
                continue
            if isinstance(owner, Kernel):
                # Enterprise Gateway's kernel pods: kernel_id label, KERNEL_USERNAME as kernel_username; no
                # JupyterHub user label (the pod is not the user's server); bare pods, no ownerReferences.
                labels = {"kernel_id": owner.actual_id, "app": "enterprise-gateway", "component": "kernel",
                          "kernel_username": owner.server.user}
                annotations: dict[str, str] = {}
                user = None
                kernel_pods[pod.uid] = owner.actual_id
            else:  # KubeSpawner's user pod: bare (no controller), user in a label and an annotation
                labels = {USER_LABEL: owner.user, "component": "singleuser-server"}
                annotations = {USER_LABEL: owner.user}
                user = owner.user
            status = {"started_at": pod.created_at, "deleting": False, "containers_running": True}
            infos[pod.uid] = PodInfo(uid=pod.uid, namespace=pod.namespace, name=pod.name, node_name=node,
                                     labels=labels, annotations=annotations, user=user, phase="Running",
                                     container_ids=(f"c-{pod.uid}",),
                                     **{k: v for k, v in status.items() if k in _POD_FIELDS})
            if pod.gpu_uuids:
                allocations.append(PodGpuAllocation(pod.namespace, pod.name, "notebook", pod.gpu_uuids))
            for uuid in pod.gpu_uuids:
                for k, proc, util, mem in world.gpu_processes(uuid):
                    started = {"started_at": k.proc_started} if "started_at" in _PROCESS_FIELDS else {}
                    processes.append(AttributedProcess(
                        pid=k.pids[proc], starttime=int(k.proc_started), gpu_uuid=uuid, used_memory_bytes=mem,
                        sm_utilization=util, pod_uid=pod.uid, container_id=f"c-{pod.uid}", kernel_id=k.actual_id,
                        kernel_pid=k.pids.get("main", k.pids[proc]), **started))
                    if k.actual_id not in activities:
                        activities[k.actual_id] = self._activity(k, gateway, now)
        listed = {"listed_at": now} if "listed_at" in _SERVER_FIELDS else {}
        servers = [ServerRef(s.user, "", _utc(s.hub_last_activity), f"/user/{s.user}/", True, **listed)
                   for s in world.servers.values() if s.node == node and s.alive()]
        # What each server's /api/kernels lists (through the hub): every running kernel, GPU or not.
        server_kernels = {(s.user, ""): [self._activity(k, gateway, now) for k in s.live_kernels()]
                          for s in world.servers.values() if s.node == node and s.alive()}
        return Ours._View(infos, processes, allocations, activities, servers, kernel_pods, server_kernels,
                          [p.uid for p in pods if p.gpu_uuids and p.uid in infos])

    @staticmethod
    def _activity(k: Kernel, gateway: str, now: float) -> KernelActivity:
        """The gateway's view of a kernel now: execution_state, last_activity and connections as Jupyter keeps them."""
        return KernelActivity(kernel_id=k.actual_id, gateway=gateway, observed_at=now, kernel_name=k.name,
                              execution_state="busy" if k.busy(now) else "idle",
                              last_activity=_utc(k.last_activity(now)), connections=1 if k.server.tab_open else 0)
