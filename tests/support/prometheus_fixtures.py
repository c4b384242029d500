"""A real Prometheus server for tests: the ``prometheus`` binary on a free loopback port, with a throw-away config
and storage, scraping every second. Blocking helpers (urllib): use them from sync tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
JOB = "gpu-reclaimer"  # the job name deploy/monitoring/alerts.yaml assumes

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def poll_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Call ``probe`` until it returns something truthy or ``timeout`` passes (then fail naming ``what``)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)  # polling cadence against a deadline, not synchronisation


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET an /api/v1 endpoint; returns the decoded JSON (``status`` may be "error")."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        _status, body = http_get(f"{self.url}/api/v1/{path}{query}")
        return json.loads(body)

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query at the current time."""
        return self.api("query", query=expr)

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["data"]["activeTargets"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


SCRAPE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "scrape-config.yaml"
NODE = "gpu-node-1"  # the node label the shipped relabelling gives the test targets


def shipped_job(targets: Sequence[str], node: str = NODE) -> dict[str, Any]:
    """The job of deploy/monitoring/scrape-config.yaml with static targets in place of Kubernetes discovery: the
    targets carry the __meta_kubernetes_* labels pod discovery would set, so the shipped relabelling (keep the daemon
    pods' metrics port, copy the node name into `Hostname`) runs for real; scraped every second."""
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    del job["kubernetes_sd_configs"]
    meta = {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "gpu-reclaimer",
            "__meta_kubernetes_pod_container_port_name": "http-metrics", "__meta_kubernetes_pod_node_name": node}
    return {**job, "scrape_interval": "1s", "scrape_timeout": "900ms",
            "static_configs": [{"targets": list(targets), "labels": meta}]}


def _write_config(workdir: Path, targets: Sequence[str], rule_files: Sequence[Path]) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [shipped_job(targets)],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(workdir: Path, config: Path, port: int) -> PrometheusServer:
    storage = workdir / f"data-{port}"
    log_path = workdir / f"prometheus-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={storage}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, "GOMAXPROCS": "2"},
        )
    return PrometheusServer(f"http://127.0.0.1:{port}", proc, log_path)


def _stop(server: PrometheusServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


def _wait_ready(server: PrometheusServer, timeout: float) -> bool:
    """True once /-/ready answers 200; False when the process died (e.g. the port was taken meanwhile)."""

    def probe() -> str | None:
        if server.process.poll() is not None:
            return "exited"
        try:
            status, _ = http_get(f"{server.url}/-/ready", timeout=1)
        except OSError:
            return None
        return "ready" if status == 200 else None

    return poll_until("prometheus /-/ready", probe, timeout) == "ready"


@contextmanager
def running_prometheus(
    workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = (), timeout: float = 30.0
) -> Iterator[PrometheusServer]:
    """Start Prometheus scraping ``targets`` ("host:port") as job ``gpu-reclaimer`` every second, loading
    ``rule_files``; yield it once /-/ready answers; stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = _write_config(workdir, targets, rule_files)
    for _attempt in range(3):  # the free port may be taken between choosing and binding it
        server = _start(workdir, config, free_port())
        try:
            if _wait_ready(server, timeout):
                break
        except BaseException:
            _stop(server)
            raise
        _stop(server)
    else:
        raise RuntimeError(f"prometheus did not start; its log:\n{server.log()}")
    try:
        yield server
    finally:
        _stop(server)


def wait_for_target_up(server: PrometheusServer, timeout: float = 20.0) -> dict[str, Any]:
    """Poll /api/v1/targets until the job's target is healthy; returns it."""

    def probe() -> dict[str, Any] | None:
        for t in server.targets():
            if t["labels"].get("job") == JOB and t["health"] == "up":
                return t
        return None

    return poll_until(f"the {JOB} target to be up", probe, timeout)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; returns the completed process (check ``returncode``, ``stdout``, ``stderr``)."""
    return subprocess.run(
        [PROMTOOL, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )
