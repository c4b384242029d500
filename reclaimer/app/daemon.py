"""The daemon of one node: the sampler thread, the decide loop, the HTTP endpoints and their lifecycle.

What one decide cycle does is app.pipeline's; the edges it talks to are app.adapters'. Here: wiring them together
(``Daemon``), running them until SIGTERM (``run_daemon``) or once for ``reclaimer report`` (``run_report``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from reclaimer.act.actions import DryRunExecutor, LiveExecutor, executor_for
from reclaimer.app.adapters import Adapters, build_adapters
from reclaimer.app.pipeline import Pipeline
from reclaimer.core.config import Settings, format_duration
from reclaimer.core.model import ActionResult, CycleSnapshot, halted_reason
from reclaimer.observe.sampler import Sampler
from reclaimer.observe.stall import StageState

if TYPE_CHECKING:
    from aiohttp import web

    from reclaimer.export.metrics import Metrics

__all__ = ["Adapters", "Daemon", "build_adapters", "create_guarded_task", "run_daemon", "run_report"]

log = structlog.get_logger(__name__)


def create_guarded_task(coro: Coroutine[Any, Any, Any], name: str, tasks: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
    """Start a background task whose failure is logged at once, not when (if ever) it is awaited."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("background task failed", task=name, error=repr(t.exception()), exc_info=t.exception())

    task.add_done_callback(done)
    return task


@dataclass
class Daemon:
    """One node's daemon: builds the sampler, the executor and the metrics, runs the decide cycle of ``pipeline``
    on its loop, and answers the endpoints (``DaemonView``) from the latest snapshot."""

    settings: Settings
    adapters: Adapters
    clock: Callable[[], float] = time.time
    executor: DryRunExecutor | LiveExecutor | None = None
    sampler: Sampler | None = None
    metrics: Metrics | None = None
    on_cycle: Callable[[CycleSnapshot, Sequence[ActionResult]], None] | None = None
    pipeline: Pipeline = field(init=False)
    _snapshot: CycleSnapshot | None = None
    _last_cycle_at: float | None = None
    _last_cycle_started: float | None = None
    _cycles: int = 0
    _stop: asyncio.Event | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        from reclaimer.export.metrics import Metrics

        s = self.settings
        if self.metrics is None:
            self.metrics = Metrics(
                self.snapshot, nvml_error_counts=self.adapters.backend.error_counts, stalls=self.stalls
            )
        hist = self.metrics.gateway_request_duration_seconds
        for client in self.adapters.gateways.clients if self.adapters.gateways is not None else ():
            client.on_request = lambda name, secs, _h=hist: _h.labels(gateway=name).observe(secs)
        if self.sampler is None:
            self.sampler = Sampler(
                self.adapters.backend,
                interval=s.sample_interval,
                window_seconds=s.longest_window,
                clock=self.clock,
                on_tick=self.metrics.sample_duration_seconds.observe,
                idle_thresholds={p.gpu_idle_below for p in s.policies},
            )
        if self.executor is None:
            self.executor = executor_for(
                s.mode,
                kernels=self.adapters.gateways,
                servers=self.adapters.hub,
                kube=self.adapters.kube,
                notebooks=self.adapters.notebooks,
                clock=self.clock,
                verify_within=max(120.0, 4 * s.decide_interval),
            )
        self.pipeline = Pipeline(
            s, self.adapters, sampler=self.sampler, executor=self.executor, metrics=self.metrics, clock=self.clock
        )

    async def cycle(self) -> tuple[CycleSnapshot, list[ActionResult]]:
        """One decide cycle (app.pipeline) over the samples held now; its snapshot is what the endpoints serve."""
        now = self.clock()
        self._last_cycle_started = now
        snap, results = await self.pipeline.cycle(now)
        self._snapshot = snap
        self._cycles += 1
        self._last_cycle_at = now
        if self.on_cycle is not None:
            self.on_cycle(snap, results)
        return snap, results

    # ------------------------------------------------------------------ DaemonView (server.py)

    def snapshot(self) -> CycleSnapshot | None:
        return self._snapshot

    def health(self, now: float) -> tuple[bool, str]:
        """Liveness: our own loops tick. Never depends on a gateway, the API server or the GPU."""
        assert self.sampler is not None
        if self.sampler.ticks > 0 and not self.sampler.alive and not self.sampler.stopping:
            return False, "sampler thread stopped"
        started = self._last_cycle_started
        if started is not None and now - started > 10 * self.settings.decide_interval + 60:
            return False, f"decide loop has not started a cycle for {format_duration(now - started)}"
        return True, "ok"

    def stalls(self) -> dict[str, StageState]:
        """Every stage's stall state (the NVML sampling tick included), for /readyz and the metrics."""
        return self.pipeline.stalls()

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
        assert self.sampler is not None
        snap = self._snapshot
        p = self.pipeline
        hub_ok = p.hub.ok if p.hub is not None else None
        stalled = {
            stage: f"{st.what} has not returned for {format_duration(st.running_for)}"
            for stage, st in self.stalls().items()
            if st.stalled
        }
        gw = dict(snap.gateway_up) if snap else {}
        details: dict[str, Any] = {
            "sampler": "ok" if self.sampler.ticks > 0 and not self.sampler.wedged(now) else "waiting for samples",
            "observation": "ok" if snap is not None and snap.observed_at is not None else "waiting for first cycle",
            "gateways": {k: ("up" if v else "down" if v is False else "unknown") for k, v in gw.items()},
            "kubernetes": "disabled" if self.adapters.pods is None else ("ok" if p.kube_ok else "unavailable"),
            "pod_resources": "disabled"
            if self.adapters.pod_resources is None
            else ("ok" if p.podres_ok else "unavailable"),
            "hub": "disabled"
            if self.adapters.hub is None
            else ("ok" if hub_ok else "unknown" if hub_ok is None else "unavailable"),
            "cycles": self._cycles,
            "stalled": stalled,  # stage -> what has not returned: its part of the pipeline is unknown meanwhile
        }
        credentials = p.credentials()
        refused = {k: v for k, v in credentials.items() if v}
        details["credentials"] = {k: (f"refused: {v}" if v else "ok") for k, v in credentials.items()}
        if refused:
            details["actions"] = f"halted: {halted_reason(refused)}"
        ready = details["sampler"] == "ok" and details["observation"] == "ok" and not stalled and not refused
        return ready, details

    # ------------------------------------------------------------------ loops

    async def decide_loop(self) -> None:
        """Cycles on a fixed grid (no drift); a cycle that overruns skips the missed slots."""
        assert self._stop is not None
        interval = self.settings.decide_interval
        start = time.monotonic()
        k = 0
        while not self._stop.is_set():
            try:
                await self.cycle()
            except Exception as exc:  # a bug in one cycle must not end the daemon
                log.error("cycle failed", error=repr(exc), exc_info=exc)
            k = max(k + 1, int((time.monotonic() - start) / interval) + 1)
            delay = start + k * interval - time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, delay))

    async def wait_first_samples(self, timeout: float) -> None:
        assert self.sampler is not None
        deadline = time.monotonic() + timeout
        while self.sampler.ticks == 0 and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, self.settings.sample_interval))

    async def run(self, *, once: bool = False, serve: bool = True) -> int:
        from reclaimer.export.server import BearerToken, make_app
        from reclaimer.export.server import serve as serve_app

        assert self.sampler is not None
        # An unusable token file is a start-up error naming the file, before anything runs.
        token = BearerToken(self.settings.listen_token_file) if serve and self.settings.listen_token_file else None
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        assert self.metrics is not None
        self.sampler.start()
        runner = None
        try:
            if serve:
                host, port = self.settings.listen_host_port
                runner = await serve_app(make_app(self, self.metrics, token), host, port)
                log.info(
                    "serving",
                    listen=self.settings.listen,
                    endpoints="/metrics /healthz /readyz /report",
                    bearer_token_on="/metrics /report" if token is not None else "none",
                )
            await self.wait_first_samples(timeout=max(5.0, 5 * self.settings.sample_interval))
            if once:
                await self.cycle()
                return 0
            create_guarded_task(self.decide_loop(), "decide-loop", self._tasks)
            await self._stop.wait()
            log.info("stopping", reason="signal")
            return 0
        finally:
            await self.close(runner)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self, runner: web.AppRunner | None = None) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3)
        if runner is not None:
            await runner.cleanup()
        assert self.sampler is not None
        stopped = await asyncio.to_thread(self.sampler.stop, 2.0)
        self.pipeline.close()
        for closer in (self.adapters.gateways, self.adapters.hub, self.adapters.notebooks):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.close()
        if not stopped:  # the sampling thread is inside an NVML call: shutting NVML down now could block too
            log.warning("sampler thread still in an NVML call; leaving NVML as it is", stage="nvml")
            return
        with contextlib.suppress(Exception):
            self.adapters.backend.close()


def run_daemon(settings: Settings, once: bool = False) -> int:
    """`reclaimer run`: the daemon until SIGTERM (or one full cycle with ``once``)."""
    from reclaimer.export.logs import configure_logging, log_effective_config

    configure_logging(settings.log_level)
    log_effective_config(settings)
    adapters = build_adapters(settings)
    daemon = Daemon(settings, adapters)

    async def main() -> int:
        return await daemon.run(once=once)

    return asyncio.run(main())


def run_report(
    settings: Settings, window: float, output: str, source_url: str | None, token_file: str | None = None
) -> int:
    """`reclaimer report`: from a running daemon's /report, or one-shot (sample for ``window``, observe, decide)."""
    from reclaimer.export.logs import configure_logging
    from reclaimer.export.report import build_report, render_json, report_from_json
    from reclaimer.export.table import render_table

    configure_logging("warning", stream=sys.stderr)
    if source_url:
        token = None
        if token_file:
            from reclaimer.export.server import _read_token_file

            token = _read_token_file(token_file)
        report = report_from_json(asyncio.run(_fetch_report(source_url, timeout=10.0, token=token)))
    else:
        adapters = build_adapters(settings)
        # The report never acts: it shows what the configured mode would do now, over `window` of samples.
        sampler = Sampler(
            adapters.backend,
            interval=settings.sample_interval,
            window_seconds=max(window, settings.sample_interval) + settings.sample_interval,
        )
        daemon = Daemon(settings, adapters, executor=DryRunExecutor(), sampler=sampler)

        async def main() -> CycleSnapshot:
            sampler.start()
            try:
                await daemon.wait_first_samples(timeout=max(5.0, 5 * settings.sample_interval))
                await asyncio.sleep(window)  # the sampling window itself, not a synchronisation
                snap, _ = await daemon.cycle()
                return snap
            finally:
                await daemon.close()

        report = build_report(asyncio.run(main()))
    sys.stdout.write(render_json(report) if output == "json" else render_table(report))
    sys.stdout.write("\n")
    return 0


async def _fetch_report(url: str, timeout: float, token: str | None = None) -> dict[str, Any]:
    import aiohttp

    from reclaimer.core.errors import ReclaimerError

    target = url.rstrip("/") + "/report"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(target, allow_redirects=False, headers=headers) as resp,
        ):
            if resp.status == 401:
                hint = "the token was refused" if token else "it needs a bearer token: pass --token-file"
                raise ReclaimerError(f"{target} answered HTTP 401: {hint}")
            if resp.status != 200:
                raise ReclaimerError(f"{target} answered HTTP {resp.status}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise ReclaimerError(f"cannot read {target}: {exc or type(exc).__name__}") from None
