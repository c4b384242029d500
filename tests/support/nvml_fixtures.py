"""Build and script the fake ``libnvidia-ml.so.1`` (tests/support/fake_nvml.c) so the real pynvml path runs.

The fixtures ``fake_nvml_libs`` (session) and ``fake_nvml`` (per test) are registered for every test module by
tests/conftest.py (``pytest_plugins``): ask for them by name, never import them (an imported fixture is a second,
per-module definition). Use in tests::

    from tests.support.nvml_fixtures import FakeGpu, FakeProcess, gpu_uuid

    def test_x(fake_nvml):
        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[FakeProcess(pid=os.getpid(), gpu=0)])
        backend = NvmlBackend.open(library_path=str(fake_nvml.lib_path))     # in this process, or
        subprocess.run([...], env=fake_nvml.env())                           # LD_LIBRARY_PATH for a child

The ``fake_nvml`` fixture points ``FAKE_NVML_CONFIG`` (and ``FAKE_NVML_CALL_LOG``) of this process at a fresh
per-test file. pynvml loads one library per process, so in-process tests all share the "full" build; the other
variants (``no_v3``: no ``_v3`` process symbol; ``v1_only``: neither ``_v3`` nor ``_v2``) run in subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

SOURCE = Path(__file__).with_name("fake_nvml.c")
SONAME = "libnvidia-ml.so.1"
GIB = 1024**3
VARIANTS: Mapping[str, tuple[str, ...]] = {
    "full": (),
    "no_v3": ("-DFAKE_NO_PROC_V3",),
    "v1_only": ("-DFAKE_NO_PROC_V3", "-DFAKE_NO_PROC_V2"),
}
# NVML return codes by the names pynvml gives them (without the NVML_ERROR_ prefix).
CODES: Mapping[str, int] = {
    "UNINITIALIZED": 1, "INVALID_ARGUMENT": 2, "NOT_SUPPORTED": 3, "NO_PERMISSION": 4, "NOT_FOUND": 6,
    "INSUFFICIENT_SIZE": 7, "DRIVER_NOT_LOADED": 9, "TIMEOUT": 10, "FUNCTION_NOT_FOUND": 13, "GPU_IS_LOST": 15,
    "RESET_REQUIRED": 16, "LIB_RM_VERSION_MISMATCH": 18, "UNKNOWN": 999,
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def gpu_uuid(index: int) -> str:
    """A well-formed, recognisable GPU uuid for fake GPU ``index``."""
    return f"GPU-fa4e0000-0000-4000-8000-{index:012d}"


def mig_uuid(parent: int, slot: int) -> str:
    return f"MIG-fa4e0000-0000-4000-8000-{parent:06d}{slot:06d}"


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total: int = 80 * GIB
    memory_used: int | str | None = None  # None: the sum of its processes; "NA": NVML_VALUE_NOT_AVAILABLE
    util: int = 0  # percent, as NVML reports it
    mem_util: int = 0
    mig: bool | None = False  # None: nvmlDeviceGetMigMode answers NOT_SUPPORTED
    mig_devices: Sequence[str] = ()  # MIG device uuids in slots 0, 1, ...
    lost: bool = False  # every call on this GPU answers GPU_IS_LOST


@dataclass
class FakeProcess:
    pid: int
    gpu: int
    memory: int | None = GIB  # None: NVML_VALUE_NOT_AVAILABLE


@dataclass
class FakeSample:
    """A per-process utilisation sample; NVML returns those with ``timestamp_us`` > the caller's last seen."""

    gpu: int
    pid: int
    timestamp_us: int
    sm: int = 0  # percent
    mem: int = 0


@dataclass
class FakeError:
    """Make ``function`` (``*``: every call taking a device) answer ``code`` (a name from CODES or a number)."""

    function: str
    code: str | int
    gpu: int | None = None  # None: every GPU (and calls without one)


@dataclass
class FakeDelay:
    """Make ``function`` block for ``ms`` before answering; it returns early once the delay is written away."""

    function: str
    ms: int
    gpu: int | None = None


def _as(cls: type, item: Any) -> Any:
    return cls(**item) if isinstance(item, Mapping) else item


def _v(value: Any) -> str:
    return quote(str(value), safe="-._:/*")


def render_config(
    gpus: Iterable[FakeGpu | Mapping[str, Any]] = (),
    processes: Iterable[FakeProcess | Mapping[str, Any]] = (),
    samples: Iterable[FakeSample | Mapping[str, Any]] = (),
    errors: Iterable[FakeError | Mapping[str, Any]] = (),
    delays: Iterable[FakeDelay | Mapping[str, Any]] = (),
    driver_version: str = "535.104.05",
    empty_process_util: str = "not_found",
) -> str:
    """The fake library's config text for this node state (format: the comment at the top of fake_nvml.c)."""
    lines = [f"driver version={_v(driver_version)}", f"option empty_process_util={empty_process_util}"]
    error_list = [_as(FakeError, e) for e in errors]
    for i, g in enumerate(_as(FakeGpu, g) for g in gpus):
        mig = "unsupported" if g.mig is None else int(bool(g.mig or g.mig_devices))
        line = (f"gpu uuid={_v(g.uuid)} name={_v(g.name)} memory_total={g.memory_total} util={g.util} "
                f"mem_util={g.mem_util} mig={mig}")
        if g.memory_used is not None:
            line += f" memory_used={g.memory_used}"
        lines.append(line)
        for slot, m in enumerate(g.mig_devices):
            lines.append(f"mig parent={i} slot={slot} uuid={_v(m)} memory_total={g.memory_total // 8}")
        if g.lost:
            error_list.append(FakeError("*", "GPU_IS_LOST", gpu=i))
    for p in (_as(FakeProcess, p) for p in processes):
        lines.append(f"proc gpu={p.gpu} pid={p.pid} mem={'NA' if p.memory is None else p.memory}")
    for s in (_as(FakeSample, s) for s in samples):
        lines.append(f"sample gpu={s.gpu} pid={s.pid} ts={s.timestamp_us} sm={s.sm} mem={s.mem}")
    for e in error_list:
        code = CODES[e.code] if isinstance(e.code, str) else int(e.code)
        lines.append(f"error fn={_v(e.function)} code={code}" + ("" if e.gpu is None else f" gpu={e.gpu}"))
    for d in (_as(FakeDelay, d) for d in delays):
        lines.append(f"delay fn={_v(d.function)} ms={d.ms}" + ("" if d.gpu is None else f" gpu={d.gpu}"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- building


_build_lock = threading.Lock()
_built: dict[str, Path] | None = None
BUILDS = {"count": 0}  # compiler runs in this process (tests/test_testinfra.py checks the cache holds)


def _cache_root() -> Path:
    return Path(os.environ.get("RECLAIMER_FAKE_NVML_CACHE") or Path.home() / ".cache" / "reclaimer" / "fake-nvml")


def _build_key(gcc: str) -> str:
    """What the libraries depend on: the source, every variant's flags, the compiler; a change rebuilds."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(repr(sorted(VARIANTS.items())).encode())
    digest.update(os.path.realpath(gcc).encode())
    return digest.hexdigest()[:16]


def _compile(gcc: str, dest: Path) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    builds: dict[str, subprocess.Popen[str]] = {}
    for name, flags in VARIANTS.items():  # compiled side by side: the variants are independent
        out = dirs[name] = dest / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", *flags,
               f"-Wl,-soname,{SONAME}", "-o", str(out / SONAME), str(SOURCE), "-lpthread"]
        builds[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    BUILDS["count"] += 1
    for name, build in builds.items():
        output, _ = build.communicate()
        if build.returncode != 0:
            raise RuntimeError(f"building the fake NVML ({name}) failed:\n{output}")
    return dirs


def build_fake_nvml(dest: Path | None = None) -> dict[str, Path]:
    """Every variant of the fake library, compiled at most once per source: variant -> lib dir.

    The builds live in a cache keyed by the source's hash ($RECLAIMER_FAKE_NVML_CACHE, else
    ~/.cache/reclaimer/fake-nvml/<hash>/<variant>/libnvidia-ml.so.1), so a test run compiles only when
    fake_nvml.c changed; ``dest`` is kept for callers that name a directory and is used only when the cache
    directory cannot be written.
    """
    global _built
    with _build_lock:
        if _built is not None:
            return _built
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("the fake NVML library needs a C compiler: install gcc (apt-get install gcc libc6-dev)")
        final = _cache_root() / _build_key(gcc)
        if not all((final / name / SONAME).is_file() for name in VARIANTS):
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
            except OSError:
                if dest is None:
                    raise
                _built = _compile(gcc, dest)
                return _built
            try:
                _compile(gcc, staging)
                try:
                    staging.rename(final)  # atomic: another run building the same source at once wins or loses whole
                except OSError:
                    if not all((final / name / SONAME).is_file() for name in VARIANTS):
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        _built = {name: final / name for name in VARIANTS}
        return _built


class FakeNvml:
    """One test's view of the fake library: where it is, and the node state it reports."""

    def __init__(self, lib_dirs: Mapping[str, Path], workdir: Path) -> None:
        self.lib_dirs = dict(lib_dirs)
        self.config_path = workdir / "fake_nvml.conf"
        self.call_log_path = workdir / "fake_nvml.calls"
        self._mtime_ns = 0
        self.write()

    @property
    def lib_dir(self) -> Path:
        return self.lib_dirs["full"]

    @property
    def lib_path(self) -> Path:
        return self.library("full")

    def library(self, variant: str = "full") -> Path:
        return self.lib_dirs[variant] / SONAME

    def env(self, variant: str = "full", base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that should load this fake through LD_LIBRARY_PATH."""
        env = dict(os.environ if base is None else base)
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = str(self.lib_dirs[variant]) + (f":{old}" if old else "")
        env["FAKE_NVML_CONFIG"] = str(self.config_path)
        env["FAKE_NVML_CALL_LOG"] = str(self.call_log_path)
        return env

    def write(self, **state: Any) -> None:
        """Replace the node state (keywords of ``render_config``); a running library picks it up on its next call."""
        text = render_config(**state)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        # A strictly newer mtime on a new inode: the library notices even two writes within one clock tick.
        self._mtime_ns = max(time.time_ns(), self._mtime_ns + 1_000_000)
        os.utime(tmp, ns=(self._mtime_ns, self._mtime_ns))
        os.replace(tmp, self.config_path)

    def calls(self) -> list[tuple[str, str]]:
        """(function, device) for every call so far: device "0", "0/m1" (MIG slot 1 of GPU 0) or "-"."""
        if not self.call_log_path.exists():
            return []
        return [tuple(line.split(" ", 1)) for line in self.call_log_path.read_text().splitlines()]  # type: ignore[misc]

    def clear_calls(self) -> None:
        self.call_log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def fake_nvml_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fake library, every variant: compiled only when fake_nvml.c changed (see ``build_fake_nvml``)."""
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture
def fake_nvml(fake_nvml_libs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """A FakeNvml with an empty node, wired into this process's environment for in-process pynvml use."""
    fake = FakeNvml(fake_nvml_libs, tmp_path)
    monkeypatch.setenv("FAKE_NVML_CONFIG", str(fake.config_path))
    monkeypatch.setenv("FAKE_NVML_CALL_LOG", str(fake.call_log_path))
    return fake


# ---------------------------------------------------------------------- a probe in a subprocess

PROBE = r"""
import json, sys
from reclaimer.observe.nvml import NvmlBackend, NvmlUnavailable
args = json.loads(sys.argv[1])
try:
    backend = NvmlBackend.open(library_path=args.get("library_path"))
except NvmlUnavailable as exc:
    print(json.dumps({"ok": False, "error_type": type(exc).__name__, "message": str(exc)}))
    sys.exit(0)
samples = [backend.sample(float(t)) for t in range(args.get("ticks", 1))]
out = {
    "ok": True,
    "driver_version": backend.driver_version,
    "devices": [[d.index, d.uuid, d.model, d.mig_mode, d.memory_total_bytes] for d in backend.devices()],
    "mig_parents": backend.mig_parents(),
    "samples": [[{"uuid": s.uuid, "up": s.up, "utilization": s.utilization, "memory_used": s.memory_used_bytes,
                  "processes": None if s.processes is None else
                  [[p.pid, p.used_memory_bytes, p.sm_utilization] for p in s.processes],
                  "errors": list(s.errors)} for s in tick] for tick in samples],
    "error_counts": [[f, c, n] for (f, c), n in sorted(backend.error_counts().items())],
}
backend.close()
print(json.dumps(out), flush=True)  # last line of stdout, after any log lines
"""


def run_probe(env: Mapping[str, str], library_path: str | None = None, ticks: int = 1,
              timeout: float = 60) -> dict[str, Any]:
    """Open NvmlBackend in a fresh Python (so it loads whatever ``env`` points at), sample, and report as JSON.

    Fails the test when the child writes a traceback or no JSON.
    """
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps({"library_path": library_path, "ticks": ticks})],
        env={**env, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, f"probe failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])
