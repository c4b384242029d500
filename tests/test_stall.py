"""Issue 10 item 5, no stall: a blocking /proc read or a wedged NVML call stalls only its own stage (one thread, never
one per cycle, no lock the next cycle needs), shows in /readyz, a metric and the logs; timeouts say what timed out.

The unit tests drive the stage worker, the sampler and the daemon's observation with real blocking calls (an Event,
a FIFO as /proc/<pid>/cmdline, a gateway that never answers); tests/test_daemon.py runs the same against the real
daemon process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from reclaimer.core.config import parse_settings
from reclaimer.app.daemon import Adapters, Daemon
from reclaimer.observe.gateway import GatewayClient, GatewayPool
from reclaimer.observe.gpusim import SimulatedBackend
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import GpuDevice, GpuSample
from reclaimer.observe.sampler import Sampler
from reclaimer.observe.stall import STAGES, CallTimedOut, Stalled, StageWorker
from tests.support.fake_gateway import FakeGateway, hang
from tests.support.procfs_fixtures import FakeProc, kernel_cmdline

KID = "5e5e5e5e-0000-4000-8000-0000000000aa"
GIB = 1024**3


async def test_item5_a_stuck_call_stalls_its_stage_without_a_thread_per_call() -> None:
    worker = StageWorker("procfs")
    release = threading.Event()
    with capture_logs() as logs:
        with pytest.raises(CallTimedOut) as timed_out:
            await worker.call(release.wait, 60, timeout=0.2, what="/proc reads for 3 GPU process(es)")
    assert str(timed_out.value) == "/proc reads for 3 GPU process(es) did not return within 0.2s (procfs stalled until it does)"
    assert [(e["event"], e["stage"], e["what"], e["timeout_s"]) for e in logs] == [
        ("call stalled", "procfs", "/proc reads for 3 GPU process(es)", 0.2)]
    threads = threading.active_count()
    calls: list[int] = []
    for _ in range(50):  # fifty more cycles while the read is stuck: refused at once, nothing queued, no thread
        with pytest.raises(Stalled, match=r"^procfs stalled: /proc reads for 3 GPU process\(es\) has not returned"):
            await worker.call(calls.append, 1, timeout=0.2, what="another read")
    assert calls == [] and threading.active_count() == threads and worker.threads == 1
    state = worker.state()
    assert state.stalled and state.stalled_calls == 1 and state.what == "/proc reads for 3 GPU process(es)"
    with capture_logs() as logs:
        release.set()  # the process left D state: its read returns
        deadline = time.monotonic() + 10
        while worker.state().stalled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert [e["event"] for e in logs] == ["stalled call returned"]
    assert await worker.call(lambda: 42, timeout=1, what="read") == 42
    assert not worker.state().stalled and worker.state().stalled_calls == 1 and worker.threads == 1
    worker.close()


async def test_item5_a_failing_call_raises_its_own_error_and_is_not_a_stall() -> None:
    worker = StageWorker("pod-list")

    def boom() -> None:
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        await worker.call(boom, timeout=1, what="pod list")
    assert worker.state().stalled_calls == 0 and not worker.state().stalled
    with pytest.raises(ValueError, match="unknown stage"):
        StageWorker("gpu-telepathy")
    worker.close()


class _BlockingBackend:
    """A GPU backend whose next sample blocks until released, like a wedged NVML call."""

    def __init__(self) -> None:
        self.block = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.device = GpuDevice(0, "GPU-w", "Test GPU", False, 100)

    def devices(self) -> tuple[GpuDevice, ...]:
        return (self.device,)

    def sample(self, now: float) -> list[GpuSample]:
        if self.block.is_set():
            self.entered.set()
            self.release.wait(60)
        return [GpuSample(now, 0, "GPU-w", True, 0.0, 0, 100)]

    def mig_parents(self) -> dict[str, str]:
        return {}

    def error_counts(self) -> dict[tuple[str, str], int]:
        return {}

    def close(self) -> None:
        pass


def test_item5_a_wedged_nvml_tick_is_a_stall_of_the_nvml_stage_and_holds_no_lock() -> None:
    backend = _BlockingBackend()
    sampler = Sampler(backend, interval=0.05, window_seconds=1.0)
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while sampler.ticks < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not sampler.stall_state().stalled
        backend.block.set()
        assert backend.entered.wait(10)
        with capture_logs() as logs:
            state = sampler.stall_state(time.time() + 1.0)  # a second later: past 3 intervals
            again = sampler.stall_state(time.time() + 2.0)
        assert state.stalled and state.what == "NVML sampling tick" and state.stalled_calls == 1
        assert again.stalled and again.stalled_calls == 1  # one stuck tick counts once
        assert [(e["event"], e["stage"]) for e in logs] == [("call stalled", "nvml")]
        snap = sampler.snapshot()  # readers never wait on the stuck tick (no lock held across NVML calls)
        assert snap.latest("GPU-w") is not None
        backend.block.clear()
        backend.release.set()
        while sampler.stall_state().stalled:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        backend.release.set()
        assert sampler.stop(10)


def _fifo_world(tmp_path: Path) -> tuple[FakeProc, Path, int]:
    """A synthetic /proc where the GPU process's cmdline is a FIFO: reading it blocks like a D-state process's."""
    proc = FakeProc(tmp_path / "proc")
    proc.host_init()
    pid = 4321
    proc.add(pid, ppid=1, cmdline=kernel_cmdline(KID), starttime=500)
    cmdline = proc.root / str(pid) / "cmdline"
    cmdline.unlink()
    os.mkfifo(cmdline)
    return proc, cmdline, pid


def _unblock(fifo: Path) -> None:
    """Be the writer the blocked open() waits for: hand it the kernel's command line and close."""
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, b"\0".join(a.encode() for a in kernel_cmdline(KID)) + b"\0")
    finally:
        os.close(fd)


async def test_item5_a_blocking_proc_read_stalls_attribution_only_and_shows_everywhere(tmp_path: Path) -> None:
    proc, fifo, pid = _fifo_world(tmp_path)
    settings = parse_settings(f"""
mode: enforce
sample_interval: 1s
decide_interval: 1s
procfs_root: {proc.root}
gpu: {{backend: simulated}}
kubernetes: {{enabled: false}}
""")
    backend = SimulatedBackend({"gpus": [{"uuid": "GPU-1", "model": "NVIDIA H100", "memory_total": 80 * GIB}],
                                "processes": [{"pid": pid, "gpu": 0, "memory_bytes": GIB}], "drop_dead_pids": False})
    daemon = Daemon(settings, Adapters(backend=backend))
    assert daemon.sampler is not None
    daemon.sampler.start(thread=False)
    unblocked = False
    try:
        daemon.sampler.tick()
        with capture_logs() as logs:
            snap, results = await daemon.cycle()
        assert results == [] and all(d.verdict is Verdict.UNKNOWN for d in snap.decisions)
        assert [u.reason for u in snap.unattributed] == [
            "attribution unknown: /proc reads for 1 GPU process(es) did not return within 0.6s (procfs stalled until it "
            "does)"]
        assert ("call stalled", "procfs") in [(e["event"], e.get("stage")) for e in logs]
        ready, details = daemon.readiness(time.time())
        assert not ready and details["stalled"]["procfs"].startswith("/proc reads for 1 GPU process(es) has not returned")
        body = daemon.metrics.render()[0].decode()
        assert 'reclaimer_stalled{stage="procfs"} 1.0' in body and 'reclaimer_stalled_calls_total{stage="procfs"} 1.0' in body
        assert all(f'reclaimer_stalled{{stage="{s}"}}' in body for s in STAGES)  # bounded, pre-initialised
        threads = threading.active_count()
        for _ in range(20):  # twenty more cycles while the read is stuck
            daemon.sampler.tick()
            snap, _ = await daemon.cycle()
        assert threading.active_count() == threads  # no thread per cycle
        assert daemon.stalls()["procfs"].stalled_calls == 1  # refused, not started again
        _unblock(fifo)
        unblocked = True
        deadline = time.monotonic() + 10
        while daemon.stalls()["procfs"].stalled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        daemon.sampler.tick()
        snap, _ = await daemon.cycle()
        assert [d.candidate.kernel_id for d in snap.decisions] == [KID]  # attributed again
        assert daemon.readiness(time.time())[1]["stalled"] == {}
        assert 'reclaimer_stalled{stage="procfs"} 0.0' in daemon.metrics.render()[0].decode()
    finally:
        if not unblocked:
            _unblock(fifo)
        await daemon.close()


@pytest.mark.e2e  # waits out real timeouts
async def test_item5_a_timed_out_observation_says_what_timed_out_and_leaves_no_unretrieved_future(
    aiohttp_server: Any,
) -> None:
    gw = FakeGateway()
    gw.fault = hang(gw.release)
    server = await aiohttp_server(gw.app())
    settings = parse_settings(f"""
decide_interval: 1s
sample_interval: 1s
gpu: {{backend: simulated}}
kubernetes: {{enabled: false}}
gateways: [{{name: slow, url: "{server.make_url('')}", timeout: 5s}}]
""")
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
    daemon = Daemon(settings, Adapters(backend=SimulatedBackend(),
                                       gateways=GatewayPool([GatewayClient(settings.gateways[0])])))
    try:
        with capture_logs() as logs:
            got = await daemon.pipeline.observe({KID})
            await asyncio.sleep(0.2)
            gc.collect()
            await asyncio.sleep(0.05)
    finally:
        gw.stop_hanging()
        await daemon.close()
    failed = [e for e in logs if e["event"] == "gateway observation failed"]
    expected = "gateway observation of 1 kernel(s) (gateways: slow) did not finish within 1.6s"
    assert [e["error"] for e in failed] == [expected]
    assert got[KID].error == expected and got[KID].execution_state is None  # unknown, never idle
    assert all(e.get("error") for e in logs if "error" in e)  # no empty error anywhere
    assert [c.get("message") for c in loop_errors] == []  # no "_GatheringFuture exception was never retrieved"
