"""Sampler: drift-free schedule, bounded window, never blocked by a wedged backend, survives backend errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from reclaimer.core.config import parse_settings
from reclaimer.observe.gpusim import SimulatedBackend
from reclaimer.core.model import GpuDevice, GpuSample, SamplerSnapshot
from reclaimer.observe.nvml import NvmlBackend
from reclaimer.observe.sampler import Sampler, open_backend, ring_size
from tests.support.nvml_fixtures import (
    FakeDelay,
    FakeGpu,
    FakeNvml,
    gpu_uuid,
)

DEVICES = (GpuDevice(0, "GPU-a", "Test GPU", False, 100), GpuDevice(1, "GPU-b", "Test GPU", False, 100))
REPO_ROOT = Path(__file__).resolve().parents[1]


def samples_at(now: float, devices: Sequence[GpuDevice] = DEVICES) -> list[GpuSample]:
    return [GpuSample(now, d.index, d.uuid, True, 0.0, 0, 100) for d in devices]


def poll(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)  # yield the GIL to the sampler thread; the deadline, not this, decides


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedBackend:
    """Records each tick's ``now`` and moves the fake clock by the next scripted duration (negative: clock jump)."""

    def __init__(self, clock: FakeClock, durations: Sequence[float]) -> None:
        self.clock = clock
        self.durations = list(durations)
        self.seen: list[float] = []
        self.done = threading.Event()

    def devices(self) -> tuple[GpuDevice, ...]:
        return DEVICES

    def sample(self, now: float) -> list[GpuSample]:
        self.seen.append(now)
        if len(self.seen) <= len(self.durations):
            self.clock.now += self.durations[len(self.seen) - 1]
        if len(self.seen) >= len(self.durations):
            self.done.set()
        return samples_at(now)

    def mig_parents(self) -> dict[str, str]:
        return {}

    def error_counts(self) -> dict[tuple[str, str], int]:
        return {}

    def close(self) -> None:
        pass


class BlockingBackend(ScriptedBackend):
    """Tick number ``block_on`` (1-based) hangs until ``release`` is set, like a wedged driver call."""

    def __init__(self, block_on: int) -> None:
        super().__init__(FakeClock(0.0), [])
        self.block_on = block_on
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def sample(self, now: float) -> list[GpuSample]:
        self.calls += 1
        if self.calls == self.block_on:
            self.entered.set()
            self.release.wait(60)
        return samples_at(now)


class FlakyBackend(ScriptedBackend):
    def __init__(self, failures: Sequence[Exception | None]) -> None:
        super().__init__(FakeClock(0.0), [])
        self.failures = list(failures)

    def sample(self, now: float) -> list[GpuSample]:
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return samples_at(now)


def run_scripted(durations: Sequence[float], interval: float = 1.0) -> tuple[list[float], list[float]]:
    """Run a Sampler on fake time until the script is done; returns (tick times, on_tick durations)."""
    clock = FakeClock(1000.0)
    backend = ScriptedBackend(clock, durations)

    def fake_wait(timeout: float) -> bool:
        clock.now += timeout
        return backend.done.is_set()

    ticks: list[float] = []
    sampler = Sampler(backend, interval, 10.0, clock=clock, on_tick=ticks.append, wait=fake_wait)
    sampler.start()
    assert backend.done.wait(20), "the script did not finish"
    assert sampler.stop(20)
    return backend.seen, ticks


# ---------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("durations", "expected"),
    [
        pytest.param([0.25] * 5, [1000.0, 1001.0, 1002.0, 1003.0, 1004.0], id="steady-on-the-grid"),
        pytest.param([0.25, 2.5, 0.25, 0.25], [1000.0, 1001.0, 1004.0, 1005.0], id="overrun-skips-missed-ticks"),
        pytest.param([1.0, 1.0, 0.25], [1000.0, 1001.0, 1002.0], id="tick-of-exactly-one-interval"),
        pytest.param([0.25, 0.75, 0.25], [1000.0, 1001.0, 1002.0], id="late-finish-no-drift"),
        pytest.param([0.25, -100.25, 0.25, 0.25], [1000.0, 1001.0, 900.75, 901.75], id="clock-jumps-back"),
    ],
)
def test_ticks_land_on_the_grid_without_drift_or_bursts(durations: list[float], expected: list[float]) -> None:
    seen, tick_durations = run_scripted(durations)
    assert seen == expected
    assert tick_durations == [max(0.0, d) for d in durations]


def test_stop_returns_promptly_between_ticks() -> None:
    sampler = Sampler(ScriptedBackend(FakeClock(0.0), []), interval=3600.0, window_seconds=3600.0)
    sampler.start()
    poll(lambda: sampler.ticks == 1, "the first tick")
    assert sampler.stop(timeout=20)  # an hour-long sleep would fail this join
    assert not sampler.alive


def test_start_twice_is_an_error() -> None:
    sampler = Sampler(ScriptedBackend(FakeClock(0.0), []), interval=3600.0, window_seconds=1.0)
    sampler.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            sampler.start()
    finally:
        assert sampler.stop(20)


@pytest.mark.parametrize(
    ("interval", "window"),
    [pytest.param(0.0, 10.0, id="zero-interval"), pytest.param(-1.0, 10.0, id="negative-interval"),
     pytest.param(1.0, -5.0, id="negative-window")],
)
def test_bad_parameters_are_rejected(interval: float, window: float) -> None:
    with pytest.raises(ValueError, match="interval|window"):
        Sampler(ScriptedBackend(FakeClock(0.0), []), interval=interval, window_seconds=window)


# ---------------------------------------------------------------------- ring buffer


@pytest.mark.parametrize(
    ("window", "interval", "expected"),
    [
        pytest.param(5.0, 1.0, 7, id="five-seconds"),
        pytest.param(0.0, 1.0, 3, id="no-window"),
        pytest.param(1815.0, 1.0, 1817, id="default-policy-window"),
        pytest.param(10.0, 3.0, 6, id="window-not-a-multiple"),
        pytest.param(0.5, 1.0, 3, id="window-below-interval"),
    ],
)
def test_ring_size_covers_the_window(window: float, interval: float, expected: int) -> None:
    assert ring_size(window, interval) == expected


def test_ring_buffer_keeps_only_the_newest_window() -> None:
    clock = FakeClock(0.0)
    sampler = Sampler(ScriptedBackend(clock, []), interval=1.0, window_seconds=5.0, clock=clock)
    for t in range(20):
        clock.now = float(t)
        sampler.tick()
    snap = sampler.snapshot()
    assert isinstance(snap, SamplerSnapshot)
    assert snap.devices == DEVICES and snap.sample_interval == 1.0
    for d in DEVICES:
        assert [s.timestamp for s in snap.samples[d.uuid]] == [13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0]
    assert snap.last_sample_at == 19.0 and snap.latest("GPU-b") == snap.samples["GPU-b"][-1]
    assert sampler.ticks == 20


def test_snapshot_is_a_copy() -> None:
    clock = FakeClock(0.0)
    sampler = Sampler(ScriptedBackend(clock, []), interval=1.0, window_seconds=5.0, clock=clock)
    sampler.tick()
    before = sampler.snapshot()
    clock.now = 1.0
    sampler.tick()
    assert len(before.samples["GPU-a"]) == 1 and len(sampler.snapshot().samples["GPU-a"]) == 2


# ---------------------------------------------------------------------- wedged backend


def test_snapshot_never_waits_for_a_wedged_tick() -> None:
    backend = BlockingBackend(block_on=2)
    sampler = Sampler(backend, interval=0.05, window_seconds=1.0)
    sampler.start()
    try:
        assert backend.entered.wait(20), "the second tick never started"
        got: list[SamplerSnapshot] = []
        reader = threading.Thread(target=lambda: got.append(sampler.snapshot()), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), "snapshot() waited for the wedged tick"
        assert [len(v) for v in got[0].samples.values()] == [1, 1]
        assert sampler.last_tick_at is not None
        assert sampler.wedged(sampler.last_tick_at + 4 * sampler.interval)
        assert sampler.stop(timeout=0.2) is False  # still stuck in the backend; stop does not hang either
    finally:
        backend.release.set()
    assert sampler.stop(timeout=20)


def test_wedged_counts_from_start_then_from_the_last_tick() -> None:
    clock = FakeClock(1000.0)
    backend = BlockingBackend(block_on=1)
    sampler = Sampler(backend, interval=1.0, window_seconds=10.0, clock=clock, wait=lambda _: backend.release.wait(60))
    assert not sampler.wedged(5000.0)  # never started: nothing to be wedged about
    sampler.start()
    try:
        assert backend.entered.wait(20)
        assert not sampler.wedged(1003.0)
        assert sampler.wedged(1003.5)
        clock.now = 1000.25
    finally:
        backend.release.set()
    poll(lambda: sampler.ticks == 1, "the first tick to finish")
    assert sampler.last_tick_at == 1000.25
    assert not sampler.wedged(1003.25)
    assert sampler.wedged(1003.5)
    assert sampler.stop(20)


def test_sampler_over_nvml_survives_a_wedged_driver_call(fake_nvml: FakeNvml) -> None:
    gpus = [FakeGpu(uuid=gpu_uuid(0)), FakeGpu(uuid=gpu_uuid(1))]
    fake_nvml.write(gpus=gpus, delays=[FakeDelay("nvmlDeviceGetUtilizationRates", ms=600_000, gpu=1)])
    backend = NvmlBackend.open(library_path=str(fake_nvml.lib_path))
    sampler = Sampler(backend, interval=0.05, window_seconds=1.0)
    sampler.start()
    try:
        poll(lambda: ("nvmlDeviceGetUtilizationRates", "1") in fake_nvml.calls(), "the wedged call")
        snap = sampler.snapshot()
        assert snap.devices == backend.devices() and all(not v for v in snap.samples.values())
        assert sampler.ticks == 0 and sampler.wedged(time.time() + 1.0)
        fake_nvml.write(gpus=gpus)  # the driver call returns
        poll(lambda: sampler.ticks >= 2, "ticks after the driver recovered")
        latest = sampler.snapshot().latest(gpu_uuid(1))
        assert latest is not None and latest.up and latest.utilization == 0.0
    finally:
        fake_nvml.write(gpus=gpus)
        assert sampler.stop(20)
        backend.close()


# ---------------------------------------------------------------------- failures


def test_backend_errors_are_logged_once_per_kind_and_sampling_goes_on() -> None:
    backend = FlakyBackend([RuntimeError("first"), RuntimeError("second"), ValueError("bad"), None, OSError("x")])
    durations: list[float] = []
    clock = FakeClock(0.0)
    sampler = Sampler(backend, interval=1.0, window_seconds=5.0, clock=clock, on_tick=durations.append)
    with capture_logs() as logs:
        for t in range(5):
            clock.now = float(t)
            sampler.tick()
    failed = [e for e in logs if e["event"] == "gpu sample failed"]
    assert [e["error"] for e in failed] == ["RuntimeError('first')", "ValueError('bad')", "OSError('x')"]
    assert [e["event"] for e in logs].count("gpu sampling recovered") == 1
    assert (sampler.ticks, sampler.failures) == (1, 4)
    assert len(durations) == 5  # failed ticks are timed too
    assert [s.timestamp for s in sampler.snapshot().samples["GPU-a"]] == [3.0]


def test_the_thread_outlives_a_failing_backend() -> None:
    backend = FlakyBackend([RuntimeError("boom")] * 5)
    sampler = Sampler(backend, interval=0.01, window_seconds=1.0)
    sampler.start()
    try:
        poll(lambda: sampler.ticks >= 2, "ticks after the failures")
        assert sampler.alive and sampler.failures == 5
    finally:
        assert sampler.stop(20)


def test_a_failing_on_tick_callback_does_not_stop_sampling() -> None:
    def broken(_: float) -> None:
        raise RuntimeError("metrics bug")

    clock = FakeClock(0.0)
    sampler = Sampler(ScriptedBackend(clock, []), interval=1.0, window_seconds=5.0, clock=clock, on_tick=broken)
    with capture_logs() as logs:
        sampler.tick()
        sampler.tick()
    assert sampler.ticks == 2
    assert [e["event"] for e in logs] == ["on_tick callback failed"]


# ---------------------------------------------------------------------- open_backend


def test_open_backend_simulated_default_and_from_file(tmp_path: Path) -> None:
    default = open_backend(parse_settings("gpu: {backend: simulated}").gpu)
    assert isinstance(default, SimulatedBackend) and len(default.devices()) == 2
    scenario = tmp_path / "node.yaml"
    scenario.write_text("gpus:\n  - {uuid: GPU-from-file, model: Sim, memory_total: 1024}\n")
    from_file = open_backend(parse_settings(f"gpu: {{backend: simulated, scenario: '{scenario}'}}").gpu)
    assert [d.uuid for d in from_file.devices()] == ["GPU-from-file"]


def test_open_backend_nvml_uses_the_library_path(fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(3))])
    backend = open_backend(parse_settings(f"gpu: {{backend: nvml, library_path: '{fake_nvml.lib_path}'}}").gpu)
    try:
        assert isinstance(backend, NvmlBackend) and [d.uuid for d in backend.devices()] == [gpu_uuid(3)]
    finally:
        backend.close()


@pytest.mark.e2e
def test_the_simulated_backend_does_not_import_pynvml() -> None:
    code = ("import sys, json; from reclaimer.core.config import parse_settings; from reclaimer.observe.sampler import open_backend;"
            "open_backend(parse_settings('gpu: {backend: simulated}').gpu); print(json.dumps('pynvml' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False


def test_item4_idle_history_is_constant_size_per_gpu() -> None:
    """The history that lets a long per-pod idle-after count down holds a few numbers per GPU and threshold, however
    long the sampler runs."""
    clock = [1000.0]
    sampler = Sampler(_ScriptedBackend(), interval=1.0, window_seconds=5.0, clock=lambda: clock[0],
                      idle_thresholds=(0.05, 0.1, 0.05))
    sampler.start(thread=False)
    for _ in range(5000):
        clock[0] += 1.0
        sampler.tick()
    snap = sampler.snapshot()
    assert set(snap.history) == {"GPU-a", "GPU-b"} and all(len(h.runs) == 2 for h in snap.history.values())
    assert snap.history["GPU-a"].runs[0.05] == (1001.0, 0.0) and snap.history["GPU-a"].through == 6000.0
    assert max(len(ring) for ring in snap.samples.values()) <= 8


class _ScriptedBackend:
    def devices(self) -> tuple[GpuDevice, ...]:
        return DEVICES

    def sample(self, now: float) -> list[GpuSample]:
        return samples_at(now)

    def mig_parents(self) -> dict[str, str]:
        return {}

    def error_counts(self) -> dict[tuple[str, str], int]:
        return {}

    def close(self) -> None:
        pass
