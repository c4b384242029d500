"""A trace replayed in simulated time under one deployment shape, with the books every strategy is judged by.

Shapes:

- ``kernel-in-pod`` (KubeSpawner, Kubeflow notebooks): each user server is one pod holding the profile's GPUs;
  every kernel of the server runs inside it. Shutting a kernel down frees its GPU memory, not the allocation:
  only stopping the server (deleting the pod) gives the GPU back to the scheduler. Its Jupyter Server is 2.x,
  where kernel_info/status replies no longer count as kernel activity (``untracked_message_types``, the fix of
  jupyter-server/jupyter_server#1360), so a tab's websocket reconnect does not refresh ``last_activity``.
- ``kernel-pod`` (Enterprise Gateway, elastic-jupyter-operator): the notebook server holds no GPU; each kernel is
  its own pod, and a ``gpu`` kernel's pod holds the GPUs. Shutting the kernel down deletes its pod: memory and
  allocation both come back. Enterprise Gateway 3.x runs on jupyter_server 1.x, where every IOPub message --
  including the status replies to the kernel_info nudge sent on each websocket (re)connect -- updates
  ``last_activity`` (``MappingKernelManager.start_watching_activity``/``record_activity``).

The world keeps two views: what the trace *meant* (intent: every server and kernel the user started and did not
stop) and what actually runs (intent minus what a strategy shut down and the user has not restarted yet). A
killed kernel restarts when its user next runs a cell in it; a stopped server when its user next touches it. On
restart the kernel's GPU processes are as the trace says (the user re-runs the setup cells at once).

Books, integrated over each step (state at the step's start, after the strategy acted):

- reclaimable: GPU allocation-seconds (and GPU memory byte-seconds) where intent holds it while *idle*: the GPU
  under ``ACTIVE`` utilisation and no cell of the holder executing;
- given back: the same, while intent holds it idle but a strategy's action has released it;
- cut: intent holds it *busy* but an action released it (work destroyed);
- held idle: actually held while idle.

Each action is judged when taken: false when any cell in its target was executing, or when the target's GPU was
at or above ``ACTIVE`` within the strategy's own idle window; an interruption when the user touches what it ended
within ``COMEBACK`` seconds.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from bench.replay.trace import (
    Cell,
    Gpu,
    KernelStart,
    KernelStop,
    Reconnect,
    Record,
    ServerStart,
    ServerStop,
    Tab,
    Trace,
    TraceError,
)

SHAPES = ("kernel-in-pod", "kernel-pod")
ACTIVE = 0.05  # utilisation counted as "in use" by the books (the default policy's gpu_idle_below)
COMEBACK = 3600.0  # an action is an interruption when its user comes back within this many seconds
HUB_POLL = 300.0  # JupyterHub.last_activity_interval and the single-user server's activity report interval
GPU_MODEL = "NVIDIA A100-SXM4-80GB"
_NS = uuidlib.UUID("6b1d2a0e-5f3c-4b7a-9d8e-2c4f6a8b0d1e")


@dataclass
class Proc:
    util: float
    mem: int


@dataclass
class Pod:
    """A pod that holds GPUs (or, for CPU kernels in the kernel-pod shape, none)."""

    uid: str
    namespace: str
    name: str
    node: str
    gpu_uuids: tuple[str, ...]
    created_at: float
    last_active: float = -math.inf  # last step with any held GPU at >= ACTIVE
    last_nonzero: float = -math.inf  # last step with any held GPU at >= 0.01 (gpu-pruner's noise floor)


@dataclass
class Kernel:
    id: str
    server: Server
    name: str
    gpu: bool
    started_at: float
    intended: bool = True
    down_at: float | None = None  # shut down by a strategy, not restarted yet
    incarnation: int = 0
    cell_start: float = -math.inf
    cell_end: float = -math.inf
    output_every: float | None = None
    base_activity: float = 0.0  # explicit activity events (start, reconnect nudge, restart)
    procs: dict[str, Proc] = field(default_factory=dict)  # intent
    pod: Pod | None = None  # kernel-pod shape
    idle_since: float = 0.0  # intent: start of the current idle stretch
    pids: dict[str, int] = field(default_factory=dict)
    proc_started: float = 0.0
    last_active: float = -math.inf  # last step its own processes (children included) were at >= ACTIVE

    @property
    def actual_id(self) -> str:
        """The id the gateway knows now: a restarted kernel is a new kernel."""
        return self.id if self.incarnation == 0 else str(uuidlib.uuid5(_NS, f"{self.id}/{self.incarnation}"))

    def alive(self) -> bool:
        return self.intended and self.down_at is None and self.server.alive()

    def busy(self, now: float) -> bool:
        """A cell is executing (intent)."""
        return self.intended and self.cell_start <= now < self.cell_end

    def last_activity(self, now: float) -> float:
        """Jupyter Server's kernel ``last_activity``: explicit events, cell start/end, outputs while running."""
        if self.cell_start > now:
            return self.base_activity
        if now >= self.cell_end:
            return max(self.base_activity, self.cell_end)
        if self.output_every:
            outputs = math.floor((now - self.cell_start) / self.output_every)
            return max(self.base_activity, self.cell_start + outputs * self.output_every)
        return max(self.base_activity, self.cell_start)

    def util(self) -> float:
        return min(1.0, sum(p.util for p in self.procs.values()))

    def mem(self) -> int:
        return sum(p.mem for p in self.procs.values())


@dataclass
class Server:
    id: str
    user: str
    gpus: int
    gpu_memory: int
    node: str
    started_at: float
    intended: bool = True
    down_at: float | None = None
    incarnation: int = 0
    tab_open: bool = False
    kernels: list[Kernel] = field(default_factory=list)
    pod: Pod | None = None  # kernel-in-pod shape
    last_user_action: float = 0.0
    hub_last_activity: float = 0.0
    idle_since: float = 0.0

    def alive(self) -> bool:
        return self.intended and self.down_at is None

    def live_kernels(self) -> list[Kernel]:
        return [k for k in self.kernels if k.alive()]


@dataclass(frozen=True)
class ActionRecord:
    """One action a strategy took, judged on the spot."""

    t: float
    strategy: str
    action: str  # what it did, in the strategy's words
    target: str
    user: str
    releases: str  # allocation | memory | none
    false_reason: str  # "" when the action was sound
    idle_for: float | None  # seconds the target had been idle (intent) when released; None for a false one
    gpus: int
    memory: int


@dataclass
class Books:
    step_seconds: float = 0.0
    reclaimable_alloc: float = 0.0  # GPU-seconds
    given_back_alloc: float = 0.0
    cut_alloc: float = 0.0
    held_idle_alloc: float = 0.0
    held_alloc: float = 0.0
    reclaimable_mem: float = 0.0  # byte-seconds
    given_back_mem: float = 0.0
    interruptions: int = 0
    actions: list[ActionRecord] = field(default_factory=list)


@dataclass
class Node:
    name: str
    gpu_uuids: tuple[str, ...]
    free: list[str]
    memory_total: int


class World:
    """Replays ``trace`` under ``shape``; strategies read it and call ``shutdown_kernel`` / ``stop_server`` /
    ``delete_pod``."""

    def __init__(self, trace: Trace, shape: str, *, users_per_node: int = 4, step: float = 30.0) -> None:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
        self.trace = trace
        self.shape = shape
        self.step = step
        self.start = trace.header.start
        self.end = trace.header.start + trace.header.duration
        self.nudge_is_activity = shape == "kernel-pod"
        self.servers: dict[str, Server] = {}
        self.kernels: dict[str, Kernel] = {}
        self.books = Books()
        self._records = trace.records
        self._next = 0
        self._pid = 1000
        self._pending: dict[int, tuple[float, list[object]]] = {}  # action index -> (t, entities it ended)
        self.nodes: dict[str, Node] = {}
        self._node_of_user = self._place(trace, users_per_node)
        self.now = self.start
        self._by_gpu: dict[str, list[tuple[Kernel, str, float, int]]] | None = None

    # ------------------------------------------------------------------ placement

    def _place(self, trace: Trace, users_per_node: int) -> dict[str, str]:
        """Users to nodes (in order of first appearance); each node gets as many GPUs as its users ever hold at
        once in the trace's intent (what actually runs is never more)."""
        users: list[str] = []
        profile: dict[str, tuple[str, int, int]] = {}  # server -> (user, gpus, memory)
        for r in trace.records:
            if isinstance(r, ServerStart):
                profile[r.server] = (r.user, r.gpus, r.gpu_memory)
                if r.user not in users:
                    users.append(r.user)
        peak = _peak_gpus(trace, self.shape, profile)
        node_of: dict[str, str] = {}
        for i in range(0, len(users), users_per_node):
            name = f"gpu-node-{i // users_per_node + 1:03d}"
            members = users[i:i + users_per_node]
            count = max(1, sum(peak.get(u, 0) for u in members))
            memory = max((m for (u, _, m) in profile.values() if u in members), default=80 << 30)
            uuids = tuple(f"GPU-{uuidlib.uuid5(_NS, f'{name}/{g}')}" for g in range(count))
            self.nodes[name] = Node(name, uuids, list(uuids), memory)
            for u in members:
                node_of[u] = name
        return node_of

    # ------------------------------------------------------------------ time

    def steps(self) -> Iterator[float]:
        n = int(math.ceil(self.trace.header.duration / self.step))
        for i in range(n):
            yield self.start + i * self.step

    def advance(self, now: float) -> None:
        """Apply every record up to ``now`` and update the per-step GPU history."""
        self.now = now
        self._by_gpu = None
        while self._next < len(self._records) and self.start + self._records[self._next].t <= now:
            r = self._records[self._next]
            self._next += 1
            self._apply(r, self.start + r.t)
        for s in self.servers.values():
            if self.shape == "kernel-in-pod" and s.pod is not None:
                self._track(s.pod, self._device_util(s.pod), now)
            for k in s.kernels:
                if k.pod is not None:
                    self._track(k.pod, self._device_util(k.pod), now)
                if k.procs and k.alive() and k.util() >= ACTIVE:
                    k.last_active = now
        if now >= self.start:
            self._hub_poll(now)

    @staticmethod
    def _track(pod: Pod, util: float, now: float) -> None:
        if util >= ACTIVE:
            pod.last_active = now
        if util >= 0.01:
            pod.last_nonzero = now

    # ------------------------------------------------------------------ records

    def _apply(self, r: Record, t: float) -> None:
        self._by_gpu = None
        if isinstance(r, ServerStart):
            s = self.servers.get(r.server)
            if s is None:
                s = self.servers[r.server] = Server(r.server, r.user, r.gpus, r.gpu_memory, self._node_of_user[r.user], t)
            if not s.intended or s.down_at is not None:
                self._comeback(s, t)
                s.intended, s.down_at, s.started_at = True, None, t
                s.incarnation += 1
            s.gpus, s.gpu_memory = r.gpus, r.gpu_memory
            s.last_user_action = s.hub_last_activity = max(s.hub_last_activity, t)
            self._ensure_server_pod(s, t)
        elif isinstance(r, ServerStop):
            s = self.servers[r.server]
            s.intended = False
            for k in s.kernels:
                k.intended = False
                self._release_kernel(k)
            self._release_server(s)
        elif isinstance(r, Tab):
            s = self.servers[r.server]
            if r.open:
                self._touch_server(s, t)
            s.tab_open = r.open
        elif isinstance(r, Reconnect):
            s = self.servers[r.server]
            if s.tab_open and self.nudge_is_activity:
                for k in s.live_kernels():
                    k.base_activity = max(k.base_activity, t)
        elif isinstance(r, KernelStart):
            s = self.servers[r.server]
            if not s.intended:
                raise TraceError(f"t={r.t}: kernel {r.kernel} starts in server {s.id}, which its user stopped")
            self._touch_server(s, t)
            k = Kernel(r.kernel, s, r.name, r.gpu, t, base_activity=t, idle_since=t, proc_started=t)
            s.kernels.append(k)
            self.kernels[k.id] = k
            self._ensure_kernel_pod(k, t)
        elif isinstance(r, KernelStop):
            k = self.kernels[r.kernel]
            k.intended = False
            k.down_at = None
            self._release_kernel(k)
        elif isinstance(r, Cell):
            k = self._kernel_for(r)
            self._touch_kernel(k, t)
            if k.busy(t):
                k.cell_end += r.duration
            else:
                k.cell_start, k.cell_end = t, t + r.duration
            if r.output_every is not None:
                k.output_every = r.output_every
            elif not k.busy(t) or k.cell_start == t:
                k.output_every = None
            k.base_activity = max(k.base_activity, t)
        elif isinstance(r, Gpu):
            k = self._kernel_for(r)
            if r.mem <= 0:
                k.procs.pop(r.proc, None)
                k.pids.pop(r.proc, None)
            else:
                k.procs[r.proc] = Proc(r.util, r.mem)
                if r.proc not in k.pids:
                    self._pid += 1
                    k.pids[r.proc] = self._pid

    def _kernel_for(self, r: Cell | Gpu) -> Kernel:
        k = self.kernels[r.kernel]
        if not k.intended:
            raise TraceError(f"t={r.t}: {r.ev} for kernel {r.kernel}, which its user shut down")
        return k

    def _touch_server(self, s: Server, t: float) -> None:
        """The user did something in this server: a stopped server comes back (new pod)."""
        s.last_user_action = max(s.last_user_action, t)
        s.hub_last_activity = max(s.hub_last_activity, t)
        self._comeback(s, t)
        for k in s.kernels:
            if k.intended and k.down_at is not None:
                self._comeback(k, t)
        if s.intended and s.down_at is not None:
            s.down_at = None
            s.incarnation += 1
            s.started_at = t
            self._ensure_server_pod(s, t)
            for k in s.kernels:
                if k.intended and k.down_at is None:
                    k.down_at = t  # the server's end took every kernel with it; each restarts when used
                    self._release_kernel(k)

    def _touch_kernel(self, k: Kernel, t: float) -> None:
        self._touch_server(k.server, t)
        self._comeback(k, t)
        if k.down_at is not None:
            k.down_at = None
            k.incarnation += 1
            k.base_activity = t
            k.proc_started = t
            self._pid += len(k.pids) + 1
            k.pids = {name: self._pid + i for i, name in enumerate(k.pids)}
            self._ensure_kernel_pod(k, t)

    def _comeback(self, entity: object, t: float) -> None:
        for index, (at, ended) in list(self._pending.items()):
            if t - at > COMEBACK:
                del self._pending[index]
            elif entity in ended:
                del self._pending[index]
                self.books.interruptions += 1

    # ------------------------------------------------------------------ pods and GPUs

    def _ensure_server_pod(self, s: Server, t: float) -> None:
        if self.shape != "kernel-in-pod" or s.pod is not None or not s.alive():
            return
        name = f"jupyter-{s.id}"
        uid = str(uuidlib.uuid5(_NS, f"pod/{name}/{s.incarnation}"))
        s.pod = Pod(uid, "jhub", name, s.node, self._take(s.node, s.gpus), t)

    def _ensure_kernel_pod(self, k: Kernel, t: float) -> None:
        if self.shape != "kernel-pod" or k.pod is not None or not k.alive():
            return
        name = f"{k.server.user}-{k.actual_id}"
        uid = str(uuidlib.uuid5(_NS, f"pod/{name}"))
        gpus = self._take(k.server.node, k.server.gpus) if k.gpu else ()
        k.pod = Pod(uid, "kernels", name, k.server.node, gpus, t)

    def _take(self, node: str, count: int) -> tuple[str, ...]:
        free = self.nodes[node].free
        if len(free) < count:
            raise RuntimeError(f"{node} has no free GPU (placement bug: peak demand was computed from the trace)")
        taken, self.nodes[node].free[:] = free[:count], free[count:]
        return tuple(taken)

    def _give(self, pod: Pod | None) -> None:
        if pod is not None:
            self.nodes[pod.node].free.extend(pod.gpu_uuids)

    def _release_kernel(self, k: Kernel) -> None:
        if k.pod is not None:
            self._give(k.pod)
            k.pod = None

    def _release_server(self, s: Server) -> None:
        if s.pod is not None:
            self._give(s.pod)
            s.pod = None
        for k in s.kernels:
            self._release_kernel(k)

    def _device_util(self, pod: Pod) -> float:
        return sum(u for (_, _, u, _) in self.gpu_processes(pod.gpu_uuids[0])) if pod.gpu_uuids else 0.0

    def holders(self) -> Iterator[Pod]:
        """Every running pod that holds GPUs."""
        for s in self.servers.values():
            if s.pod is not None and s.pod.gpu_uuids:
                yield s.pod
            for k in s.kernels:
                if k.pod is not None and k.pod.gpu_uuids:
                    yield k.pod

    def pods_on(self, node: str) -> list[Pod]:
        out: list[Pod] = []
        for s in self.servers.values():
            if s.node != node:
                continue
            if s.pod is not None:
                out.append(s.pod)
            out.extend(k.pod for k in s.kernels if k.pod is not None)
        return out

    def gpu_of(self, k: Kernel) -> str | None:
        """The GPU a running kernel's processes use (its pod's first GPU), or None."""
        if not k.alive():
            return None
        pod = k.pod if self.shape == "kernel-pod" else k.server.pod
        return pod.gpu_uuids[0] if pod is not None and pod.gpu_uuids else None

    def gpu_processes(self, uuid: str) -> list[tuple[Kernel, str, float, int]]:
        """(kernel, proc name, util, mem) of every running process on one GPU."""
        if self._by_gpu is None:
            by_gpu: dict[str, list[tuple[Kernel, str, float, int]]] = {}
            for k in self.kernels.values():
                if k.procs:
                    gpu = self.gpu_of(k)
                    if gpu is not None:
                        by_gpu.setdefault(gpu, []).extend((k, name, p.util, p.mem) for name, p in k.procs.items())
            self._by_gpu = by_gpu
        return self._by_gpu.get(uuid, [])

    def owner(self, pod_uid: str) -> Server | Kernel | None:
        for s in self.servers.values():
            if s.pod is not None and s.pod.uid == pod_uid:
                return s
            for k in s.kernels:
                if k.pod is not None and k.pod.uid == pod_uid:
                    return k
        return None

    def kernel_by_actual_id(self, kernel_id: str) -> Kernel | None:
        k = self.kernels.get(kernel_id)
        if k is not None and k.actual_id == kernel_id:
            return k
        for k in self.kernels.values():
            if k.actual_id == kernel_id:
                return k
        return None

    # ------------------------------------------------------------------ JupyterHub's view

    def _hub_poll(self, now: float) -> None:
        """Every HUB_POLL: the hub reads the proxy's route activity (configurable-http-proxy updates it on every
        proxied request and on websocket data, incl. pings: lib/configproxy.js handleProxy) and the single-user
        server posts its own ``last_activity()`` (max of kernel activity and API requests: jupyter_server
        ServerWebApplication.last_activity)."""
        if (now - self.start) % HUB_POLL >= self.step:
            return
        for s in self.servers.values():
            if not s.alive():
                continue
            kernels = s.live_kernels()
            seen = [s.last_user_action] + [k.last_activity(now) for k in kernels]
            if s.tab_open:
                seen.append(now)  # the open tab's traffic through the proxy
            s.hub_last_activity = max(s.hub_last_activity, min(now, max(seen)))

    # ------------------------------------------------------------------ actions (called by strategies)

    def shutdown_kernel(self, k: Kernel, strategy: str, action: str, window: float) -> ActionRecord | None:
        if not k.alive():
            return None
        pod = k.pod if self.shape == "kernel-pod" else k.server.pod
        releases = "allocation" if self.shape == "kernel-pod" and pod is not None and pod.gpu_uuids else (
            "memory" if k.mem() else "none")
        # A kernel's GPU work is its own processes' (children included), not its neighbours' on a shared GPU.
        rec = self._judge(strategy, action, f"kernel {k.actual_id}", k.server.user, [k], [k.last_active],
                          releases, k.idle_since, window,
                          gpus=len(k.pod.gpu_uuids) if releases == "allocation" and k.pod else 0, memory=k.mem())
        k.down_at = self.now
        self._release_kernel(k)
        self._by_gpu = None
        self._pending[len(self.books.actions) - 1] = (self.now, [k])
        return rec

    def stop_server(self, s: Server, strategy: str, action: str, window: float) -> ActionRecord | None:
        if not s.alive():
            return None
        kernels = s.live_kernels()
        pods = [s.pod] if s.pod is not None else [k.pod for k in kernels if k.pod is not None]
        gpus = sum(len(p.gpu_uuids) for p in pods)
        memory = sum(k.mem() for k in kernels)
        releases = "allocation" if gpus else ("memory" if memory else "none")
        idle_since = max([s.idle_since] if self.shape == "kernel-in-pod" else
                         [k.idle_since for k in kernels if k.gpu] or [s.started_at])
        rec = self._judge(strategy, action, f"server {s.id}", s.user, kernels, [p.last_active for p in pods],
                          releases, idle_since, window, gpus=gpus, memory=memory)
        s.down_at = self.now
        for k in kernels:
            k.down_at = self.now
        self._release_server(s)
        self._by_gpu = None
        self._pending[len(self.books.actions) - 1] = (self.now, [s, *kernels])
        return rec

    def delete_pod(self, pod_uid: str, strategy: str, action: str, window: float) -> ActionRecord | None:
        owner = self.owner(pod_uid)
        if isinstance(owner, Server):
            return self.stop_server(owner, strategy, action, window)
        if isinstance(owner, Kernel):
            return self.shutdown_kernel(owner, strategy, action, window)
        return None

    def _judge(self, strategy: str, action: str, target: str, user: str, kernels: Sequence[Kernel],
               gpu_active: Sequence[float], releases: str, idle_since: float, window: float, *, gpus: int,
               memory: int) -> ActionRecord:
        now = self.now
        reason = ""
        busy = [k for k in kernels if k.busy(now)]
        if busy:
            reason = f"cell executing in kernel {busy[0].actual_id}" + (" (CPU only)" if not busy[0].procs else "")
        else:
            last = max(gpu_active, default=-math.inf)
            if last >= now - window:
                reason = f"GPU active {round((now - last) / 60)} min before (window {round(window / 60)} min)"
        idle_for = None if reason else max(0.0, now - idle_since)
        rec = ActionRecord(now, strategy, action, target, user, releases, reason, idle_for, gpus, memory)
        self.books.actions.append(rec)
        return rec

    # ------------------------------------------------------------------ books

    def account(self, now: float, dt: float) -> None:
        """Integrate the books over [now, now + dt) from the state at ``now`` (after any action)."""
        b = self.books
        b.step_seconds += dt
        for s in self.servers.values():
            if not s.intended:
                continue
            kernels = [k for k in s.kernels if k.intended]
            if self.shape == "kernel-in-pod":
                util = min(1.0, sum(k.util() for k in kernels))
                idle = util < ACTIVE and not any(k.busy(now) for k in kernels)
                if not idle:
                    s.idle_since = now + dt
                if s.gpus:
                    self._book_alloc(s.gpus, idle, s.down_at is None, dt)
            for k in kernels:
                k_idle = k.util() < ACTIVE and not k.busy(now)
                if not k_idle:
                    k.idle_since = now + dt
                if self.shape == "kernel-pod" and k.gpu and s.gpus:
                    self._book_alloc(s.gpus, k_idle, k.alive(), dt)
                mem = k.mem()
                if mem and (s.gpus or self.shape == "kernel-pod" and k.gpu) and k_idle:
                    b.reclaimable_mem += mem * dt
                    if not k.alive():
                        b.given_back_mem += mem * dt

    def _book_alloc(self, gpus: int, idle: bool, running: bool, dt: float) -> None:
        b = self.books
        if idle:
            b.reclaimable_alloc += gpus * dt
        if running:
            b.held_alloc += gpus * dt
            if idle:
                b.held_idle_alloc += gpus * dt
        elif idle:
            b.given_back_alloc += gpus * dt
        else:
            b.cut_alloc += gpus * dt


def _peak_gpus(trace: Trace, shape: str, profile: dict[str, tuple[str, int, int]]) -> dict[str, int]:
    """Per user, the most GPUs their running servers/kernels hold at once in the trace's intent."""
    live_servers: set[str] = set()
    live_kernels: dict[str, str] = {}  # running kernel -> server
    server_of: dict[str, str] = {}  # every kernel -> server
    gpu_kernel: dict[str, bool] = {}
    peak: dict[str, int] = {}

    def held(user: str) -> int:
        if shape == "kernel-in-pod":
            return sum(profile[s][1] for s in live_servers if profile[s][0] == user)
        return sum(profile[sv][1] for k, sv in live_kernels.items() if gpu_kernel[k] and profile[sv][0] == user)

    for r in trace.records:
        if isinstance(r, ServerStart):
            live_servers.add(r.server)
            server = r.server
        elif isinstance(r, ServerStop):
            live_servers.discard(r.server)
            for k in [k for k, sv in live_kernels.items() if sv == r.server]:
                del live_kernels[k]
            server = r.server
        elif isinstance(r, KernelStart):
            live_kernels[r.kernel] = server_of[r.kernel] = r.server
            gpu_kernel[r.kernel] = r.gpu
            server = r.server
        elif isinstance(r, KernelStop):
            live_kernels.pop(r.kernel, None)
            server = server_of[r.kernel]
        else:
            continue
        user = profile[server][0]
        peak[user] = max(peak.get(user, 0), held(user))
    return peak
