"""Measure 6: ``/metrics`` scrape latency with many GPUs and kernels, through the real server on loopback.

The snapshot is built like tests/support/export_fixtures.py does (``SnapshotBuilder``) and served by
``server.make_app`` in its own process, as the daemon serves it; scrapes are real HTTP GETs from the harness on
one keep-alive connection.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from typing import Any

from bench import REPO_ROOT
from bench.common import (
    MeasureResult,
    ProcessMeter,
    Row,
    child_env,
    fmt_bytes,
    fmt_ms,
    md_table,
    median,
    quantile,
    stage,
    verdict,
)
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import CycleSnapshot, ProcessSample

TARGET_SECONDS = 0.020
_VERDICTS = (Verdict.KEEP, Verdict.KEEP, Verdict.WARN, Verdict.RECLAIM, Verdict.UNKNOWN, Verdict.EXEMPT)


def build_snapshot(gpus: int, kernels: int) -> CycleSnapshot:
    """``gpus`` GPUs holding ``kernels`` kernels (one process each, round-robin), mixed verdicts, in pods."""
    from tests.support.export_fixtures import GIB, SnapshotBuilder, gpu_uuid

    from bench.common import kernel_ids

    b = SnapshotBuilder(history=60)
    ids = kernel_ids(kernels, seed=21)
    per_gpu: dict[int, list[tuple[int, str]]] = {g: [] for g in range(gpus)}
    for i, kid in enumerate(ids):
        per_gpu[i % gpus].append((30_000 + i, kid))
    for g in range(gpus):
        procs = tuple(ProcessSample(pid, 1 * GIB, 0.01 * (pid % 7)) for pid, _ in per_gpu[g])
        b.gpu(g, utilization=0.02 * (g % 3), memory_used=len(procs) * GIB, processes=procs, idle_seconds=60.0 * g)
    for g, items in per_gpu.items():
        for pid, kid in items:
            v = _VERDICTS[pid % len(_VERDICTS)]
            b.kernel(kid, {gpu_uuid(g): [(pid, 1 * GIB, 0.01 * (pid % 7))]}, v, namespace=f"team-{pid % 12}",
                     pod=f"jupyter-user{pid}", pod_uid=f"aaaaaaaa-0000-4000-8000-{pid:012d}", user=f"user{pid}",
                     gateway=("eg-a", "eg-b")[pid % 2], idle_seconds=None if v == Verdict.UNKNOWN else 900.0,
                     eta_seconds=300.0 if v in (Verdict.WARN, Verdict.RECLAIM) else None,
                     action=ActionKind.SHUTDOWN_KERNEL, reason="bench")
    b.gateway_up.update({"eg-a": True, "eg-b": True})
    return b.build()


class _View:
    """The DaemonView the server needs: a fixed snapshot, always healthy."""

    def __init__(self, snap: CycleSnapshot) -> None:
        self._snap = snap

    def snapshot(self) -> CycleSnapshot:
        return self._snap

    def health(self, now: float) -> tuple[bool, str]:
        return True, "ok"

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
        return True, {}


def _serve(args: dict[str, Any]) -> None:
    """Worker: serve the snapshot on 127.0.0.1 (free port), print the port, serve until stdin closes."""
    import asyncio

    from reclaimer.export.logs import configure_logging
    from reclaimer.export.metrics import Metrics
    from reclaimer.export.server import make_app, serve

    configure_logging("warning")
    snap = build_snapshot(int(args["gpus"]), int(args["kernels"]))
    view = _View(snap)
    metrics = Metrics(view.snapshot, nvml_error_counts=lambda: {("nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED"): 3})

    async def main() -> None:
        runner = await serve(make_app(view, metrics), "127.0.0.1", 0)
        print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the harness closes stdin
        await runner.cleanup()

    asyncio.run(main())


def run(gpus: int, kernels: int, scrapes: int, use_psutil: bool = True) -> MeasureResult:
    """Scrape a server process ``scrapes`` times; latency from the client, CPU per scrape from the server."""
    result = MeasureResult("scrape", "6. /metrics scrape latency")
    args = json.dumps({"gpus": gpus, "kernels": kernels})
    with stage("scrape", gpus=gpus, kernels=kernels, scrapes=scrapes):
        server = subprocess.Popen([sys.executable, "-m", "bench.scrape", "--worker", args], env=child_env(),
                                  cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line.strip().startswith("{"):
                raise RuntimeError(f"scrape server did not start (exit {server.poll()}): {line[:200]!r}")
            port = int(json.loads(line)["port"])
            times, size, series, cpu = _scrapes(port, scrapes, ProcessMeter(server.pid, use_psutil))
        finally:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
    med, p95, worst = median(times), quantile(times, 0.95), max(times)
    result.data = {"median": med, "p95": p95, "max": worst, "bytes": size, "series": series, "times": times,
                   "server_cpu_per_scrape": cpu}
    result.rows.append(Row("scrape", f"/metrics, {gpus} GPUs × {kernels} kernels (median / p95)",
                           f"{fmt_ms(med)} / {fmt_ms(p95)}", f"< {TARGET_SECONDS * 1e3:.0f} ms",
                           verdict(p95 < TARGET_SECONDS),
                           f"{series:,} series, {fmt_bytes(size)}, server CPU {fmt_ms(cpu)}/scrape"))
    result.markdown = (
        f"{scrapes} real HTTP scrapes of `/metrics` on one keep-alive connection (after 3 warm-up scrapes). The "
        "server is `server.make_app` in its own process (as the daemon serves it), holding a snapshot of "
        f"{gpus} GPUs and {kernels} kernels (one process each, mixed verdicts, in pods). The target is judged on "
        "the p95. Server CPU per scrape: the server process's user+system time over the scrapes, divided.\n\n"
        + md_table(["median", "p95", "max", "server CPU / scrape", "series", "body"],
                   [(fmt_ms(med), fmt_ms(p95), fmt_ms(worst), fmt_ms(cpu), f"{series:,}", fmt_bytes(size))])
    )
    return result


def _scrapes(port: int, scrapes: int, server: ProcessMeter) -> tuple[list[float], int, int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    size = series = 0
    try:
        for i in range(scrapes + 3):
            if i == 3:  # the first few warm caches and the connection
                cpu0 = server.cpu_seconds()
            t0 = time.perf_counter()
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read()
            elapsed = time.perf_counter() - t0
            if resp.status != 200:
                raise RuntimeError(f"/metrics answered HTTP {resp.status}")
            if i >= 3:
                times.append(elapsed)
            size = len(body)
        cpu = (server.cpu_seconds() - cpu0) / scrapes
        series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    finally:
        conn.close()
    return times, size, series, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench worker: serve a snapshot's /metrics (run by `python -m bench`)")
    parser.add_argument("--worker", required=True, help="JSON arguments")
    _serve(json.loads(parser.parse_args(argv).worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
