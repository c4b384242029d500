"""Drift-free GPU sampling in a worker thread, keeping a window of samples per GPU.

NVML calls block (a wedged driver can hang one for minutes), so they run on their own thread and readers only
ever copy what the last finished tick left behind: ``snapshot()`` never waits for an NVML call.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import structlog

from reclaimer.core.model import GpuDevice, GpuHistory, GpuPresence, GpuSample, SamplerSnapshot
from reclaimer.core.policy import fold_presence, fold_sample
from reclaimer.observe.stall import StageState

if TYPE_CHECKING:
    from reclaimer.core.config import GpuSettings

log = structlog.get_logger(__name__)

RING_MARGIN = 2  # extra slots so a window of exactly window_seconds is always covered
WEDGED_AFTER_INTERVALS = 3


class GpuBackend(Protocol):
    """Where samples come from: real NVML (nvml.NvmlBackend) or a simulation (gpusim.SimulatedBackend)."""

    def devices(self) -> tuple[GpuDevice, ...]:
        """The GPUs, enumerated once when the backend was opened."""

    def sample(self, now: float) -> list[GpuSample]:
        """One tick: one GpuSample per device, stamped ``now``. Must not raise for device errors."""

    def mig_parents(self) -> dict[str, str]:
        """MIG device uuid -> parent GPU uuid ({} when there is no MIG)."""

    def error_counts(self) -> dict[tuple[str, str], int]:
        """(NVML function, error code name) -> how often it failed, for reclaimer_nvml_errors_total."""

    def close(self) -> None:
        """Release the library; later samples report every GPU down."""


def open_backend(gpu: GpuSettings) -> GpuBackend:
    """The backend ``gpu.backend`` names. Raises nvml.NvmlUnavailable / gpusim.ScenarioError with one-line causes."""
    if gpu.backend == "nvml":
        from reclaimer.observe.nvml import NvmlBackend  # pynvml only where NVML is wanted

        return NvmlBackend.open(library_path=gpu.library_path)
    if gpu.backend == "simulated":
        from reclaimer.observe.gpusim import SimulatedBackend

        return SimulatedBackend.from_file(gpu.scenario) if gpu.scenario else SimulatedBackend()
    raise ValueError(f"unknown gpu.backend {gpu.backend!r} (use nvml or simulated)")


def ring_size(window_seconds: float, interval: float) -> int:
    """Slots needed to hold ``window_seconds`` of samples taken every ``interval`` seconds."""
    return max(1, math.ceil(window_seconds / interval)) + RING_MARGIN


class Sampler:
    """Samples ``backend`` every ``interval`` seconds on a daemon thread, on the grid ``start + k * interval``.

    A tick that overruns skips the deadlines it missed rather than bursting to catch up. ``on_tick`` receives each
    tick's duration in seconds. ``wait`` (tests) replaces the stop-aware sleep: it gets a timeout in seconds and
    returns True when the sampler should stop.
    """

    def __init__(
        self,
        backend: GpuBackend,
        interval: float,
        window_seconds: float,
        clock: Callable[[], float] = time.time,
        on_tick: Callable[[float], None] | None = None,
        *,
        wait: Callable[[float], bool] | None = None,
        idle_thresholds: Iterable[float] = (),
    ) -> None:
        if not interval > 0:
            raise ValueError(f"sample interval must be positive, got {interval!r}")
        if not window_seconds >= 0:
            raise ValueError(f"window_seconds must not be negative, got {window_seconds!r}")
        self.backend = backend
        self.interval = float(interval)
        self.window_seconds = float(window_seconds)
        self._clock = clock
        self._on_tick = on_tick
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._devices = backend.devices()
        self._maxlen = ring_size(window_seconds, interval)
        self._rings: dict[str, deque[GpuSample]] = {d.uuid: deque(maxlen=self._maxlen) for d in self._devices}
        # Each GPU's idle runs beyond the ring, per policy threshold: a per-pod idle-after longer than the ring
        # still counts down (policy._gpu_view_beyond_ring). Constant size per GPU.
        self._thresholds = tuple(sorted(set(idle_thresholds)))
        self._history: dict[str, GpuHistory] = {}
        # Per GPU: (timestamp of its last sample, pid -> first sample of the pid's current unbroken presence).
        self._presence: dict[str, GpuPresence] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None
        self._last_sample_at: float | None = None
        self.last_tick_at: float | None = None  # clock time when the last successful tick finished
        self.ticks = 0  # successful ticks
        self.failures = 0  # ticks whose backend.sample raised
        self._logged_errors: set[str] = set()
        self._failing = False
        self._tick_started: float | None = None  # clock time the tick in progress began
        self._tick_seq = 0
        self._counted_seq = 0
        self.stalled_ticks = 0  # ticks that ran longer than WEDGED_AFTER_INTERVALS intervals

    # ------------------------------------------------------------------ control

    def start(self, *, thread: bool = True) -> None:
        """Start the sampling thread; the first tick runs at once. ``thread=False`` only marks the start: the caller
        drives ``tick()`` itself (simulated time: the soak, tests)."""
        if self._thread is not None or (not thread and self._started_at is not None):
            raise RuntimeError("sampler already started")
        self._started_at = self._clock()
        if thread:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the thread to stop and join it; True when it ended within ``timeout`` (a wedged call may not)."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        """The sampling thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def wedged(self, now: float) -> bool:
        """No tick has completed for more than 3 intervals since the last one (or since start)."""
        since = self.last_tick_at if self.last_tick_at is not None else self._started_at
        return since is not None and now - since > WEDGED_AFTER_INTERVALS * self.interval

    def stall_state(self, now: float | None = None) -> StageState:
        """The ``nvml`` stage: a tick (NVML calls) running for longer than 3 intervals is stalled. The thread is the
        only one NVML ever uses, so a wedged call holds nothing but itself: readers copy the last finished ticks."""
        now = self._clock() if now is None else now
        with self._lock:
            started = self._tick_started
            running = max(0.0, now - started) if started is not None else 0.0
            stalled = started is not None and running > WEDGED_AFTER_INTERVALS * self.interval
            if stalled and self._counted_seq != self._tick_seq:
                self._counted_seq = self._tick_seq
                self.stalled_ticks += 1
                log.warning("call stalled", stage="nvml", what="NVML sampling tick", running_s=round(running, 1))
            return StageState(stalled, "NVML sampling tick", running, self.stalled_ticks)

    def snapshot(self) -> SamplerSnapshot:
        """A copy of the devices and every GPU's window, oldest first. Never waits for an in-flight tick."""
        with self._lock:
            samples = {uuid: tuple(ring) for uuid, ring in self._rings.items()}
            last = self._last_sample_at
            history = dict(self._history)
            first_seen = {uuid: p.first_seen for uuid, p in self._presence.items()}
            unreadable = {
                uuid: (p.unreadable_at, p.unreadable)
                for uuid, p in self._presence.items()
                if p.unreadable_at is not None
            }
        return SamplerSnapshot(
            devices=self._devices,
            samples=samples,
            started_at=self._started_at if self._started_at is not None else self._clock(),
            sample_interval=self.interval,
            last_sample_at=last,
            history=history,
            first_seen=first_seen,
            unreadable=unreadable,
        )

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        anchor = self._started_at if self._started_at is not None else self._clock()
        k = 0
        while not self._stop.is_set():
            self.tick()
            now = self._clock()
            k = max(k + 1, math.ceil((now - anchor) / self.interval))  # skip missed deadlines, never burst
            delay = anchor + k * self.interval - now
            if delay > 1.5 * self.interval:  # the clock went backwards: start a new grid from here
                anchor, k, delay = now, 0, 0.0
            if self._wait(max(0.0, delay)):
                break

    def tick(self) -> None:
        """Take one sample now and store it. Exceptions from the backend are logged, never raised."""
        started = self._clock()
        with self._lock:
            self._tick_started, self._tick_seq = started, self._tick_seq + 1
        try:
            samples = self.backend.sample(started)
        except Exception as exc:  # the thread must never die silently
            with self._lock:
                self._tick_started = None
            self.failures += 1
            self._failing = True
            kind = type(exc).__name__
            if kind not in self._logged_errors:
                self._logged_errors.add(kind)
                log.error("gpu sample failed", error=repr(exc), exc_info=exc)
            self._report_duration(started)
            return
        if self._failing:
            self._failing = False
            log.info("gpu sampling recovered", failures=self.failures)
        with self._lock:
            self._tick_started = None
            for s in samples:
                ring = self._rings.get(s.uuid)
                if ring is None:
                    ring = self._rings[s.uuid] = deque(maxlen=self._maxlen)
                ring.append(s)
                if self._thresholds:
                    self._history[s.uuid] = fold_sample(self._history.get(s.uuid), s, self._thresholds, self.interval)
                self._presence[s.uuid] = fold_presence(self._presence.get(s.uuid), s, self.interval)
            self._last_sample_at = started
        self.ticks += 1
        self.last_tick_at = self._clock()
        self._report_duration(started)

    def _report_duration(self, started: float) -> None:
        if self._on_tick is None:
            return
        try:
            self._on_tick(max(0.0, self._clock() - started))
        except Exception as exc:  # a metrics bug must not stop sampling
            if "on_tick" not in self._logged_errors:
                self._logged_errors.add("on_tick")
                log.error("on_tick callback failed", error=repr(exc), exc_info=exc)
