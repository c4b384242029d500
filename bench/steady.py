"""Measures 3 and 4: the daemon in steady state, and nvitop-exporter beside it on the same fake NVML state.

The node: ``gpus`` fake GPUs whose state the harness rewrites every second (fresh per-process samples, changing
utilisation); ``len(gpu_kernels)`` real kernel stand-in processes (cmdline names ``kernel-<uuid>.json``) are the GPU
processes; two fake gateways (aiohttp, in a harness thread) serve all kernels, half each, with a token. The daemon
is ``python -m reclaimer run`` (dry-run, Kubernetes off); the peer is ``nvitop-exporter --interval 1.0``. Both run
at once, are scraped at the same rate, and are measured over the same window after both are ready.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    INFO,
    SKIPPED,
    FakeLib,
    KernelProcess,
    MeasureResult,
    ProcessMeter,
    Row,
    child_env,
    fmt_bytes,
    free_port,
    md_table,
    median,
    node_state,
    stage,
    verdict,
    write_fake_state,
)
from bench.fake_gateways import TOKEN, TOKEN_ENV, GatewaysInThread

TARGET_CPU_FRACTION = 0.25  # ours / peer, CPU seconds per wall second
TARGET_RSS = 80e6


@dataclass(frozen=True)
class SteadySizes:
    gpus: int
    kernels: int  # on the two gateways together
    duration: float  # measured window, seconds
    sample_interval: float
    decide_interval: float
    scrape_interval: float
    ready_timeout: float


@dataclass
class Measured:
    """One process over the window."""

    name: str
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    rss: list[int] = field(default_factory=list)
    scrape_seconds: list[float] = field(default_factory=list)
    scrape_bytes: int = 0

    @property
    def cpu_per_wall(self) -> float:
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds else float("nan")


class _StateWriter:
    """Rewrites the fake NVML state every ``interval`` seconds (fresh samples, as a driver would have)."""

    def __init__(self, path: Path, gpus: int, pids: Sequence[int], interval: float) -> None:
        self.path, self.gpus, self.pids, self.interval = path, gpus, list(pids), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-nvml-state", daemon=True)
        self.tick = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):  # a rate, not a synchronisation
            self.tick += 1
            write_fake_state(self.path, **node_state(self.gpus, self.pids, self.tick))

    def __enter__(self) -> _StateWriter:
        write_fake_state(self.path, **node_state(self.gpus, self.pids, 0))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str, log_path: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the child's log tail if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready:\n{_tail(log_path)}")
        try:
            status, _ = _get(url, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as exc:
            last = type(exc).__name__
        time.sleep(0.1)  # polling interval while waiting for readiness; the deadline bounds it
    raise RuntimeError(f"{what} not ready at {url} within {timeout:.0f}s ({last}):\n{_tail(log_path)}")


def _listening_port(log_path: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port the daemon bound (it listens on port 0), from its "http server listening" JSON log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"http server listening"' in line:
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    return int(json.loads(line)["addresses"][0].rsplit(":", 1)[1])
        if proc.poll() is not None:
            raise RuntimeError(f"reclaimer run exited with {proc.returncode} before listening:\n{_tail(log_path)}")
        time.sleep(0.1)  # polling interval while the daemon starts; the deadline bounds it
    raise RuntimeError(f"reclaimer run did not log its listening address within {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _config(path: Path, lib: FakeLib, port: int, gw_urls: Sequence[str], s: SteadySizes) -> None:
    gateways = "\n".join(
        f"  - {{name: gw-{i}, url: \"{url}\", kind: kernel-gateway, token_env: {TOKEN_ENV}, timeout: 5s}}"
        for i, url in enumerate(gw_urls)
    )
    path.write_text(
        "mode: dry-run\n"
        "node_name: bench-node\n"
        f"listen: 127.0.0.1:{port}\n"
        f"sample_interval: {s.sample_interval}s\n"
        f"decide_interval: {s.decide_interval}s\n"
        f"gpu: {{backend: nvml, library_path: \"{lib.lib_path}\"}}\n"
        f"gateways:\n{gateways}\n"
        "kubernetes: {enabled: false}\n"
        "log_level: info\n"
    )


def _metric_sum(text: str, name: str) -> float | None:
    """Sum of every sample of ``name`` in a Prometheus text exposition; None when it is absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def run(lib: FakeLib, workdir: Path, all_kernel_ids: Sequence[str], gpu_kernels: Sequence[KernelProcess],
        sizes: SteadySizes, peer_missing: str | None, use_psutil: bool = True) -> MeasureResult:
    """Run the daemon (and the peer unless ``peer_missing`` says why not) on one node state; measure one window."""
    result = MeasureResult("steady", "3–4. Daemon steady state, and nvitop-exporter beside it")
    state = workdir / "steady-nvml.conf"
    half = len(all_kernel_ids) // 2
    groups = [list(all_kernel_ids[:half]), list(all_kernel_ids[half:])]
    pids = [k.pid for k in gpu_kernels]
    with stage("steady state", seconds=sizes.duration, gpus=sizes.gpus, gpu_processes=len(pids),
               kernels=len(all_kernel_ids)), _StateWriter(state, sizes.gpus, pids, sizes.sample_interval), \
            GatewaysInThread(groups) as gws:
        peer_port = free_port()  # nvitop-exporter needs a fixed port; the daemon binds port 0 and logs it
        cfg = workdir / "steady-config.yaml"
        _config(cfg, lib, 0, [g.url for g in gws.gateways], sizes)
        env = child_env(lib, state, {TOKEN_ENV: TOKEN})
        logs = {"daemon": workdir / "daemon.log", "peer": workdir / "nvitop-exporter.log"}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        urls = {"peer": f"http://127.0.0.1:{peer_port}"}
        try:
            with open(logs["daemon"], "wb") as out:
                procs["daemon"] = subprocess.Popen([sys.executable, "-m", "reclaimer", "run", "--config", str(cfg)],
                                                   env=env, stdout=out, stderr=subprocess.STDOUT)
            port = _listening_port(logs["daemon"], procs["daemon"], sizes.ready_timeout)
            urls["daemon"] = f"http://127.0.0.1:{port}"
            if peer_missing is None:
                with open(logs["peer"], "wb") as out:
                    procs["peer"] = subprocess.Popen(
                        ["nvitop-exporter", "--bind-address", "127.0.0.1", "--port", str(peer_port),
                         "--interval", "1.0"], env=child_env(lib, state), stdout=out, stderr=subprocess.STDOUT)
            _wait_ready(urls["daemon"] + "/readyz", procs["daemon"], sizes.ready_timeout, "reclaimer run",
                        logs["daemon"])
            peer_failed = None
            if "peer" in procs:
                try:
                    _wait_ready(urls["peer"] + "/metrics", procs["peer"], sizes.ready_timeout, "nvitop-exporter",
                                logs["peer"])
                except RuntimeError as exc:  # the peer failing must not cost our own numbers
                    peer_failed = " ".join(str(exc).split())[:200]
                    _stop(procs.pop("peer"))
            window = _measure_window(procs, urls, sizes, gws, use_psutil)
            report = json.loads(_get(urls["daemon"] + "/report")[1])
            _, daemon_metrics = _get(urls["daemon"] + "/metrics")
            peer_text = _get(urls["peer"] + "/metrics")[1].decode() if "peer" in procs else ""
        finally:
            codes = {name: _stop(p) for name, p in procs.items()}
    _summarise(result, window, report, daemon_metrics.decode(), peer_text, codes, logs, sizes, len(pids),
               peer_missing, peer_failed)
    return result


def _measure_window(procs: dict[str, subprocess.Popen[bytes]], urls: dict[str, str], sizes: SteadySizes,
                    gws: GatewaysInThread, use_psutil: bool) -> dict[str, Any]:
    ps = {name: ProcessMeter(p.pid, use_psutil) for name, p in procs.items()}
    measured = {name: Measured(name) for name in procs}
    gw_before = [g.stats.snapshot() for g in gws.gateways]
    stop = threading.Event()
    cpu0 = {n: p.cpu_seconds() for n, p in ps.items()}
    t0 = time.monotonic()
    next_scrape = t0
    while (now := time.monotonic()) < t0 + sizes.duration:
        for name, p in ps.items():
            measured[name].rss.append(p.rss_bytes())
        if now >= next_scrape:
            next_scrape += sizes.scrape_interval
            for name in procs:  # both scraped back to back: the same rate
                s0 = time.perf_counter()
                status, body = _get(urls[name] + "/metrics")
                measured[name].scrape_seconds.append(time.perf_counter() - s0)
                measured[name].scrape_bytes = len(body)
                if status != 200:
                    raise RuntimeError(f"{name} /metrics answered HTTP {status} during the window")
        stop.wait(min(1.0, max(0.0, t0 + sizes.duration - time.monotonic())))  # RSS sampled about once a second
    t1 = time.monotonic()
    for name, p in ps.items():
        measured[name].cpu_seconds = p.cpu_seconds() - cpu0[name]
        measured[name].wall_seconds = t1 - t0
    gw = [{k: a[k] - b[k] for k in a} for a, b in zip((g.stats.snapshot() for g in gws.gateways), gw_before)]
    return {"measured": measured, "gateways": gw, "seconds": t1 - t0, "meter": ps["daemon"].source}


def _summarise(result: MeasureResult, window: dict[str, Any], report: dict[str, Any], daemon_metrics: str,
               peer_text: str, codes: dict[str, int | None], logs: dict[str, Path], sizes: SteadySizes,
               gpu_procs: int, peer_missing: str | None, peer_failed: str | None) -> None:
    ours: Measured = window["measured"]["daemon"]
    peer: Measured | None = window["measured"].get("peer")
    kernels = report.get("kernels", [])
    observed = sum(1 for k in kernels if k.get("execution_state") is not None and k.get("gateway"))
    ticks = _metric_sum(daemon_metrics, "reclaimer_sample_duration_seconds_count")
    tick_sum = _metric_sum(daemon_metrics, "reclaimer_sample_duration_seconds_sum")
    cycles = _metric_sum(daemon_metrics, "reclaimer_decide_duration_seconds_count")
    cycle_sum = _metric_sum(daemon_metrics, "reclaimer_decide_duration_seconds_sum")
    gets = sum(g["kernel_gets"] for g in window["gateways"])
    listings = sum(g["listings"] for g in window["gateways"])
    errors = sum(1 for line in logs["daemon"].read_text(errors="replace").splitlines()
                 if '"level": "error"' in line or "Traceback" in line)
    rss_med, rss_max = median(ours.rss), max(ours.rss)
    setup_ok = len(kernels) == gpu_procs and observed == gpu_procs
    result.rows.append(Row("steady", f"daemon CPU, {sizes.gpus} GPUs × {gpu_procs} procs, {sizes.kernels} kernels",
                           f"{ours.cpu_per_wall * 100:.2f}% of a core", "", INFO,
                           f"{ours.cpu_seconds:.2f} CPU-s over {ours.wall_seconds:.0f} s"))
    result.rows.append(Row("steady", "daemon RSS (median / max)", f"{fmt_bytes(rss_med)} / {fmt_bytes(rss_max)}",
                           f"< {fmt_bytes(TARGET_RSS)}", verdict(rss_max < TARGET_RSS)))
    result.rows.append(Row("steady", "attributed and observed kernels", f"{observed}/{gpu_procs}", "all",
                           verdict(setup_ok), f"{gets} GETs, {listings} listings in the window"))
    peer_rows: list[tuple[Any, ...]] = []
    if peer is None and peer_failed is not None:
        result.rows.append(Row("peer", "nvitop-exporter", "failed to start", "", "error", peer_failed))
    elif peer is None:
        result.rows.append(Row("peer", "nvitop-exporter", peer_missing or "peer not installed", "", SKIPPED,
                               "peer not installed: install the bench extras to compare"))
    else:
        ratio = ours.cpu_per_wall / peer.cpu_per_wall if peer.cpu_per_wall > 0 else float("inf")
        result.rows.append(Row("peer", "daemon CPU / nvitop-exporter CPU", f"{ratio:.2f} "
                               f"({ours.cpu_per_wall * 100:.2f}% vs {peer.cpu_per_wall * 100:.2f}%)",
                               f"≤ {TARGET_CPU_FRACTION}", verdict(ratio <= TARGET_CPU_FRACTION),
                               f"peer RSS {fmt_bytes(median(peer.rss))}"))
        peer_rows.append(("nvitop-exporter", f"{peer.cpu_per_wall * 100:.2f}%", f"{peer.cpu_seconds:.2f}",
                          fmt_bytes(median(peer.rss)), fmt_bytes(max(peer.rss)),
                          f"{median(peer.scrape_seconds) * 1e3:.1f} ms", fmt_bytes(peer.scrape_bytes),
                          codes.get("peer")))
    result.data = {"ours": vars(ours) | {"cpu_per_wall": ours.cpu_per_wall},
                   "peer": None if peer is None else vars(peer) | {"cpu_per_wall": peer.cpu_per_wall},
                   "observed": observed, "kernels": len(kernels), "gateway_gets": gets, "gateway_listings": listings,
                   "daemon_errors": errors, "exit_codes": codes}
    in_daemon = (
        f"In the daemon's own metrics (since start): {ticks or 0:.0f} sampling ticks, mean "
        f"{(tick_sum or 0) / ticks * 1e3 if ticks else float('nan'):.2f} ms; {cycles or 0:.0f} decide cycles, "
        f"mean {(cycle_sum or 0) / cycles * 1e3 if cycles else float('nan'):.1f} ms (wall). "
        f"Error lines in the daemon log: {errors}. Exit codes after SIGTERM: "
        f"{', '.join(f'{k} {v}' for k, v in codes.items())}."
    )
    peer_note = (f"nvitop-exporter: {peer_failed or peer_missing}." if peer is None else
                 "nvitop-exporter reads many NVML functions the fake library lacks (clocks, power, temperature, "
                 "fan, PCIe, NVLink): each fails fast as FUNCTION_NOT_FOUND, so on a real driver it does more work "
                 "than here: the comparison flatters the peer.")
    series_peer = sum(1 for line in peer_text.splitlines() if line and not line.startswith("#"))
    per_process = sum(1 for line in peer_text.splitlines() if 'pid="' in line)
    result.markdown = (
        f"Window: {window['seconds']:.0f} s after both were ready (first decide cycle done). Node: {sizes.gpus} fake "
        f"GPUs, {gpu_procs} GPU processes (real PIDs, kernel stand-ins), {sizes.kernels} kernels on 2 gateways; "
        f"sampling every {sizes.sample_interval:g} s, deciding every {sizes.decide_interval:g} s, dry-run; both "
        f"exporters scraped every {sizes.scrape_interval:g} s. CPU = user + system of the process "
        f"({window['meter']}), RSS sampled every second.\n\n"
        + md_table(["process", "CPU (of one core)", "CPU seconds", "RSS median", "RSS max", "scrape (median)",
                    "scrape body", "exit code"],
                   [("reclaimer run", f"{ours.cpu_per_wall * 100:.2f}%", f"{ours.cpu_seconds:.2f}",
                     fmt_bytes(rss_med), fmt_bytes(rss_max), f"{median(ours.scrape_seconds) * 1e3:.1f} ms",
                     fmt_bytes(ours.scrape_bytes), codes.get("daemon")), *peer_rows])
        + f"\nThe daemon attributed and observed {observed} of {gpu_procs} GPU kernels (report: {len(kernels)} "
        f"kernels); the gateways received {gets} per-kernel GETs and {listings} listings during the window. "
        + in_daemon + "\n\n" + peer_note
        + (f" The peer exported {series_peer} series, {per_process} of them per process (label pid)."
           if peer is not None else "") + "\n"
    )
