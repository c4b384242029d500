"""A simulated GPU backend for the demo and the higher-layer tests.

A scenario (a dict, or a YAML file named by ``gpu.scenario``) describes the GPUs, their utilisation over time and
the processes on them::

    gpus:
      - uuid: GPU-de000000-0000-4000-8000-000000000000
        model: NVIDIA A100-SXM4-80GB
        memory_total: 85899345920
        memory_reserved: 0             # counted in memory used, like the driver's own reservation
        utilization: [[0, 0.9], [60, 0.0]]   # or a constant ratio; null = unknown (as NVML NOT_SUPPORTED)
        mig_devices: []                # MIG device uuids; a MIG-enabled GPU reports no utilisation, like NVML
    processes:
      - {pid: 4242, gpu: 0, memory_bytes: 8589934592, sm_utilization: 0.0}   # gpu: index or uuid
    drop_dead_pids: true               # a process whose PID left /proc vanishes, as in real NVML

Utilisation step offsets are seconds since the first sample (or ``start_time``). The runtime API
(``set_utilization``, ``add_process``, ``remove_process``, ``set_lost``) is thread-safe and wins over the scenario.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from reclaimer.core.model import GpuDevice, GpuSample, ProcessSample

log = structlog.get_logger(__name__)

GIB = 1024**3
UTILIZATION_FN = "nvmlDeviceGetUtilizationRates"  # what real NVML would name in errors, so exports look the same

DEFAULT_SCENARIO: Mapping[str, Any] = {
    "gpus": [
        {
            "uuid": f"GPU-5100000{i}-0000-4000-8000-00000000000{i}",
            "model": "Simulated A100-SXM4-80GB",
            "memory_total": 80 * GIB,
            "utilization": 0.0,
        }
        for i in range(2)
    ],
    "processes": [],
    "drop_dead_pids": True,
}

_GPU_KEYS = {"uuid", "model", "memory_total", "memory_reserved", "utilization", "mig_devices"}
_PROCESS_KEYS = {"pid", "gpu", "memory_bytes", "sm_utilization"}
_TOP_KEYS = {"gpus", "processes", "drop_dead_pids"}
_UNSET: Any = object()


class ScenarioError(ValueError):
    """An invalid scenario or runtime call; the message names the culprit (``gpus[1].utilization: ...``)."""


@dataclass
class _Gpu:
    index: int
    uuid: str
    model: str
    memory_total: int
    memory_reserved: int
    timeline: tuple[tuple[float, float | None], ...]  # (offset seconds, ratio) steps, ascending, first at 0
    mig_devices: tuple[str, ...]
    override: Any = _UNSET  # set_utilization() value (a ratio or None), wins over the timeline
    lost: bool = False
    mig_error_counted: bool = False


@dataclass
class _Process:
    pid: int
    gpu: int
    memory_bytes: int | None
    sm_utilization: float | None
    starttime: int | None = None  # /proc identity: a reused PID is another process


# ---------------------------------------------------------------------- validation


def _fail(source: str, where: str, message: str) -> ScenarioError:
    return ScenarioError(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ratio(value: Any, where: str, source: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise _fail(source, where, f"must be a ratio between 0 and 1 (or null for unknown), got {value!r}")
    return float(value)


def _byte_count(value: Any, where: str, source: str, *, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(source, where, f"must be a whole number of bytes >= 0, got {value!r}")
    return value


def _mapping(value: Any, where: str, source: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(source, where, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise _fail(source, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return value


def _timeline(value: Any, where: str, source: str) -> tuple[tuple[float, float | None], ...]:
    if value is None or _is_number(value):
        return ((0.0, _ratio(value, where, source)),)
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise _fail(
            source, where, f"must be a ratio, null, or a list of [t_offset_seconds, ratio] steps, got {value!r}"
        )
    steps: list[tuple[float, float | None]] = []
    for i, step in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(step, Sequence) or isinstance(step, str) or len(step) != 2 or not _is_number(step[0]):
            raise _fail(source, at, f"must be [t_offset_seconds, ratio], got {step!r}")
        if steps and step[0] <= steps[-1][0]:
            raise _fail(source, at, f"offsets must increase, {step[0]!r} follows {steps[-1][0]!r}")
        steps.append((float(step[0]), _ratio(step[1], at, source)))
    if steps[0][0] != 0:
        raise _fail(source, f"{where}[0]", f"the first step must start at offset 0, got {steps[0][0]!r}")
    return tuple(steps)


def _parse_gpus(value: Any, source: str) -> list[_Gpu]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise _fail(source, "gpus", "must be a non-empty list of GPUs")
    gpus: list[_Gpu] = []
    seen: set[str] = set()
    for i, raw in enumerate(value):
        where = f"gpus[{i}]"
        g = _mapping(raw, where, source, _GPU_KEYS)
        uuid = g.get("uuid")
        if not isinstance(uuid, str) or not uuid.strip():
            raise _fail(source, f"{where}.uuid", f"is required and must be a non-empty string, got {uuid!r}")
        migs = g.get("mig_devices", [])
        if not isinstance(migs, Sequence) or isinstance(migs, str) or not all(isinstance(m, str) and m for m in migs):
            raise _fail(source, f"{where}.mig_devices", f"must be a list of MIG device uuids, got {migs!r}")
        for u in (uuid, *migs):
            if u in seen:
                raise _fail(source, where, f"uuid {u!r} is used twice")
            seen.add(u)
        model = g.get("model", "Simulated GPU")
        if not isinstance(model, str) or not model:
            raise _fail(source, f"{where}.model", f"must be a non-empty string, got {model!r}")
        gpus.append(
            _Gpu(
                index=i,
                uuid=uuid,
                model=model,
                memory_total=_byte_count(g.get("memory_total", 80 * GIB), f"{where}.memory_total", source) or 0,
                memory_reserved=_byte_count(g.get("memory_reserved", 0), f"{where}.memory_reserved", source) or 0,
                timeline=_timeline(g.get("utilization", 0.0), f"{where}.utilization", source),
                mig_devices=tuple(migs),
            )
        )
    return gpus


def _gpu_index(ref: Any, gpus: Sequence[_Gpu], where: str, source: str) -> int:
    if isinstance(ref, int) and not isinstance(ref, bool):
        if 0 <= ref < len(gpus):
            return ref
        raise _fail(source, where, f"no GPU with index {ref} (there are {len(gpus)})")
    if isinstance(ref, str):
        for g in gpus:
            if g.uuid == ref:
                return g.index
        raise _fail(source, where, f"no GPU with uuid {ref!r}")
    raise _fail(source, where, f"must be a GPU index or uuid, got {ref!r}")


def _pid(value: Any, where: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(source, where, f"must be a positive PID, got {value!r}")
    return value


def _parse_processes(value: Any, gpus: Sequence[_Gpu], source: str) -> list[_Process]:
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _fail(source, "processes", "must be a list of processes")
    procs: list[_Process] = []
    seen: set[tuple[int, int]] = set()
    for i, raw in enumerate(value):
        where = f"processes[{i}]"
        p = _mapping(raw, where, source, _PROCESS_KEYS)
        if "gpu" not in p:
            raise _fail(source, f"{where}.gpu", "is required (a GPU index or uuid)")
        proc = _Process(
            pid=_pid(p.get("pid"), f"{where}.pid", source),
            gpu=_gpu_index(p["gpu"], gpus, f"{where}.gpu", source),
            memory_bytes=_byte_count(p.get("memory_bytes", 0), f"{where}.memory_bytes", source, nullable=True),
            sm_utilization=_ratio(p.get("sm_utilization"), f"{where}.sm_utilization", source),
        )
        if (proc.pid, proc.gpu) in seen:
            raise _fail(source, where, f"pid {proc.pid} is listed twice on GPU {proc.gpu}")
        seen.add((proc.pid, proc.gpu))
        procs.append(proc)
    return procs


def load_scenario(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a scenario YAML file into a dict (validated when a SimulatedBackend is built from it)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise ScenarioError(f"{p}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{p}: the top level must be a mapping with a 'gpus' list, got {type(data).__name__}")
    return data


def _starttime(proc_root: Path, pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat; None when the process is gone."""
    try:
        text = (proc_root / str(pid) / "stat").read_text()
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------- the backend


class SimulatedBackend:
    """GpuBackend over a scenario. ``start_time``: origin of the utilisation timeline (default: the first sample)."""

    def __init__(
        self,
        scenario: Mapping[str, Any] | None = None,
        *,
        source: str = "<scenario>",
        proc_root: str | os.PathLike[str] = "/proc",
        start_time: float | None = None,
    ) -> None:
        data = _mapping(DEFAULT_SCENARIO if scenario is None else scenario, "", source, _TOP_KEYS)
        self._gpus = _parse_gpus(data.get("gpus"), source)
        self._drop_dead = data.get("drop_dead_pids", True)
        if not isinstance(self._drop_dead, bool):
            raise _fail(source, "drop_dead_pids", f"must be true or false, got {self._drop_dead!r}")
        self._proc_root = Path(proc_root)
        self._processes = {(p.pid, p.gpu): p for p in _parse_processes(data.get("processes"), self._gpus, source)}
        for p in self._processes.values():
            p.starttime = _starttime(self._proc_root, p.pid)
        self._start_time = start_time
        self._lock = threading.Lock()
        self._errors: dict[tuple[str, str], int] = {}
        self._closed = False
        self._devices = tuple(
            GpuDevice(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                mig_mode=bool(g.mig_devices),
                memory_total_bytes=g.memory_total,
            )
            for g in self._gpus
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> SimulatedBackend:
        """Build from a scenario YAML file; errors name the file and the key."""
        return cls(load_scenario(path), source=str(path), **kwargs)

    # ------------------------------------------------------------------ runtime API (thread-safe)

    def set_utilization(self, gpu: int | str, ratio: float | None) -> None:
        """From now on ``gpu`` reports ``ratio`` (None: unknown), whatever the scenario's timeline says."""
        with self._lock:
            g = self._gpus[_gpu_index(gpu, self._gpus, "gpu", "set_utilization")]
            g.override = _ratio(ratio, "ratio", "set_utilization")

    def add_process(
        self, gpu: int | str, pid: int, memory_bytes: int | None, sm_utilization: float | None = None
    ) -> None:
        """Put a compute process on ``gpu`` (replacing the same PID there)."""
        with self._lock:
            index = _gpu_index(gpu, self._gpus, "gpu", "add_process")
            proc = _Process(
                pid=_pid(pid, "pid", "add_process"),
                gpu=index,
                memory_bytes=_byte_count(memory_bytes, "memory_bytes", "add_process", nullable=True),
                sm_utilization=_ratio(sm_utilization, "sm_utilization", "add_process"),
                starttime=_starttime(self._proc_root, pid),
            )
            self._processes[(proc.pid, index)] = proc

    def remove_process(self, pid: int) -> None:
        """Take ``pid`` off every GPU (no error when it is not there)."""
        with self._lock:
            for key in [k for k in self._processes if k[0] == pid]:
                del self._processes[key]

    def set_lost(self, gpu: int | str, lost: bool) -> None:
        """Make ``gpu`` report GPU_IS_LOST (up=False, nothing known) until set back."""
        with self._lock:
            self._gpus[_gpu_index(gpu, self._gpus, "gpu", "set_lost")].lost = bool(lost)

    # ------------------------------------------------------------------ GpuBackend

    def devices(self) -> tuple[GpuDevice, ...]:
        return self._devices

    def mig_parents(self) -> dict[str, str]:
        return {m: g.uuid for g in self._gpus for m in g.mig_devices}

    def error_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._errors)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def sample(self, now: float) -> list[GpuSample]:
        """One GpuSample per GPU at ``now``."""
        with self._lock:
            if self._start_time is None:
                self._start_time = now
            if self._drop_dead:
                self._drop_dead_processes()
            return [self._sample_gpu(g, now) for g in self._gpus]

    def _drop_dead_processes(self) -> None:
        for key, p in list(self._processes.items()):
            current = _starttime(self._proc_root, p.pid)
            if current is None or (p.starttime is not None and current != p.starttime):
                del self._processes[key]
                log.debug("simulated process gone", pid=p.pid, gpu=p.gpu)
            elif p.starttime is None:
                p.starttime = current

    def _count(self, code: str) -> None:
        self._errors[(UTILIZATION_FN, code)] = self._errors.get((UTILIZATION_FN, code), 0) + 1

    def _sample_gpu(self, g: _Gpu, now: float) -> GpuSample:
        if g.lost or self._closed:
            code = "GPU_IS_LOST" if g.lost else "UNINITIALIZED"
            self._count(code)
            return GpuSample(
                now,
                g.index,
                g.uuid,
                up=False,
                utilization=None,
                memory_used_bytes=None,
                memory_total_bytes=g.memory_total,
                processes=None,
                errors=(f"{UTILIZATION_FN}:{code}",),
            )
        errors: tuple[str, ...] = ()
        if g.mig_devices:  # NVML reports no utilisation on a MIG-enabled GPU
            utilization = None
            errors = (f"{UTILIZATION_FN}:NOT_SUPPORTED",)
            if not g.mig_error_counted:
                g.mig_error_counted = True
                self._count("NOT_SUPPORTED")
        elif g.override is not _UNSET:
            utilization = g.override
        else:
            utilization = self._timeline_value(g, now)
        procs = sorted((p for p in self._processes.values() if p.gpu == g.index), key=lambda p: p.pid)
        return GpuSample(
            timestamp=now,
            index=g.index,
            uuid=g.uuid,
            up=True,
            utilization=utilization,
            memory_used_bytes=g.memory_reserved + sum(p.memory_bytes or 0 for p in procs),
            memory_total_bytes=g.memory_total,
            processes=tuple(ProcessSample(p.pid, p.memory_bytes, p.sm_utilization) for p in procs),
            errors=errors,
        )

    def _timeline_value(self, g: _Gpu, now: float) -> float | None:
        offset = now - (self._start_time if self._start_time is not None else now)
        value = g.timeline[0][1]
        for at, ratio in g.timeline:
            if at > offset:
                break
            value = ratio
        return value
