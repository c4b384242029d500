"""``python -m bench soak``: a time-accelerated day of kernel churn through the real daemon components.

Simulated time is the ``now`` every component already takes (the daemon's, sampler's, gateway pool's, pod cache's
and executor's clock); nothing sleeps. Per simulated sample interval the world changes and the real ``Sampler``
ticks over the simulated GPU backend; per decide interval the real ``Daemon.cycle`` runs: attribution over a
synthetic /proc tree (the kernels' processes, their pods' cgroups), the real ``PodCache`` and ``KubeClient`` against
the fake API server (tests/support/fake_kube.py, real ``kubernetes`` client), the real ``GatewayPool`` against a
fake Jupyter gateway (a small aiohttp app on loopback in its own thread, serving the node's kernels among thousands
of other nodes'; it stands in for Kernel Gateway, which could not serve thousands of kernels here), the policy, the
executor (enforce: DELETEs, Events, verification; dry-run: records) and the metrics, scraped through the real HTTP
server.

The world: kernels arrive (Poisson), alternate busy and idle phases, some are abandoned idle (the reclaim
candidates), users close others; each runs in its own pod (namespaces come and go); the gateway flaps (503 for 10
minutes every 3 hours), some kernels refuse their first DELETEs (back-off), and the other nodes' kernels churn.

Measured at the end of warm-up and at the end: RSS, open fds, threads, asyncio tasks, /metrics series, and every
per-key structure's size; each must stay within the bounds in ``BOUNDS`` (asserted by tests/test_soak.py on a
short run). ``python -m bench soak`` writes the figures into the soak section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any

from bench import BENCH_DIR, REPO_ROOT  # noqa: F401  (REPO_ROOT on sys.path: tests.support)
from bench.common import machine_info, md_table

MIB = 1024 * 1024
GIB = 1024**3
NODE = "soak-node"
T0 = 1_800_000_000.0  # simulated start (2027-01-15)
SOAK_BEGIN = "<!-- soak:begin (written by `python -m bench soak`; the full harness keeps it) -->"
SOAK_END = "<!-- soak:end -->"


@dataclass(frozen=True)
class SoakSizes:
    hours: float = 24.0
    warmup_hours: float = 2.0
    gpus: int = 16
    arrival_every: float = 90.0  # mean seconds between new kernels on this node (Poisson)
    user_lifetime: float = 1800.0  # mean seconds until a user closes a kernel they keep using
    abandoned_share: float = 0.4  # kernels left idle after their first busy phase: the reclaim candidates
    abandoned_cap: float = 7200.0  # an abandoned kernel is closed by its user after this long, if never reclaimed
    other_kernels: int = 3000  # other nodes' kernels the gateway also serves
    sample_interval: float = 5.0
    decide_interval: float = 30.0
    scrape_every: int = 4  # decide cycles between /metrics scrapes
    seed: int = 10


FULL = SoakSizes()
SMOKE = SoakSizes(hours=1.5, warmup_hours=0.5, gpus=6, arrival_every=240.0, user_lifetime=1200.0, abandoned_share=0.5,
                  abandoned_cap=5000.0, other_kernels=500, sample_interval=10.0, decide_interval=30.0, scrape_every=2)

# Flat within these bounds between the end of warm-up and the end (what tests/test_soak.py asserts).
BOUNDS = {
    "rss_growth_bytes": 16 * MIB,
    "fds_growth": 4,  # pooled keep-alive connections come and go
    "threads_growth": 2,  # asyncio's default executor (Events, evictions) starts threads lazily; one per cycle adds hundreds
    "tasks_growth": 0,
    "series_per_candidate": 16,  # /metrics series <= fixed + this x candidates on the node now
}


# --------------------------------------------------------------------------- the fake gateway (its own thread)


@dataclass
class GatewayState:
    """What the fake gateway serves; the soak edits it under ``lock``."""

    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)
    failing_deletes: dict[str, int] = field(default_factory=dict)  # kernel -> DELETEs still to refuse
    down: bool = False  # 503 for everything (a flapping gateway)
    deleted: list[str] = field(default_factory=list)  # kernels shut down through the API, for the world to end
    requests: int = 0
    clock: Callable[[], float] = time.time  # the soak's simulated clock: the Date header follows it (invariant 19)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _gateway_app(state: GatewayState) -> Any:
    from aiohttp import web

    @web.middleware
    async def simulated_date(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Date"] = formatdate(state.clock(), usegmt=True)
        return response

    async def get_kernel(request: web.Request) -> web.Response:
        with state.lock:
            state.requests += 1
            if state.down:
                return web.json_response({"message": "Service Unavailable"}, status=503)
            model = state.kernels.get(request.match_info["kid"])
        if model is None:
            return web.json_response({"message": "Kernel does not exist"}, status=404)
        return web.json_response(model)

    async def delete_kernel(request: web.Request) -> web.Response:
        kid = request.match_info["kid"]
        with state.lock:
            state.requests += 1
            if state.down:
                return web.json_response({"message": "Service Unavailable"}, status=503)
            if state.failing_deletes.get(kid, 0) > 0:
                state.failing_deletes[kid] -= 1
                return web.json_response({"message": "kernel manager busy"}, status=500)
            if state.kernels.pop(kid, None) is None:
                return web.json_response({"message": "Kernel does not exist"}, status=404)
            state.failing_deletes.pop(kid, None)
            state.deleted.append(kid)
        return web.Response(status=204)

    app = web.Application(middlewares=[simulated_date])
    app.router.add_get("/api/kernels/{kid}", get_kernel)
    app.router.add_delete("/api/kernels/{kid}", delete_kernel)
    return app


class GatewayThread:
    """The fake gateway served from a background thread's event loop."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="soak-gateway", daemon=True)
        self._runner: Any = None

    def __enter__(self) -> GatewayThread:
        from aiohttp import web

        self._thread.start()

        async def start() -> str:
            self._runner = web.AppRunner(_gateway_app(self.state), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

        self.url = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


# --------------------------------------------------------------------------- the simulated world


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


@dataclass
class SimKernel:
    kid: str
    pid: int
    gpu: int
    pod_key: tuple[str, str]
    pod_uid: str
    ends_at: float
    busy: bool
    phase_ends: float
    abandoned: bool  # left idle until reclaimed (or until the user closes it)


class World:
    """Kernels, their processes (synthetic /proc + simulated GPU), pods (fake API server) and gateway models."""

    def __init__(self, sizes: SoakSizes, proc: Any, backend: Any, kube: Any, gateway: GatewayState) -> None:
        self.sizes, self.proc, self.backend, self.kube, self.gw = sizes, proc, backend, kube, gateway
        self.rng = random.Random(sizes.seed)
        self.kernels: dict[str, SimKernel] = {}
        self.next_pid = 10_000
        self.next_arrival = T0
        self.started = self.ended_by_user = self.reclaimed = 0
        self.next_flap = T0 + 3 * 3600
        self.flap_ends = 0.0
        self.next_other_churn = T0
        self.namespaces_seen: set[str] = set()
        with gateway.lock:
            for _ in range(sizes.other_kernels):
                self._other_kernel()

    def _other_kernel(self) -> None:
        kid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.gw.kernels[kid] = {"id": kid, "name": "python3", "last_activity": _iso(T0), "execution_state": "idle",
                                "connections": 1}

    def _spawn(self, now: float) -> None:
        s = self.sizes
        kid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        user = f"user{self.rng.randrange(400)}"
        namespace = f"team-{self.rng.randrange(60)}"
        self.namespaces_seen.add(namespace)
        pod_uid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        name = f"jupyter-{user}-{pid}"
        container = f"{self.rng.getrandbits(256):064x}"
        from tests.support.procfs_fixtures import kernel_cmdline, pod_cgroup

        self.proc.add(pid, ppid=1, cmdline=kernel_cmdline(kid), cgroup=pod_cgroup(pod_uid, container),
                      starttime=int(now - T0) + 1000)
        self.kube.add_pod(name, namespace=namespace, node=NODE, uid=pod_uid,
                          labels={"hub.jupyter.org/username": user}, container_ids=[f"containerd://{container}"])
        load = [sum(1 for k in self.kernels.values() if k.gpu == g) for g in range(s.gpus)]
        gpu = self.rng.choice([g for g in range(s.gpus) if load[g] == min(load)])  # pods get their own GPU first
        abandoned = self.rng.random() < s.abandoned_share
        lifetime = s.abandoned_cap if abandoned else self.rng.expovariate(1 / s.user_lifetime)
        k = SimKernel(kid, pid, gpu, (namespace, name), pod_uid, now + lifetime, True,
                      now + self.rng.expovariate(1 / 300), abandoned)
        self.kernels[kid] = k
        with self.gw.lock:
            self.gw.kernels[kid] = {"id": kid, "name": "python3", "last_activity": _iso(now),
                                    "execution_state": "busy", "connections": 1}
            if self.rng.random() < 0.15:
                self.gw.failing_deletes[kid] = 2
        self.backend.add_process(gpu, pid, int(self.rng.uniform(1, 20) * GIB), 0.6)
        self.started += 1

    def _end(self, k: SimKernel) -> None:
        self.kernels.pop(k.kid, None)
        self.proc.remove(k.pid)  # the process exits: NVML and /proc lose it
        self.backend.remove_process(k.pid)
        with self.kube._lock:
            self.kube.pods.pop(k.pod_key, None)
        with self.gw.lock:
            self.gw.kernels.pop(k.kid, None)
            self.gw.failing_deletes.pop(k.kid, None)

    def advance(self, now: float) -> None:
        s = self.sizes
        with self.gw.lock:
            deleted, self.gw.deleted = self.gw.deleted, []
        for kid in deleted:  # shut down through the gateway by the daemon: the kernel process exits
            if kid in self.kernels:
                self.reclaimed += 1
                self._end(self.kernels[kid])
        while self.next_arrival <= now:
            self._spawn(now)
            self.next_arrival += self.rng.expovariate(1 / s.arrival_every)
        for k in list(self.kernels.values()):
            if now >= k.ends_at:
                self.ended_by_user += 1
                self._end(k)
                continue
            if now >= k.phase_ends:
                k.busy = not k.busy and not k.abandoned
                k.phase_ends = now + self.rng.expovariate(1 / (300 if k.busy else 900))
                self.backend.add_process(k.gpu, k.pid, int(self.rng.uniform(1, 20) * GIB), 0.6 if k.busy else 0.0)
                with self.gw.lock:
                    model = self.gw.kernels.get(k.kid)
                    if model is not None:
                        model["execution_state"] = "busy" if k.busy else "idle"
                        model["last_activity"] = _iso(now)
            elif k.busy:
                with self.gw.lock:
                    model = self.gw.kernels.get(k.kid)
                    if model is not None:
                        model["last_activity"] = _iso(now)
        for gpu in range(s.gpus):
            busy = any(k.busy for k in self.kernels.values() if k.gpu == gpu)
            self.backend.set_utilization(gpu, 0.7 if busy else 0.0)
        if now >= self.next_flap:
            self.next_flap, self.flap_ends = now + 3 * 3600, now + 600
            with self.gw.lock:
                self.gw.down = True
        elif self.gw.down and now >= self.flap_ends:
            with self.gw.lock:
                self.gw.down = False
        if now >= self.next_other_churn:  # the other nodes' kernels come and go too
            self.next_other_churn = now + 600
            with self.gw.lock:
                mine = set(self.kernels)
                others = [k for k in self.gw.kernels if k not in mine]
                for kid in self.rng.sample(others, min(len(others), max(1, s.other_kernels // 20))):
                    del self.gw.kernels[kid]
                for _ in range(max(1, s.other_kernels // 20)):
                    self._other_kernel()
        with self.kube._lock:  # the fake API server records every request; keep the fake itself bounded
            self.kube.requests.clear()
            self.kube.events.clear()


# --------------------------------------------------------------------------- measuring


def process_figures() -> dict[str, int]:
    gc.collect()
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024  # type: ignore[index]
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
    return {"rss_bytes": rss, "fds": len(os.listdir("/proc/self/fd")), "threads": threads,
            "tasks": len(asyncio.all_tasks())}


def series_count(body: str) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


@dataclass
class Checkpoint:
    hour: float
    figures: dict[str, int]
    series: int
    candidates: int
    live_kernels: int
    tracked: dict[str, int]


@dataclass
class SoakResult:
    mode: str
    sizes: SoakSizes
    checkpoints: list[Checkpoint]
    warm: Checkpoint
    end: Checkpoint
    started: int
    reclaimed: int
    ended_by_user: int
    cycles: int
    actions: dict[str, int]
    max_series_excess: float  # max over scrapes of series - per-candidate bound (must be <= fixed part)
    fixed_series: int
    wall_seconds: float
    gateway_requests: int
    violations: list[str]
    verdicts: dict[str, int] = field(default_factory=dict)  # decisions by verdict, summed over the cycles
    unknown_reasons: list[str] = field(default_factory=list)  # the first few, to tell churn from a bug


def _tracked(daemon: Any, pool: Any, pods: Any) -> dict[str, int]:
    snap = daemon.sampler.snapshot()
    return {
        **daemon.executor.tracked(),
        **pool.tracked(),
        "attribution_cache": daemon.pipeline.attributor.cache_size,
        **daemon.metrics.tracked(),
        "cooldowns": len(daemon.pipeline.state.last_action_at),
        "reclaimable_since": len(daemon.pipeline.state.reclaimable_since),
        "breaker_released": len(daemon.pipeline.state.breaker_released_at),
        "gpu_history": len(snap.history),
        "bad_label_pods": len(pods._bad_kernel_labels),
    }


async def run_soak(mode: str, sizes: SoakSizes, workdir: Path, progress: bool = False) -> SoakResult:
    """One soak in ``mode`` (enforce | dry-run) over ``sizes.hours`` simulated hours."""
    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only: a day is many lines
    try:
        return await _run_soak(mode, sizes, workdir, progress)
    finally:
        structlog.configure(**saved)


async def _run_soak(mode: str, sizes: SoakSizes, workdir: Path, progress: bool) -> SoakResult:
    import aiohttp

    from reclaimer.core.config import parse_settings
    from reclaimer.app.daemon import Adapters, Daemon
    from reclaimer.observe.gateway import GatewayClient, GatewayPool
    from reclaimer.observe.gpusim import SimulatedBackend
    from reclaimer.observe.kube import PodCache
    from reclaimer.export.server import make_app, serve
    from tests.support.fake_kube import FakeKube
    from tests.support.procfs_fixtures import FakeProc

    clock = [T0]
    now = lambda: clock[0]  # noqa: E731
    root = workdir / f"proc-{mode}"
    proc = FakeProc(root)
    proc.host_init()
    state = GatewayState(clock=now)
    with FakeKube() as kube_api, GatewayThread(state) as gw:
        settings = parse_settings(f"""
mode: {mode}
node_name: {NODE}
listen: 127.0.0.1:0
sample_interval: {sizes.sample_interval}s
decide_interval: {sizes.decide_interval}s
procfs_root: {root}
gpu: {{backend: simulated}}
kubernetes: {{enabled: true, resync_interval: {sizes.decide_interval}s, timeout: 5s}}
gateways: [{{name: gw, url: "{gw.url}", timeout: 2s}}]
policies: [{{name: default, idle_after: 30m, warn_before: 5m, action: shutdown-kernel}}]
limits: {{max_actions_per_cycle: 5, cooldown: 10m, max_fraction_per_cycle: 0.5}}
""")
        backend = SimulatedBackend({"gpus": [{"uuid": f"GPU-50a10000-0000-4000-8000-{i:012d}", "model": "NVIDIA A100",
                                              "memory_total": 80 * GIB, "utilization": 0.0}
                                             for i in range(sizes.gpus)], "processes": []}, proc_root=root)
        kube = kube_api.kube_client(settings.kubernetes, node_name=NODE)
        pods = PodCache(kube, NODE, settings.kubernetes, clock=now)
        pool = GatewayPool([GatewayClient(settings.gateways[0], clock=now)], clock=now)
        daemon = Daemon(settings, Adapters(backend=backend, gateways=pool, kube=kube, pods=pods), clock=now)
        world = World(sizes, proc, backend, kube_api, state)
        runner = await serve(make_app(daemon, daemon.metrics), "127.0.0.1", 0)
        metrics_url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
        daemon.sampler.start(thread=False)
        session = aiohttp.ClientSession()
        checkpoints: list[Checkpoint] = []
        per_tick = round(sizes.decide_interval / sizes.sample_interval)
        ticks = int(sizes.hours * 3600 / sizes.sample_interval)
        warm_tick = int(sizes.warmup_hours * 3600 / sizes.sample_interval)
        hour_ticks = int(3600 / sizes.sample_interval)
        actions: dict[str, int] = {}
        verdicts: dict[str, int] = {}
        unknown_reasons: list[str] = []
        cycles = 0
        series = 0
        candidates = 0
        excess: list[tuple[int, int]] = []  # (series, candidates) per scrape after warm-up
        started = time.perf_counter()
        try:
            for tick in range(ticks + 1):
                world.advance(clock[0])
                daemon.sampler.tick()
                if tick % per_tick == 0:
                    snap, results = await daemon.cycle()
                    cycles += 1
                    candidates = len(snap.decisions)
                    for d in snap.decisions:
                        verdicts[d.verdict.value] = verdicts.get(d.verdict.value, 0) + 1
                        if d.verdict.value == "unknown" and len(unknown_reasons) < 5:
                            unknown_reasons.append(d.reason)
                    for r in results:
                        actions[r.result] = actions.get(r.result, 0) + 1
                    if cycles % sizes.scrape_every == 0:
                        async with session.get(metrics_url) as resp:
                            series = series_count(await resp.text())
                        if tick >= warm_tick:
                            excess.append((series, candidates))
                if tick in (warm_tick, ticks) or (tick % hour_ticks == 0 and tick > 0):
                    cp = Checkpoint(round((clock[0] - T0) / 3600, 2), process_figures(), series, candidates,
                                    len(world.kernels), _tracked(daemon, pool, pods))
                    checkpoints.append(cp)
                    if progress:
                        print(f"soak {mode}: {cp.hour:g} h simulated, {time.perf_counter() - started:.0f} s, RSS "
                              f"{_mib(cp.figures['rss_bytes'])}, {cp.series} series, {cp.live_kernels} kernels live",
                              file=sys.stderr, flush=True)
                clock[0] += sizes.sample_interval
        finally:
            await session.close()
            await runner.cleanup()
            await daemon.close()
        wall = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    warm = next(c for c in checkpoints if abs(c.hour - sizes.warmup_hours) < 1e-6)
    end = checkpoints[-1]
    per = BOUNDS["series_per_candidate"]
    fixed = min(s - per * c for s, c in excess) if excess else 0
    fixed = max(fixed, 0)
    result = SoakResult(mode, sizes, checkpoints, warm, end, world.started, world.reclaimed, world.ended_by_user,
                        cycles, actions, max((s - per * c for s, c in excess), default=0), fixed, wall,
                        state.requests, [], verdicts, unknown_reasons)
    result.violations = check_bounds(result)
    return result


def fixed_series_bound(sizes: SoakSizes) -> int:
    """/metrics series that do not depend on the kernels: per GPU, per gateway, histograms, action counters, and the
    namespaces that held a GPU within the last hour (at most the namespaces the world uses)."""
    return 400 + 12 * sizes.gpus + 2 * 60


def check_bounds(r: SoakResult) -> list[str]:
    """Every figure that left its bound, in words (empty when the soak stayed flat)."""
    out: list[str] = []
    w, e = r.warm.figures, r.end.figures
    if e["rss_bytes"] - w["rss_bytes"] > BOUNDS["rss_growth_bytes"]:
        out.append(f"RSS grew {(e['rss_bytes'] - w['rss_bytes']) / MIB:.1f} MiB (bound {BOUNDS['rss_growth_bytes'] / MIB:.0f})")
    for key, bound in (("fds", "fds_growth"), ("threads", "threads_growth"), ("tasks", "tasks_growth")):
        if e[key] - w[key] > BOUNDS[bound]:
            out.append(f"{key} grew from {w[key]} to {e[key]} (bound +{BOUNDS[bound]})")
    if r.max_series_excess > fixed_series_bound(r.sizes):
        out.append(f"/metrics series exceeded {fixed_series_bound(r.sizes)} + {BOUNDS['series_per_candidate']} x "
                   f"candidates by {r.max_series_excess - fixed_series_bound(r.sizes):.0f}")
    live = max(c.live_kernels for c in r.checkpoints if c.hour >= r.sizes.warmup_hours)
    arrivals_per_hour = 3600 / r.sizes.arrival_every
    per_key = {  # bounded by what is live (and by how long a back-off or a cooldown may outlive its key)
        "records": live, "warned": live, "backoff": live + 5 * 4, "pending": 5 * 8,
        # a home outlives its kernel by absent_retry_max (15 min): the kernels that left in the last 15 minutes
        "homes": live + 2 * arrivals_per_hour * 0.25 + 2, "absent": live + 1,
        "attribution_cache": 2 * live + 1, "namespaces_seen": 60, "namespace_children": 60,
        "cooldowns": 5 * (2 * 600 / r.sizes.decide_interval), "reclaimable_since": live, "breaker_released": live,
"gpu_history": r.sizes.gpus, "bad_label_pods": live,
    }
    for key, value in r.end.tracked.items():
        bound = per_key.get(key)
        if bound is not None and value > bound:
            out.append(f"{key} holds {value} entries (bound {bound:.0f}, {live} kernels live)")
    return out


# --------------------------------------------------------------------------- output


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def markdown(results: Sequence[SoakResult], machine: dict[str, str], command: str) -> str:
    sizes = results[0].sizes
    lines = [
        f"## Soak: {sizes.hours:g} simulated hours of kernel churn\n\n",
        f"Written by `{command}` on {machine.get('date', '?')} ({machine.get('cpu', '?')}, {machine.get('nproc', '?')} "
        f"CPUs, Python {machine.get('python', '?')}, commit {machine.get('commit', '?')}). Simulated time drives every "
        "clock; nothing sleeps. Real parts: Sampler over the simulated GPU backend, attribution over a synthetic "
        "/proc, PodCache + KubeClient (real `kubernetes` client) against the fake API server, GatewayPool against "
        "a fake aiohttp gateway in its own thread (it serves the node's kernels among "
        f"{sizes.other_kernels:,} other nodes' kernels that churn too; a stand-in because a real gateway cannot "
        "serve thousands of kernels here), policy, executor, metrics scraped through the HTTP server. "
        f"{sizes.gpus} GPUs, a new kernel every ~{sizes.arrival_every:g} s (each in its own pod, on the least used GPU), "
        f"{sizes.abandoned_share:.0%} abandoned idle after their first busy phase (closed after "
        f"{sizes.abandoned_cap / 3600:g} h if never reclaimed), the rest closed by their users after "
        f"~{sizes.user_lifetime / 60:.0f} min, busy ~5 min / idle ~15 min phases, "
        f"samples every {sizes.sample_interval:g} s, decisions every {sizes.decide_interval:g} s, policy idle_after "
        "30m; the gateway answers 503 for 10 minutes every 3 hours and 15% of kernels refuse their first two "
        "DELETEs. RSS, fds and threads are the whole process's: the daemon's parts and the two fakes' threads.\n",
    ]
    rows = []
    for r in results:
        acts = ", ".join(f"{k} {v}" for k, v in sorted(r.actions.items())) or "none"
        rows.append((r.mode, f"{r.started:,}", f"{r.reclaimed:,}", f"{r.ended_by_user:,}", f"{r.cycles:,}", acts,
                     f"{r.gateway_requests:,}", f"{r.wall_seconds:.0f} s"))
    lines.append("\n" + md_table(["mode", "kernels started", "reclaimed (DELETE)", "closed by users", "cycles",
                           "action results", "gateway requests", "wall time"], rows))
    lines.append("\nStart = end of warm-up; end = last simulated hour. Bound: what the figure may grow by.\n")
    rows = []
    for r in results:
        w, e = r.warm, r.end
        rows.append((r.mode, f"{w.hour:g} h → {e.hour:g} h",
                     f"{_mib(w.figures['rss_bytes'])} → {_mib(e.figures['rss_bytes'])}",
                     f"{w.figures['fds']} → {e.figures['fds']}", f"{w.figures['threads']} → {e.figures['threads']}",
                     f"{w.figures['tasks']} → {e.figures['tasks']}", f"{w.series} → {e.series}",
                     f"{w.candidates} → {e.candidates}", "ok" if not r.violations else "; ".join(r.violations)))
    lines.append("\n" + md_table(["mode", "simulated", "RSS", "open fds", "threads", "asyncio tasks", "/metrics series",
                           "candidates", "within bounds"], rows))
    lines.append(f"\nBounds: RSS +{BOUNDS['rss_growth_bytes'] / MIB:.0f} MiB, fds +{BOUNDS['fds_growth']}, threads "
                 f"+{BOUNDS['threads_growth']}, tasks +{BOUNDS['tasks_growth']}; /metrics series at every scrape ≤ "
                 f"{fixed_series_bound(sizes)} + {BOUNDS['series_per_candidate']} × candidates on the node.\n")
    for r in results:
        lines.append(f"\nHourly, {r.mode} (RSS / fds / threads / tasks / series / live kernels):\n")
        lines.append("\n" + md_table(["hour", "RSS", "fds", "threads", "tasks", "series", "live"],
                              [(c.hour, _mib(c.figures["rss_bytes"]), c.figures["fds"], c.figures["threads"],
                                c.figures["tasks"], c.series, c.live_kernels) for c in r.checkpoints]))
        keys = sorted(r.end.tracked)
        lines.append(f"\nPer-key structures at the end, {r.mode}:\n")
        lines.append("\n" + md_table(keys, [[r.end.tracked[k] for k in keys]]))
    return "".join(x if x.endswith("\n") else x + "\n" for x in lines)


def write_section(path: Path, text: str) -> None:
    """Put the soak section into RESULTS.md, replacing an earlier one (the rest of the file is kept)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{SOAK_BEGIN}\n{text}{SOAK_END}\n"
    m = re.search(re.escape(SOAK_BEGIN) + r".*?" + re.escape(SOAK_END) + r"\n?", old, re.S)
    if m:
        new = old[: m.start()] + block + old[m.end():]
    else:
        from bench.results import ANALYSIS_BEGIN

        at = old.find(ANALYSIS_BEGIN)
        new = (old[:at] + block + "\n" + old[at:]) if at >= 0 else old + ("\n" if old else "") + block
    path.write_text(new, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=None, help=f"simulated hours (default {FULL.hours:g}; smoke "
                                                              f"{SMOKE.hours:g})")
    p.add_argument("--modes", default="enforce,dry-run", help="comma-separated (default enforce,dry-run)")
    p.add_argument("--smoke", action="store_true", help="the short CI sizes; writes to a temporary directory")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the RESULTS.md to update (default bench/; --smoke: a temporary directory)")
    ns = p.parse_args(argv)
    sizes = SMOKE if ns.smoke else FULL
    if ns.hours is not None:
        if not ns.hours > sizes.warmup_hours:
            p.error(f"--hours must be longer than the {sizes.warmup_hours:g} h warm-up")
        sizes = SoakSizes(**{**sizes.__dict__, "hours": ns.hours})
    modes = [m for m in ns.modes.split(",") if m]
    if not modes or any(m not in ("enforce", "dry-run") for m in modes):
        p.error(f"--modes: choose from enforce, dry-run (got {ns.modes!r})")
    out = ns.out or (Path(tempfile.mkdtemp(prefix="reclaimer-soak-")) if ns.smoke else BENCH_DIR)
    work = Path(tempfile.mkdtemp(prefix="reclaimer-soak-work-"))
    try:
        results = [asyncio.run(run_soak(mode, sizes, work, progress=True)) for mode in modes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench soak" + (" " + " ".join(argv) if argv else "")
    text = markdown(results, machine_info(), command)
    out.mkdir(parents=True, exist_ok=True)
    write_section(out / "RESULTS.md", text)
    print(text)
    print(f"wrote the soak section of {out / 'RESULTS.md'}")
    bad = [f"{r.mode}: {v}" for r in results for v in r.violations]
    for line in bad:
        print("OUT OF BOUNDS:", line)
    return 1 if bad else 0
