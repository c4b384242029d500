"""Seeded generators of notebook fleets: N users x D days of sessions, written as replay traces.

Each behaviour below is one function with its parameters in ``Behaviour``; ``FleetParams`` holds the fleet's
size and the odds. Same parameters and seed, same trace (``random.Random(seed)``, one child generator per user).

Behaviours (what a strategy must get right):

- ``training_burst``: a cell trains on the GPU (utilisation 0.6-0.95) for 10-90 min, printing progress every
  30-120 s, or silently (``p_silent``: busy, no output).
- ``silent_cpu_cell``: a long cell that computes on the CPU without output while the kernel holds GPU memory.
- ``data_loading``: a training cell whose first 5-40 min are CPU-only (loading, preprocessing) with the VRAM
  already held, then the GPU works.
- ``gpu_child``: a short cell starts a background training process (``subprocess.Popen``); the kernel is idle
  while the child keeps the GPU busy for 1-6 h.
- ``cpu_kernel_busy``: a second, CPU-only kernel in the same server runs a long job (1-4 h) while the GPU kernel
  sits idle (the user waits for it, or goes to lunch).
- ``tab_left_open``: at the end of the day the browser tab stays open (connections > 0), its websockets
  reconnecting now and then (exponential gaps, mean ``reconnect_mean``) until the user is back.
- ``abandoned``: the next morning the user opens a new notebook and leaves yesterday's GPU kernel running.
- ``allocated_no_process``: some users get a GPU profile and only ever run CPU kernels: a pod holding an
  allocated GPU with no process on it.
- ``overnight_training``: a long run started before leaving (2-8 h).
- ``breaks``: lunch (45-90 min) and meetings (30-60 min) with the tab open and the kernel idle, GPU memory held:
  the users come back.
"""

from __future__ import annotations

import json
import random
import uuid as uuidlib
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from bench.replay.trace import (
    Cell,
    Gpu,
    Header,
    KernelStart,
    KernelStop,
    Reconnect,
    Record,
    ServerStart,
    ServerStop,
    Tab,
    Trace,
)

HOUR = 3600.0
MIN = 60.0
GIB = 1 << 30
EPOCH = datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()  # a Monday, 00:00 UTC


@dataclass(frozen=True)
class Behaviour:
    """Odds and sizes of the behaviours (per user-day unless said otherwise)."""

    arrive_mean_h: float = 9.0
    arrive_sd_h: float = 0.75
    leave_mean_h: float = 17.5
    leave_sd_h: float = 1.0
    p_weekend: float = 0.1  # works on a weekend day
    p_lunch: float = 0.9
    lunch_min: tuple[float, float] = (45, 90)
    meetings: tuple[int, int] = (0, 2)
    meeting_min: tuple[float, float] = (30, 60)
    think_min: tuple[float, float] = (1, 12)  # between cells
    p_training: float = 0.12  # per activity
    train_min: tuple[float, float] = (10, 90)
    p_silent: float = 0.25  # a training cell prints nothing
    p_data_loading: float = 0.06
    load_min: tuple[float, float] = (5, 40)
    p_silent_cpu: float = 0.04
    silent_cpu_min: tuple[float, float] = (15, 70)
    p_gpu_child: float = 0.25  # per day
    child_h: tuple[float, float] = (1, 6)
    p_cpu_kernel_busy: float = 0.2  # per day
    cpu_job_h: tuple[float, float] = (1, 4)
    p_overnight_training: float = 0.12
    overnight_h: tuple[float, float] = (2, 8)
    p_close_tab: float = 0.45  # at the end of the day; else the tab stays open
    reconnect_mean_h: float = 2.0
    p_resume: float = 0.55  # next morning: back to yesterday's GPU kernel
    p_abandon: float = 0.5  # else: new kernel, yesterday's left running (else shut down first)
    p_stop_server: float = 0.08  # at the end of the day the user stops the server
    p_cpu_only_user: float = 0.1  # per user: GPU profile, CPU kernels only
    memory_gib: tuple[float, float] = (4, 40)
    gpu_memory_gib: int = 80


@dataclass(frozen=True)
class FleetParams:
    users: int = 24
    days: int = 7
    seed: int = 1
    behaviour: Behaviour = field(default_factory=Behaviour)


def _uuid(rng: random.Random) -> str:
    return str(uuidlib.UUID(int=rng.getrandbits(128), version=4))


class _User:
    """One user's records, built day by day; times are seconds since the trace start."""

    def __init__(self, name: str, rng: random.Random, b: Behaviour) -> None:
        self.name, self.rng, self.b = name, rng, b
        self.records: list[Record] = []
        self.cpu_only = rng.random() < b.p_cpu_only_user
        self.server_up = False
        self.tab_open = False
        self.kernel: str | None = None  # the notebook the user works in
        self.kernel_mem = 0
        self.kernels: list[str] = []  # running kernels (intent)
        self.busy_until: dict[str, float] = {}  # kernel -> end of its last cell
        self.children = 0

    # ------------------------------------------------------------------ primitives

    def emit(self, r: Record) -> None:
        self.records.append(replace(r, t=round(r.t, 3)))  # what the file format keeps

    def u(self, lo_hi: tuple[float, float]) -> float:
        return self.rng.uniform(*lo_hi)

    def start_server(self, t: float) -> None:
        if not self.server_up:
            self.emit(ServerStart(t, self.name, self.name, 1, self.b.gpu_memory_gib * GIB))
            self.server_up = True

    def open_tab(self, t: float) -> None:
        if not self.tab_open:
            self.emit(Tab(t, self.name, True))
            self.tab_open = True

    def close_tab(self, t: float) -> None:
        if self.tab_open:
            self.emit(Tab(t, self.name, False))
            self.tab_open = False

    def new_kernel(self, t: float, gpu: bool) -> str:
        k = _uuid(self.rng)
        self.emit(KernelStart(t, k, self.name, "python3" if gpu else "python3-cpu", gpu))
        self.kernels.append(k)
        self.busy_until[k] = t
        return k

    def stop_kernel(self, t: float, k: str) -> None:
        self.emit(KernelStop(t, k))
        self.kernels.remove(k)

    def cell(self, t: float, k: str, duration: float, output_every: float | None) -> float:
        """Run a cell at ``t`` (or when the kernel is free); returns when it ends."""
        start = max(t, self.busy_until.get(k, t))
        self.emit(Cell(start, k, duration, output_every))
        self.busy_until[k] = start + duration
        return start + duration

    def gpu(self, t: float, k: str, util: float, proc: str = "main", mem: int | None = None) -> None:
        if self.cpu_only or k != self.kernel and proc == "main":
            return
        if mem is None:
            if not self.kernel_mem:
                self.kernel_mem = int(self.u(self.b.memory_gib) * GIB)
            mem = self.kernel_mem
        self.emit(Gpu(t, k, proc, round(util, 3), mem))

    # ------------------------------------------------------------------ behaviours

    def short_cell(self, t: float) -> float:
        k = self.kernel
        assert k is not None
        duration = self.rng.uniform(3, 90)
        end = self.cell(t, k, duration, 5.0 if duration > 20 else None)
        start = end - duration
        if self.rng.random() < 0.6:
            self.gpu(start, k, self.rng.uniform(0.2, 0.7))
            self.gpu(end, k, 0.0)
        return end

    def training_burst(self, t: float) -> float:
        k = self.kernel
        assert k is not None
        duration = self.u(self.b.train_min) * MIN
        silent = self.rng.random() < self.b.p_silent
        end = self.cell(t, k, duration, None if silent else self.rng.uniform(30, 120))
        self.gpu(end - duration, k, self.rng.uniform(0.6, 0.95))
        self.gpu(end, k, 0.0)
        return end

    def data_loading(self, t: float) -> float:
        k = self.kernel
        assert k is not None
        load = self.u(self.b.load_min) * MIN
        train = self.u(self.b.train_min) * MIN
        end = self.cell(t, k, load + train, self.rng.choice([None, 60.0]))
        start = end - load - train
        self.gpu(start, k, 0.0)  # VRAM held (model on the GPU), nothing computing yet
        self.gpu(start + load, k, self.rng.uniform(0.6, 0.95))
        self.gpu(end, k, 0.0)
        return end

    def silent_cpu_cell(self, t: float) -> float:
        k = self.kernel
        assert k is not None
        self.gpu(t, k, 0.0)
        return self.cell(t, k, self.u(self.b.silent_cpu_min) * MIN, None)

    def gpu_child(self, t: float) -> float:
        k = self.kernel
        assert k is not None
        end = self.cell(t, k, 2.0, None)
        if self.cpu_only:
            return end
        self.children += 1
        proc = f"child-{self.children}"
        stop = end + self.u(self.b.child_h) * HOUR
        self.gpu(end, k, self.rng.uniform(0.7, 0.98), proc, int(self.u(self.b.memory_gib) * GIB))
        self.emit(Gpu(stop, k, proc, 0.0, 0))
        self.busy_until[f"{k}/{proc}"] = stop  # the server is not stopped under a running child
        return end

    def cpu_kernel_busy(self, t: float) -> float:
        k = self.new_kernel(t, gpu=False)
        self.cell(t + 5, k, self.u(self.b.cpu_job_h) * HOUR, self.rng.choice([None, 300.0]))
        return t + 10

    # ------------------------------------------------------------------ a day

    def day(self, d: int, day_start: float, next_day_start: float) -> None:
        b, rng = self.b, self.rng
        weekend = d % 7 >= 5
        if weekend and rng.random() >= b.p_weekend:
            return
        arrive = day_start + min(12.0, max(6.0, rng.gauss(b.arrive_mean_h, b.arrive_sd_h))) * HOUR
        leave = day_start + min(23.0, rng.gauss(b.leave_mean_h, b.leave_sd_h)) * HOUR
        leave = max(leave, arrive + 3 * HOUR)
        self.start_server(arrive)
        self.open_tab(arrive + 5)
        t = arrive + 10
        # Which notebook today?
        if self.kernel is not None and self.kernel in self.kernels and rng.random() < b.p_resume:
            pass
        else:
            old = self.kernel if self.kernel in self.kernels else None
            if old is not None and rng.random() >= b.p_abandon:
                self.stop_kernel(t, old)
            # A CPU-only user still picks the GPU profile / kernelspec: the GPU is allocated, never used.
            self.kernel = self.new_kernel(t + 1, gpu=True)
            self.kernel_mem = 0
            t += 2
        # Breaks: lunch and meetings, as (start, end) intervals.
        breaks: list[tuple[float, float]] = []
        if rng.random() < b.p_lunch:
            lunch = day_start + rng.gauss(12.25, 0.5) * HOUR
            breaks.append((lunch, lunch + self.u(b.lunch_min) * MIN))
        for _ in range(rng.randint(*b.meetings)):
            m = rng.uniform(arrive + HOUR, leave - HOUR)
            breaks.append((m, m + self.u(b.meeting_min) * MIN))
        breaks.sort()
        child_at = arrive + rng.uniform(0.5, 6) * HOUR if rng.random() < b.p_gpu_child else None
        cpu_job_at = arrive + rng.uniform(1, 5) * HOUR if rng.random() < b.p_cpu_kernel_busy else None
        while t < leave:
            inside = next(((s, e) for s, e in breaks if s <= t < e), None)
            if inside is not None:
                t = inside[1] + rng.uniform(0, 5 * MIN)
                continue
            if child_at is not None and t >= child_at:
                t = self.gpu_child(t) + self.u(b.think_min) * MIN
                child_at = None
                continue
            if cpu_job_at is not None and t >= cpu_job_at:
                t = self.cpu_kernel_busy(t) + self.u(b.think_min) * MIN
                cpu_job_at = None
                continue
            x = rng.random()
            if x < b.p_training:
                end = self.training_burst(t)
            elif x < b.p_training + b.p_data_loading:
                end = self.data_loading(t)
            elif x < b.p_training + b.p_data_loading + b.p_silent_cpu:
                end = self.silent_cpu_cell(t)
            else:
                end = self.short_cell(t)
            # Long cells: the user does something else meanwhile and checks back when it ends.
            t = end + self.u(b.think_min) * MIN
        # Leaving.
        if rng.random() < b.p_overnight_training and self.kernel is not None:
            start = max(leave - 10 * MIN, self.busy_until.get(self.kernel, leave))
            duration = self.u(b.overnight_h) * HOUR
            silent = rng.random() < b.p_silent
            end = self.cell(start, self.kernel, duration, None if silent else rng.uniform(60, 300))
            self.gpu(end - duration, self.kernel, rng.uniform(0.7, 0.98))
            self.gpu(end, self.kernel, 0.0)
            leave = max(leave, start + 60)
        if rng.random() < b.p_stop_server and all(v <= leave for v in self.busy_until.values()):
            self.close_tab(leave)
            self.emit(ServerStop(leave + 1, self.name))
            self.server_up = False
            self.kernels.clear()
            self.busy_until.clear()
            self.kernel = None
            return
        if rng.random() < b.p_close_tab:
            self.close_tab(leave)
            return
        # The tab stays open: reconnects until the next arrival (at most until the next day's start + 12 h).
        t = leave
        horizon = next_day_start + 6 * HOUR
        while True:
            t += rng.expovariate(1.0 / (b.reconnect_mean_h * HOUR))
            if t >= horizon:
                break
            self.emit(Reconnect(t, self.name))


def generate(params: FleetParams) -> Trace:
    """A whole fleet's trace, records sorted by time (stable: a user's own order is kept at equal times)."""
    root = random.Random(params.seed)
    duration = params.days * 24 * HOUR
    records: list[tuple[float, int, int, Record]] = []
    for i in range(params.users):
        user = _User(f"user{i + 1:03d}", random.Random(root.getrandbits(64)), params.behaviour)
        for d in range(params.days):
            user.day(d, d * 24 * HOUR, (d + 1) * 24 * HOUR)
        for n, r in enumerate(user.records):
            if r.t < duration:
                records.append((r.t, i, n, r))
    records.sort(key=lambda x: (x[0], x[1], x[2]))
    header = Header(EPOCH, duration, f"generated fleet: {params.users} users x {params.days} days, seed {params.seed}",
                    {"generator": "bench.replay.generate", **_params_json(params)})
    return Trace(header, [r for *_, r in records])


def _params_json(params: FleetParams) -> dict[str, object]:
    plain = {"users": params.users, "days": params.days, "seed": params.seed, "behaviour": asdict(params.behaviour)}
    return json.loads(json.dumps(plain))  # as the file keeps it (tuples become lists)
