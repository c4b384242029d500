"""Hand-built ``CycleSnapshot``s for the exporter tests (report, metrics, server, prometheus)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from aiohttp import web

from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import BreakerStatus, AttributedProcess, Candidate, CycleSnapshot, Decision, GpuDevice, GpuSample, KernelActivity, PodInfo, ProcessSample, SamplerSnapshot

GIB = 1024**3
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z

K_ALICE = "11111111-1111-4111-8111-111111111111"
K_BOB = "22222222-2222-4222-8222-222222222222"
K_LAB = "33333333-3333-4333-8333-333333333333"
K_MIG = "44444444-4444-4444-8444-444444444444"
POD_UID_ALICE = "aaaaaaaa-0000-4000-8000-000000000001"
POD_UID_BOB = "aaaaaaaa-0000-4000-8000-000000000002"
POD_UID_TRAIN = "aaaaaaaa-0000-4000-8000-000000000003"
POD_UID_MIG = "aaaaaaaa-0000-4000-8000-000000000004"


def gpu_uuid(index: int) -> str:
    return f"GPU-{index:08d}-0000-0000-0000-000000000000"


@dataclass
class SnapshotBuilder:
    """Accumulates GPUs (with a constant-utilisation sample history) and decisions, then builds a snapshot."""

    now: float = NOW
    node: str = "gpu-node-1"
    mode: str = "dry-run"
    interval: float = 1.0
    history: int = 10  # samples per GPU, the last one at ``now``
    devices: list[GpuDevice] = field(default_factory=list)
    samples: dict[str, tuple[GpuSample, ...]] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    unattributed: list[AttributedProcess] = field(default_factory=list)
    gpu_idle: dict[str, float | None] = field(default_factory=dict)
    gateway_up: dict[str, bool | None] = field(default_factory=dict)
    last_sample_at: float | None = None
    breaker: BreakerStatus = field(default_factory=BreakerStatus)

    def gpu(
        self,
        index: int,
        model: str = "NVIDIA A100-SXM4-80GB",
        utilization: float | None | list[float | None] = 0.0,
        memory_used: int | None = 0,
        processes: tuple[ProcessSample, ...] | None = (),
        up: bool = True,
        total: int = 80 * GIB,
        idle_seconds: float | None = None,
    ) -> str:
        """Add a GPU; ``utilization`` a list gives one value per sample (oldest first)."""
        uuid = gpu_uuid(index)
        self.devices.append(GpuDevice(index=index, uuid=uuid, model=model, memory_total_bytes=total))
        utils = utilization if isinstance(utilization, list) else [utilization] * self.history
        start = self.now - (len(utils) - 1) * self.interval
        self.samples[uuid] = tuple(
            GpuSample(
                timestamp=start + i * self.interval,
                index=index,
                uuid=uuid,
                up=up,
                utilization=u if up else None,
                memory_used_bytes=memory_used if up else None,
                memory_total_bytes=total if up else None,
                processes=processes if up else None,
            )
            for i, u in enumerate(utils)
        )
        self.gpu_idle[uuid] = idle_seconds
        return uuid

    def kernel(
        self,
        kernel_id: str | None,
        gpus: dict[str, list[tuple[int, int | None, float | None]]],
        verdict: Verdict,
        *,
        namespace: str | None = None,
        pod: str | None = None,
        pod_uid: str | None = None,
        user: str | None = None,
        gateway: str | None = "eg",
        kernel_name: str | None = "python3",
        execution_state: str | None = "idle",
        last_activity: datetime | None = None,
        connections: int | None = 0,
        action: ActionKind = ActionKind.SHUTDOWN_KERNEL,
        reason: str = "",
        idle_seconds: float | None = None,
        eta_seconds: float | None = None,
        allocated: bool = False,
        activity_error: str | None = None,
    ) -> Decision:
        """Add a candidate and its decision. ``gpus``: uuid -> [(pid, memory_bytes, sm_utilization)]."""
        podinfo = (
            PodInfo(uid=pod_uid or f"uid-{pod}", namespace=namespace or "default", name=pod, node_name=self.node, user=user)
            if pod
            else None
        )
        procs = tuple(
            AttributedProcess(
                pid=pid, starttime=1000 + pid, gpu_uuid=uuid, used_memory_bytes=mem, sm_utilization=sm,
                pod_uid=podinfo.uid if podinfo else None, kernel_id=kernel_id, kernel_pid=pid,
            )
            for uuid, plist in gpus.items()
            for pid, mem, sm in plist
        )  # fmt: skip
        activity = (
            KernelActivity(
                kernel_id=kernel_id, gateway=gateway or "", observed_at=self.now, kernel_name=kernel_name,
                execution_state=execution_state, last_activity=last_activity, connections=connections,
                error=activity_error,
            )
            if kernel_id
            else None
        )  # fmt: skip
        cand = Candidate(
            key=f"kernel:{kernel_id}" if kernel_id else f"pod:{podinfo.uid if podinfo else '?'}",
            node=self.node, kernel_id=kernel_id, gateway=gateway if kernel_id else None, activity=activity,
            pod=podinfo, user=user, gpu_uuids=tuple(gpus), processes=procs, allocated=allocated,
        )  # fmt: skip
        decision = Decision(
            candidate=cand, verdict=verdict, action=action, reason=reason, policy="default",
            idle_seconds=idle_seconds, eta_seconds=eta_seconds,
        )  # fmt: skip
        self.decisions.append(decision)
        return decision

    def build(self) -> CycleSnapshot:
        sampler = SamplerSnapshot(
            devices=tuple(self.devices),
            samples=dict(self.samples),
            started_at=self.now - 3600,
            sample_interval=self.interval,
            last_sample_at=self.now if self.last_sample_at is None else self.last_sample_at,
        )
        return CycleSnapshot(
            node=self.node, mode=self.mode, generated_at=self.now, sampler=sampler,
            decisions=tuple(self.decisions), unattributed=tuple(self.unattributed),
            gpu_idle_seconds=dict(self.gpu_idle), gateway_up=dict(self.gateway_up), observed_at=self.now,
            breaker=self.breaker,
        )  # fmt: skip


def node_snapshot(now: float = NOW, last_sample_at: float | None = None) -> CycleSnapshot:
    """A busy little node: idle kernels in `ml-team`, a busy kernel outside Kubernetes, an allocated pod with no
    process, a MIG GPU with unknown utilisation, a lost GPU, an unattributed process and a gateway that is down.
    """
    b = SnapshotBuilder(now=now, last_sample_at=last_sample_at)
    g0 = b.gpu(0, memory_used=20 * GIB, processes=(ProcessSample(101, 20 * GIB, 0.0),), idle_seconds=2820)
    g1 = b.gpu(1, memory_used=30 * GIB, processes=(ProcessSample(202, 30 * GIB, None),), idle_seconds=1500)
    g2 = b.gpu(
        2, model="NVIDIA H100 80GB HBM3", utilization=0.9, memory_used=41 * GIB,
        processes=(ProcessSample(303, 40 * GIB, 0.9), ProcessSample(999, 1 * GIB, 0.0)), idle_seconds=0,
    )  # fmt: skip
    g3 = b.gpu(3, model="Tesla T4", total=16 * GIB, memory_used=0, processes=(), idle_seconds=3600)
    g4 = b.gpu(4, utilization=None, memory_used=10 * GIB, processes=(ProcessSample(404, 10 * GIB, None),))
    b.gpu(5, model="Tesla T4", total=16 * GIB, up=False)
    la = datetime.fromtimestamp(now - 2820, tz=timezone.utc)
    b.kernel(
        K_ALICE, {g0: [(101, 20 * GIB, 0.0)]}, Verdict.RECLAIM, namespace="ml-team", pod="jupyter-alice",
        pod_uid=POD_UID_ALICE, user="alice", last_activity=la, reason="idle 47m >= idle_after 30m",
        idle_seconds=2820, eta_seconds=0,
    )  # fmt: skip
    b.kernel(
        K_BOB, {g1: [(202, 30 * GIB, None)]}, Verdict.WARN, namespace="ml-team", pod="jupyter-bob",
        pod_uid=POD_UID_BOB, user="bob", reason="idle 25m; reclaim in 5m", idle_seconds=1500, eta_seconds=300,
    )  # fmt: skip
    b.kernel(
        K_LAB, {g2: [(303, 40 * GIB, 0.9)]}, Verdict.KEEP, gateway="lab", user="carol", execution_state="busy",
        reason="GPU busy (90%)", idle_seconds=0,
    )  # fmt: skip
    b.kernel(
        None, {g3: []}, Verdict.WARN, namespace="research", pod="train-x", pod_uid=POD_UID_TRAIN, user="dave",
        action=ActionKind.EVICT_POD, reason="GPU allocated, no process for 1h", idle_seconds=3600,
        eta_seconds=600, allocated=True,
    )  # fmt: skip
    b.kernel(
        K_MIG, {g4: [(404, 10 * GIB, None)]}, Verdict.UNKNOWN, namespace="ml-team", pod="jupyter-erin",
        pod_uid=POD_UID_MIG, user="erin", reason="GPU utilisation unknown (NOT_SUPPORTED)",
    )  # fmt: skip
    b.unattributed.append(
        AttributedProcess(
            pid=999, starttime=5, gpu_uuid=g2, used_memory_bytes=1 * GIB, sm_utilization=0.0,
            reason="no pod: host process",
        )
    )  # fmt: skip
    b.gateway_up.update({"eg": True, "lab": False, "new": None})
    # The breaker has held reclaims back for 15 minutes and lets alice's kernel through this cycle.
    b.breaker = BreakerStatus(
        tripped=True, cause="sustained", reclaimable=3, total=5, since=now - 900, released=f"kernel:{K_ALICE}",
        reason=f"tripped (sustained) since {datetime.fromtimestamp(now - 900, timezone.utc):%H:%M:%S} UTC: 3 of 5 would be reclaimed, more than "
               f"max_fraction_per_cycle=0.5; letting kernel:{K_ALICE} through this cycle (one per cycle)",
    )  # fmt: skip
    return b.build()


@contextmanager
def serve_in_thread(app: web.Application) -> Iterator[str]:
    """Serve ``app`` with ``server.serve`` on 127.0.0.1 (free port) from a thread with its own event loop, so that
    blocking clients (urllib, a Prometheus scraping it) can use it; yields the base URL."""
    from reclaimer.export.server import serve

    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            runner = loop.run_until_complete(serve(app, "127.0.0.1", 0))
            box["runner"] = runner
            box["port"] = runner.addresses[0][1]
        except BaseException as exc:  # surface start-up failures in the test, not in a silent thread
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="reclaimer-http", daemon=True)
    thread.start()
    if not started.wait(timeout=30):
        raise RuntimeError("the reclaimer HTTP server did not start within 30 s")
    if "error" in box:
        raise RuntimeError(f"the reclaimer HTTP server failed to start: {box['error']!r}")
    try:
        yield f"http://127.0.0.1:{box['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
