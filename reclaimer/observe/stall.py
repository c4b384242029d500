"""Blocking calls that may never return, kept from stalling the daemon: one worker thread per stage.

A read of ``/proc/<pid>/cmdline`` of a process stuck in the driver (D state) can block for as long as the process
is stuck; a wedged NVML call can block for minutes. ``asyncio.to_thread`` with a timeout gives up *waiting*, but the
thread stays blocked; the next cycle starts another, and the default executor fills up with stuck threads until
every ``to_thread`` in the daemon queues behind them. Here each stage has exactly one thread. While a call is still
running past its timeout the stage is *stalled*: the next call is refused at once (``Stalled``) instead of queueing
behind it or starting another thread, the stall shows in ``/readyz`` and ``reclaimer_stalled{stage}``, and each call
that outlived its timeout counts in ``reclaimer_stalled_calls_total{stage}``. When the stuck call returns, the stage
works again by itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# The bounded label set of reclaimer_stalled{stage} / reclaimer_stalled_calls_total{stage}.
STAGES: tuple[str, ...] = ("nvml", "procfs", "pod-list", "pod-resources")


class Stalled(Exception):
    """The stage's previous call has not returned: this one was not started (no thread, no queue)."""

    def __init__(self, stage: str, what: str, running_for: float) -> None:
        self.stage, self.what, self.running_for = stage, what, running_for
        super().__init__(
            f"{stage} stalled: {what} has not returned for {running_for:.0f}s; not called again until it does"
        )


class CallTimedOut(Exception):
    """The call did not return within its timeout; it goes on in the stage's thread (the stage is now stalled)."""

    def __init__(self, stage: str, what: str, timeout: float) -> None:
        self.stage, self.what, self.timeout = stage, what, timeout
        super().__init__(f"{what} did not return within {timeout:g}s ({stage} stalled until it does)")


@dataclass(frozen=True, slots=True)
class StageState:
    stalled: bool  # a call is running past its timeout
    what: str  # what is (or was last) running
    running_for: float  # seconds, 0 when idle
    stalled_calls: int  # calls that outlived their timeout, ever


class StageWorker:
    """Runs one blocking call at a time for ``stage`` on its own single thread (created on first use)."""

    def __init__(self, stage: str, clock: Callable[[], float] = time.monotonic) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
        self.stage = stage
        self._clock = clock
        self._queue: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]] | None
        ]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running: concurrent.futures.Future[Any] | None = None
        self._what = ""
        self._started = 0.0
        self._timed_out = False
        self.stalled_calls = 0

    def state(self) -> StageState:
        with self._lock:
            busy = self._running is not None and not self._running.done()
            return StageState(
                busy and self._timed_out, self._what, self._clock() - self._started if busy else 0.0, self.stalled_calls
            )

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float, what: str) -> Any:
        """``fn(*args)`` in the stage's thread, within ``timeout`` seconds. Raises ``Stalled`` without calling when
        the previous call is still running, ``CallTimedOut`` when this one outlives ``timeout``."""
        with self._lock:
            if self._running is not None and not self._running.done():
                raise Stalled(self.stage, self._what, self._clock() - self._started)
            if self._thread is None:
                # A daemon thread: a call stuck in the kernel must not keep the process from exiting on SIGTERM
                # (ThreadPoolExecutor's threads are joined at exit).
                self._thread = threading.Thread(target=self._serve, name=f"stage-{self.stage}", daemon=True)
                self._thread.start()
            self._running = future = concurrent.futures.Future[Any]()
            self._queue.put((fn, args, future))
            self._what, self._started, self._timed_out = what, self._clock(), False
        future.add_done_callback(self._returned)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # distinct types before Python 3.11
            with self._lock:
                if not future.done():
                    self._timed_out = True
                    self.stalled_calls += 1
            log.warning("call stalled", stage=self.stage, what=what, timeout_s=timeout)
            raise CallTimedOut(self.stage, what, timeout) from None

    def _returned(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            late = self._timed_out and future is self._running
            what, took = self._what, self._clock() - self._started
        if late:
            log.warning("stalled call returned", stage=self.stage, what=what, after_s=round(took, 1))

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            fn, args, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting caller
                future.set_exception(exc)

    @property
    def threads(self) -> int:
        """Threads this stage has (0 or 1, ever)."""
        return int(self._thread is not None and self._thread.is_alive())

    def close(self) -> None:
        """Stop the thread once its current call (if any) returns; never waits for a stuck call."""
        if self._thread is not None:
            self._queue.put(None)
