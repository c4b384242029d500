"""Shared plumbing for the measures: result rows, statistics, the fake NVML, workers, real kernel processes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from bench import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # tests.support.* (the fake NVML, fixtures) live in the repository, not the wheel
    sys.path.insert(0, str(REPO_ROOT))

log = structlog.get_logger(__name__)

OK, MISS, INFO, SKIPPED = "ok", "MISS", "info", "skipped"

# Optional parts: the smoke test (CI installs only `.[test]`) must run without them.
OPTIONAL = {
    "peer": ("nvitop-exporter", "nvitop_exporter"),
    "plot": ("matplotlib", "matplotlib"),
    "profile": ("pyinstrument", "pyinstrument"),
    "psutil": ("psutil", "psutil"),  # without it, CPU and RSS are read from /proc
}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    """One line of the headline table."""

    measure: str
    case: str
    value: str
    target: str = ""
    status: str = INFO  # ok | MISS | info | skipped
    note: str = ""


@dataclass
class MeasureResult:
    """What one measure hands back: headline rows, a markdown section for RESULTS.md, and raw data (plot, json)."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    markdown: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def verdict(ok: bool | None) -> str:
    """``ok`` / ``MISS`` for a target check; ``info`` when it could not be judged (None)."""
    if ok is None:
        return INFO
    return OK if ok else MISS


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed and pipes escaped."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (q in 0..1) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


@dataclass(frozen=True)
class Fit:
    slope: float
    intercept: float
    r2: float | None  # None: fewer than 3 points or no spread (R² undefined)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Least-squares line through (xs, ys) with its coefficient of determination."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"a linear fit needs >= 2 paired points, got {len(xs)} x and {len(ys)} y")
    slope, intercept = statistics.linear_regression(xs, ys)
    r2: float | None = None
    if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
        r2 = statistics.correlation(xs, ys) ** 2
    return Fit(slope, intercept, r2)


def fmt_us(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:,.2f} ms"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


# --------------------------------------------------------------------------- environment


def missing_optional(assume_missing: frozenset[str]) -> dict[str, str]:
    """Optional part -> why it is unavailable ("nvitop-exporter not installed"); absent parts only."""
    out: dict[str, str] = {}
    for part, (dist, module) in OPTIONAL.items():
        try:
            found = part not in assume_missing and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install counts as absent
            found = False
        if not found:
            out[part] = f"{dist} not installed"
        elif part == "peer" and shutil.which("nvitop-exporter") is None:
            out[part] = "nvitop-exporter not installed (no console script on PATH)"
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the child binds it moments later; collisions are very unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_info() -> dict[str, str]:
    """What the numbers were measured on: CPUs, CPU model, RAM, kernel, Python, package versions, date, commit."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": model,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    for dist in ("gpu-reclaimer", "nvidia-ml-py", "aiohttp", "prometheus-client", "structlog", "pydantic",
                 "nvitop-exporter", "nvitop", "psutil", "matplotlib", "pyinstrument"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- the fake NVML and workers


@dataclass(frozen=True)
class FakeLib:
    """The built fake ``libnvidia-ml.so.1`` (variant "full") and the directory it sits in."""

    lib_dirs: Mapping[str, Path]

    @property
    def lib_dir(self) -> Path:
        return self.lib_dirs["full"]

    @property
    def lib_path(self) -> Path:
        return self.lib_dir / "libnvidia-ml.so.1"


def build_fake_lib(workdir: Path) -> FakeLib:
    """Compile the fake NVML (tests/support/fake_nvml.c) under ``workdir``."""
    from tests.support.nvml_fixtures import build_fake_nvml

    return FakeLib(build_fake_nvml(workdir / "fake-nvml"))


def child_env(lib: FakeLib | None = None, config: Path | None = None,
              extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a measured child: the repo importable, the fake NVML found first, no call log (it would
    append to a file on every NVML call and dominate the cost)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FAKE_NVML_CALL_LOG", "FAKE_NVML_CONFIG")}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if lib is not None:
        env["LD_LIBRARY_PATH"] = str(lib.lib_dir) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if config is not None:
        env["FAKE_NVML_CONFIG"] = str(config)
    env.update(extra or {})
    return env


class WorkerFailed(RuntimeError):
    """A measuring subprocess failed; the message carries its stderr tail."""


def run_worker(module: str, args: Mapping[str, Any], env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --worker JSON`` and return the JSON object it prints as its last stdout line."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(args)]
    try:
        done = subprocess.run(cmd, env=dict(env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise WorkerFailed(f"{module} worker ran past {timeout:.0f}s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise WorkerFailed(f"{module} worker exited {done.returncode}:\n{tail}")
    try:
        return dict(json.loads(lines[-1]))
    except ValueError as exc:
        raise WorkerFailed(f"{module} worker printed no JSON result: {lines[-1][:200]!r}") from exc


def write_fake_state(path: Path, **state: Any) -> None:
    """Replace the fake NVML's state file atomically with a strictly newer mtime (the library re-reads it)."""
    from tests.support.nvml_fixtures import render_config

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_config(**state))
    now = time.time_ns()
    with contextlib.suppress(OSError):
        now = max(now, path.stat().st_mtime_ns + 1_000_000)
    os.utime(tmp, ns=(now, now))
    os.replace(tmp, path)


def node_state(gpus: int, processes: Sequence[int], tick: int, busy_every: int = 4) -> dict[str, Any]:
    """Fake NVML state: ``gpus`` A100s, ``processes`` (pids) spread round-robin, each with a fresh per-process
    utilisation sample stamped for ``tick`` (real drivers hand out new samples for every process that ran)."""
    from tests.support.nvml_fixtures import GIB, FakeGpu, FakeProcess, FakeSample, gpu_uuid

    base_us = 1_700_000_000_000_000 + tick * 1_000_000
    gpu_list = [FakeGpu(uuid=gpu_uuid(i), util=(37 * (i + tick)) % 100 if i % busy_every == 0 else 0)
                for i in range(gpus)]
    if not gpus:
        return {"gpus": [], "processes": [], "samples": []}
    procs = [FakeProcess(pid=pid, gpu=n % gpus, memory=(1 + n % 7) * GIB) for n, pid in enumerate(processes)]
    samples = [FakeSample(gpu=n % gpus, pid=pid, timestamp_us=base_us + n, sm=(n * 13 + tick) % 100)
               for n, pid in enumerate(processes)]
    return {"gpus": gpu_list, "processes": procs, "samples": samples}


# --------------------------------------------------------------------------- measuring a process


class ProcessMeter:
    """CPU seconds (user + system) and RSS of one process: psutil when installed (the bench extras), else /proc
    (CI installs only the test extras)."""

    def __init__(self, pid: int, use_psutil: bool = True) -> None:
        self.pid = pid
        self._process: Any = None
        if use_psutil:
            with contextlib.suppress(ImportError):
                import psutil

                self._process = psutil.Process(pid)

    @property
    def source(self) -> str:
        return "psutil" if self._process is not None else "/proc"

    def cpu_seconds(self) -> float:
        if self._process is not None:
            times = self._process.cpu_times()
            return float(times.user + times.system)
        text = Path(f"/proc/{self.pid}/stat").read_text()
        after_comm = text[text.rfind(")") + 2:].split()
        return (int(after_comm[11]) + int(after_comm[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15

    def rss_bytes(self) -> int:
        if self._process is not None:
            return int(self._process.memory_info().rss)
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/{self.pid}/status has no VmRSS line")


# --------------------------------------------------------------------------- real kernel processes


@dataclass(frozen=True)
class KernelProcess:
    """A stand-in Jupyter kernel: bash whose cmdline names ``kernel-<id>.json``, with one child (sleep)."""

    kernel_id: str
    pid: int
    starttime: int | None
    child_pid: int
    child_starttime: int | None


class KernelProcesses:
    """Spawns real processes shaped like kernels so attribution walks the real /proc. Kills exactly what it
    started (matching pid and starttime) on exit."""

    def __init__(self, workdir: Path) -> None:
        self.runtime_dir = workdir / "jupyter-runtime"
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.kernels: list[KernelProcess] = []
        self._popen: list[subprocess.Popen[bytes]] = []

    def spawn(self, kernel_ids: Sequence[str]) -> list[KernelProcess]:
        """One kernel process (and its child) per id; returns them in order."""
        from tests.support.procfs_fixtures import real_starttime

        started: list[tuple[str, subprocess.Popen[bytes]]] = []
        for kid in kernel_ids:
            conn = self.runtime_dir / f"kernel-{kid}.json"
            conn.write_text('{"transport": "tcp", "ip": "127.0.0.1"}\n')
            # `& ... wait` keeps bash alive as the parent (a lone command would be exec'd, losing the cmdline).
            p = subprocess.Popen(["bash", "-c", "sleep 1e9 & echo $!; wait", str(conn)], stdout=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self._popen.append(p)
            started.append((kid, p))
        out: list[KernelProcess] = []
        for kid, p in started:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if not line.isdigit():
                raise RuntimeError(f"kernel stand-in {p.pid} did not report its child pid (got {line!r})")
            child = int(line)
            kp = KernelProcess(kid, p.pid, real_starttime(p.pid), child, real_starttime(child))
            self.kernels.append(kp)
            out.append(kp)
        return out

    def close(self) -> None:
        from tests.support.procfs_fixtures import kill_if_same

        for k in self.kernels:
            kill_if_same(k.child_pid, k.child_starttime)
            kill_if_same(k.pid, k.starttime)
        for p in self._popen:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
        self.kernels.clear()
        self._popen.clear()

    def __enter__(self) -> KernelProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kernel_ids(n: int, seed: int = 7) -> list[str]:
    """``n`` canonical, reproducible kernel ids."""
    return [str(uuid.UUID(int=(seed << 96) | (i * 0x9E3779B97F4A7C15 % (1 << 96)), version=4)) for i in range(n)]


@contextlib.contextmanager
def stage(name: str, **context: Any) -> Iterator[None]:
    """Log a stage's start and duration (stderr)."""
    started = time.perf_counter()
    log.info("measure started", measure=name, harness=True, **context)
    try:
        yield
    finally:
        log.info("measure finished", measure=name, seconds=round(time.perf_counter() - started, 1), harness=True)
