"""The NVML backend: the only module that imports pynvml (package nvidia-ml-py).

What one tick reads per GPU, and what each failure turns into (unknown is ``None``, never 0):

- utilisation (``nvmlDeviceGetUtilizationRates``), memory (``nvmlDeviceGetMemoryInfo``; a used value of
  NVML_VALUE_NOT_AVAILABLE is ``None``), compute processes (``..._v3``, falling back to ``_v2`` and the
  unversioned v1 symbol when the library answers FUNCTION_NOT_FOUND, as old drivers do) and per-process SM
  utilisation (``nvmlDeviceGetProcessUtilization``).
- A fatal per-device error (GPU_IS_LOST, RESET_REQUIRED, ...) makes that GPU's sample ``up=False`` and stops
  reading it for this tick; the other GPUs go on.
- NOT_SUPPORTED gives ``None`` and that (GPU, function) is not called again for ``UNSUPPORTED_RETRY_SECONDS``
  (MIG-enabled GPUs never report utilisation); the sample still names it in ``errors`` each tick.
- Every NVML error is counted by (function, code name) for ``reclaimer_nvml_errors_total``.

Per-process SM utilisation: NVML hands out samples newer than a timestamp; the newest timestamp seen is carried
forward per GPU so each tick gets only new samples. A process with no new sample keeps its last value for at most
``SM_HOLD_SECONDS`` (NVML only samples processes that ran recently), then it is ``None``: never a made-up 0.

Devices, and MIG devices (for ``mig_parents()``), are enumerated once at ``open``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pynvml
import structlog

from reclaimer.core.errors import StartupError
from reclaimer.core.model import GpuDevice, GpuSample, ProcessSample

log = structlog.get_logger(__name__)

SONAME = "libnvidia-ml.so.1"
UNSUPPORTED_RETRY_SECONDS = 600.0  # a driver update or MIG change may add support; asking every 10 min is cheap
SM_HOLD_SECONDS = 10.0
VALUE_NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long
# Errors after which nothing more can be read from the device this tick.
FATAL_CODES = frozenset(
    {"GPU_IS_LOST", "RESET_REQUIRED", "GPU_NOT_FOUND", "UNINITIALIZED", "DRIVER_NOT_LOADED", "LIB_RM_VERSION_MISMATCH"}
)
UTILIZATION = "nvmlDeviceGetUtilizationRates"
MEMORY = "nvmlDeviceGetMemoryInfo"
PROCESS_UTILIZATION = "nvmlDeviceGetProcessUtilization"
PROCESS_SYMBOLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)

_CODE_NAMES: dict[int, str] = {
    value: name.removeprefix("NVML_ERROR_")
    for name, value in vars(pynvml).items()
    if name.startswith("NVML_ERROR_") and isinstance(value, int)
}
_CODE_NAMES[pynvml.NVML_SUCCESS] = "SUCCESS"

T = TypeVar("T")


class NvmlUnavailable(StartupError):
    """NVML cannot be used on this node. The message is one line naming the cause, fit for a CLI error."""


class _DeviceDown(Exception):
    """A fatal error on one GPU: stop reading it this tick."""


def code_name(value: int) -> str:
    """NVML return code -> its bounded name ("NOT_SUPPORTED"); codes this pynvml does not know are "UNKNOWN"."""
    return _CODE_NAMES.get(value, "UNKNOWN")


@dataclass(slots=True)
class _Device:
    """One GPU and what the sampler carries from tick to tick."""

    info: GpuDevice
    handle: Any
    last_seen_us: int = 0  # newest process-utilisation sample timestamp seen (microseconds)
    sm: dict[int, tuple[float, float]] = field(default_factory=dict)  # pid -> (ratio, when seen)
    unsupported: dict[str, float] = field(default_factory=dict)  # function -> when to ask again (NOT_SUPPORTED)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _preload(library_path: str) -> ctypes.CDLL:
    """Load the configured library so pynvml's dlopen of the soname finds it already loaded."""
    if not os.path.exists(library_path):
        raise NvmlUnavailable(
            f"NVML library {library_path} not found (gpu.library_path): check the path and that it is mounted "
            "into the container"
        )
    try:
        return ctypes.CDLL(library_path, mode=os.RTLD_GLOBAL)
    except OSError as exc:
        raise NvmlUnavailable(f"cannot load NVML library {library_path} (gpu.library_path): {_one_line(exc)}") from None


def _init_failure(exc: BaseException, library_path: str | None) -> NvmlUnavailable:
    if not isinstance(exc, pynvml.NVMLError):
        return NvmlUnavailable(f"NVML initialisation failed: {type(exc).__name__}: {_one_line(str(exc))}")
    code = code_name(exc.value)
    messages = {
        "LIBRARY_NOT_FOUND": (
            f"NVML library {library_path} (gpu.library_path) loaded but does not provide {SONAME}"
            if library_path
            else f"NVML library {SONAME} not found: is the NVIDIA driver installed and the library mounted "
            "into the container?"
        ),
        "DRIVER_NOT_LOADED": "NVIDIA driver not loaded: NVML found no kernel driver (is the nvidia kernel module "
        "loaded on this node?)",
        "NO_PERMISSION": "no permission to use NVML: the daemon cannot open /dev/nvidia* (run it with the NVIDIA "
        "container runtime or give it the device files)",
        "LIB_RM_VERSION_MISMATCH": "NVML library and NVIDIA kernel driver versions differ: the driver was updated "
        f"without a reboot, or the wrong {SONAME} is mounted",
    }
    return NvmlUnavailable(messages.get(code, f"NVML initialisation failed: {code}"))


class NvmlBackend:
    """GpuBackend over the real NVML library. Build with ``NvmlBackend.open()``."""

    def __init__(self, devices: list[_Device], mig_parents: dict[str, str], driver_version: str | None) -> None:
        self._devices = devices
        self._device_infos = tuple(d.info for d in devices)
        self._mig_parents = mig_parents
        self.driver_version = driver_version
        self._errors: dict[tuple[str, str], int] = {}
        self._errors_lock = threading.Lock()
        self._logged: set[tuple[str, str, str]] = set()
        self._process_level = 0  # index into PROCESS_SYMBOLS of the newest symbol this library has
        self._closed = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, library_path: str | None = None) -> NvmlBackend:
        """Initialise NVML and enumerate the GPUs (and their MIG devices).

        ``library_path`` is loaded first so that pynvml's ``dlopen("libnvidia-ml.so.1")`` resolves to it.
        Raises ``NvmlUnavailable`` with a one-line cause when NVML cannot be used.
        """
        preloaded = _preload(library_path) if library_path else None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml raises NVMLError, or its own errors on a mismatched library
            raise _init_failure(exc, library_path) from None
        backend: NvmlBackend | None = None
        try:
            if preloaded is not None and getattr(pynvml.nvmlLib, "_handle", None) != preloaded._handle:
                raise NvmlUnavailable(
                    f"NVML library {library_path} (gpu.library_path) was not used: another {SONAME} was already "
                    f"loaded in this process, or the file's soname is not {SONAME}"
                )
            try:
                count = pynvml.nvmlDeviceGetCount()
            except pynvml.NVMLError as exc:
                raise NvmlUnavailable(f"NVML cannot count the GPUs: {code_name(exc.value)}") from None
            backend = cls([], {}, _driver_version())
            backend._enumerate(count)
        except BaseException:
            _shutdown_quietly()
            raise
        log.info(
            "nvml opened",
            driver_version=backend.driver_version,
            gpus=len(backend._devices),
            mig_devices=len(backend._mig_parents),
            library=library_path or SONAME,
        )
        if count and not backend._devices:
            log.error("nvml: no GPU could be read", gpus_reported=count)
        elif not count:
            log.warning("nvml reports no GPUs on this node")
        return backend

    def _enumerate(self, count: int) -> None:
        for index in range(count):
            device = self._open_device(index)
            if device is None:
                continue
            self._devices.append(device)
            if device.info.mig_mode:
                self._mig_parents.update(self._mig_devices(device))
        self._device_infos = tuple(d.info for d in self._devices)

    def _open_device(self, index: int) -> _Device | None:
        """Read one GPU's identity; ``None`` (logged, counted) when it cannot even be named."""
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            self._skip_device(index, "nvmlDeviceGetHandleByIndex_v2", exc)
            return None
        try:
            uuid = pynvml.nvmlDeviceGetUUID(handle)
        except pynvml.NVMLError as exc:
            self._skip_device(index, "nvmlDeviceGetUUID", exc)
            return None
        model = self._at_open(uuid, "nvmlDeviceGetName", lambda: pynvml.nvmlDeviceGetName(handle)) or "unknown"
        mig = self._at_open(uuid, "nvmlDeviceGetMigMode", lambda: pynvml.nvmlDeviceGetMigMode(handle))
        memory = self._at_open(uuid, "nvmlDeviceGetMemoryInfo", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        info = GpuDevice(
            index=index,
            uuid=uuid,
            model=model,
            mig_mode=None if mig is None else bool(mig[0]),
            memory_total_bytes=None if memory is None else int(memory.total),
        )
        return _Device(info=info, handle=handle)

    def _skip_device(self, index: int, function: str, exc: pynvml.NVMLError) -> None:
        code = code_name(exc.value)
        self._count(function, code)
        log.error("nvml: GPU skipped, it cannot be identified", gpu=index, function=function, code=code)

    def _at_open(self, uuid: str, function: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except pynvml.NVMLError as exc:
            code = code_name(exc.value)
            if code != "NOT_SUPPORTED":
                self._count(function, code)
                log.warning("nvml call failed at open", uuid=uuid, function=function, code=code)
            return None

    def _mig_devices(self, parent: _Device) -> dict[str, str]:
        """MIG device uuid -> parent uuid for the populated slots of one MIG-enabled GPU."""
        handle = parent.handle
        slots = self._at_open(
            parent.info.uuid, "nvmlDeviceGetMaxMigDeviceCount", lambda: pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        )
        found: dict[str, str] = {}
        for slot in range(slots or 0):
            try:
                mig_handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except pynvml.NVMLError as exc:
                if code_name(exc.value) not in ("NOT_FOUND", "INVALID_ARGUMENT"):  # those mean: empty slot
                    self._count("nvmlDeviceGetMigDeviceHandleByIndex", code_name(exc.value))
                continue
            mig_uuid = self._at_open(
                parent.info.uuid,
                "nvmlDeviceGetUUID",
                lambda: pynvml.nvmlDeviceGetUUID(mig_handle),  # noqa: B023
            )
            if mig_uuid:
                found[mig_uuid] = parent.info.uuid
        return found

    # ------------------------------------------------------------------ GpuBackend

    def devices(self) -> tuple[GpuDevice, ...]:
        return self._device_infos

    def mig_parents(self) -> dict[str, str]:
        return dict(self._mig_parents)

    def error_counts(self) -> dict[tuple[str, str], int]:
        with self._errors_lock:
            return dict(self._errors)

    def close(self) -> None:
        """Shut NVML down (once); later samples report every GPU down."""
        if not self._closed:
            self._closed = True
            _shutdown_quietly()

    def sample(self, now: float) -> list[GpuSample]:
        """One GpuSample per device. Never raises: every failure becomes ``None`` values or ``up=False``."""
        return [self._sample_device(d, now) for d in self._devices]

    # ------------------------------------------------------------------ one device, one tick

    def _sample_device(self, dev: _Device, now: float) -> GpuSample:
        errors: list[str] = []
        info = dev.info
        handle = dev.handle
        processes: tuple[ProcessSample, ...] | None = None
        try:
            util = self._read(dev, UTILIZATION, now, errors, _read_utilization, handle)
            memory = self._read(dev, MEMORY, now, errors, _read_memory, handle)
            listed = self._read(dev, PROCESS_SYMBOLS[self._process_level], now, errors, self._list_processes, handle)
            if listed is not None:
                samples = self._read(dev, PROCESS_UTILIZATION, now, errors, _process_samples, handle, dev.last_seen_us)
                processes = self._with_sm(dev, listed, samples, now) if listed else self._no_processes(dev, samples)
        except _DeviceDown:
            dev.sm.clear()
            return GpuSample(
                now,
                info.index,
                info.uuid,
                up=False,
                utilization=None,
                memory_used_bytes=None,
                memory_total_bytes=info.memory_total_bytes,
                processes=None,
                errors=tuple(errors),
            )
        return GpuSample(
            timestamp=now,
            index=info.index,
            uuid=info.uuid,
            up=True,
            utilization=None if util is None else (util / 100.0 if util < 100 else 1.0),  # unsigned: never below 0
            memory_used_bytes=None if memory is None else _memory_value(memory.used),
            memory_total_bytes=info.memory_total_bytes if memory is None else memory.total,
            processes=processes,
            errors=tuple(errors) if errors else (),
        )

    def _read(
        self, dev: _Device, function: str, now: float, errors: list[str], reader: Callable[..., T], *args: Any
    ) -> T | None:
        """Run one NVML read for one device: ``None`` on any error (counted, noted); ``_DeviceDown`` when fatal."""
        unsupported = dev.unsupported
        if unsupported:  # rare: some read on this GPU answered NOT_SUPPORTED
            retry_at = unsupported.get(function)
            if retry_at is not None and now < retry_at:
                errors.append(f"{function}:NOT_SUPPORTED")
                return None
        try:
            result = reader(*args)
        except pynvml.NVMLError as exc:
            self._failed(dev, getattr(exc, "nvml_function", function), code_name(exc.value), now, errors)
            return None
        except Exception as exc:  # a pynvml or ctypes failure that is not an NVML code; still never escapes
            if (dev.info.uuid, function, type(exc).__name__) not in self._logged:
                self._logged.add((dev.info.uuid, function, type(exc).__name__))
                log.error("nvml call raised", uuid=dev.info.uuid, function=function, error=repr(exc), exc_info=exc)
            self._failed(dev, function, "UNKNOWN", now, errors)
            return None
        if unsupported:
            unsupported.pop(function, None)
        return result

    def _failed(self, dev: _Device, function: str, code: str, now: float, errors: list[str]) -> None:
        """Count and note one failed read; remember NOT_SUPPORTED; raise ``_DeviceDown`` when the GPU is gone."""
        self._count(function, code)
        errors.append(f"{function}:{code}")
        if (dev.info.uuid, function, code) not in self._logged:
            self._logged.add((dev.info.uuid, function, code))
            log.warning("nvml call failed", gpu=dev.info.index, uuid=dev.info.uuid, function=function, code=code)
        if code == "NOT_SUPPORTED":
            dev.unsupported[function] = now + UNSUPPORTED_RETRY_SECONDS
        if code in FATAL_CODES:
            raise _DeviceDown(code)

    def _count(self, function: str, code: str) -> None:
        with self._errors_lock:
            self._errors[(function, code)] = self._errors.get((function, code), 0) + 1

    def _list_processes(self, handle: Any) -> list[tuple[int, int | None]]:
        """(pid, used bytes or None) per compute process, stepping down to older symbols on FUNCTION_NOT_FOUND."""
        while True:
            symbol = PROCESS_SYMBOLS[self._process_level]
            try:
                return _read_processes(symbol, handle)
            except pynvml.NVMLError as exc:
                if exc.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND or self._process_level + 1 >= len(PROCESS_SYMBOLS):
                    exc.nvml_function = symbol
                    raise
                self._count(symbol, "FUNCTION_NOT_FOUND")
                self._process_level += 1
                log.info("nvml: older driver, falling back", missing=symbol, using=PROCESS_SYMBOLS[self._process_level])

    @staticmethod
    def _no_processes(dev: _Device, samples: list[tuple[int, int, int]] | None) -> tuple[()]:
        """The common idle-GPU case: only carry the newest sample timestamp forward; no PID keeps an SM value."""
        if samples:
            dev.last_seen_us = max(dev.last_seen_us, max(ts for _, ts, _ in samples))
        if dev.sm:
            dev.sm.clear()  # a PID gone from the list may come back as another process
        return ()

    @staticmethod
    def _with_sm(
        dev: _Device, processes: list[tuple[int, int | None]], samples: list[tuple[int, int, int]] | None, now: float
    ) -> tuple[ProcessSample, ...]:
        """ProcessSamples with each PID's SM ratio: from this tick's newest sample, else held, else ``None``."""
        sm = dev.sm
        if samples:
            newest: dict[int, int] = {}  # pid -> timestamp of the sample kept this tick (the first of equal ones)
            last_seen = dev.last_seen_us
            for pid, ts, util in samples:
                if ts > newest.get(pid, -1):
                    newest[pid] = ts
                    sm[pid] = (util / 100.0 if util < 100 else 1.0, now)  # unsigned: never below 0
                if ts > last_seen:
                    last_seen = ts
            dev.last_seen_us = last_seen
        if not sm:
            return tuple([ProcessSample(pid, used, None) for pid, used in processes])
        # Keep only PIDs still listed and seen recently: a PID gone from the list may come back as another process.
        kept: dict[int, tuple[float, float]] = {}
        out: list[ProcessSample] = []
        for pid, used in processes:
            held = sm.get(pid)
            if held is not None and now - held[1] <= SM_HOLD_SECONDS:
                kept[pid] = held
                out.append(ProcessSample(pid, used, held[0]))
            else:
                out.append(ProcessSample(pid, used, None))
        dev.sm = kept
        return tuple(out)


# ---------------------------------------------------------------------- NVML calls (plain ctypes)
#
# The tick calls the library through pynvml's function pointers with the plain structs below: pynvml's own
# structs run Python code on every field read and its process-list wrapper builds an object per process.
# Each struct mirrors NVML's C layout (tests compare them with pynvml's and the fake library's).


class _Utilization(ctypes.Structure):
    """nvmlUtilization_t (percent)."""

    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    """nvmlMemory_t (bytes), what the unversioned nvmlDeviceGetMemoryInfo fills."""

    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessInfoV1(ctypes.Structure):
    """nvmlProcessInfo_v1_t: the unversioned nvmlDeviceGetComputeRunningProcesses."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class _ProcessInfo(ctypes.Structure):
    """nvmlProcessInfo_v2_t, which ``_v2`` and ``_v3`` both fill (pynvml: c_nvmlProcessInfo_v2_t = _v3_t)."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _ProcessUtilizationSample(ctypes.Structure):
    """nvmlProcessUtilizationSample_t."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("timeStamp", ctypes.c_ulonglong),
        ("smUtil", ctypes.c_uint),
        ("memUtil", ctypes.c_uint),
        ("encUtil", ctypes.c_uint),
        ("decUtil", ctypes.c_uint),
    ]


PROCESS_LAYOUTS: dict[str, type[ctypes.Structure]] = {
    "nvmlDeviceGetComputeRunningProcesses_v3": _ProcessInfo,
    "nvmlDeviceGetComputeRunningProcesses_v2": _ProcessInfo,
    "nvmlDeviceGetComputeRunningProcesses": _ProcessInfoV1,
}


def _memory_value(value: int | None) -> int | None:
    return None if value is None or value == VALUE_NOT_AVAILABLE else int(value)


def _read_utilization(handle: Any) -> int:
    """GPU utilisation in percent (nvmlDeviceGetUtilizationRates)."""
    util = _Utilization()
    ret = pynvml._nvmlGetFunctionPointer(UTILIZATION)(handle, ctypes.byref(util))
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)
    return util.gpu


def _read_memory(handle: Any) -> _Memory:
    """Total, free and used bytes (nvmlDeviceGetMemoryInfo); ``used`` may be NVML_VALUE_NOT_AVAILABLE."""
    memory = _Memory()
    ret = pynvml._nvmlGetFunctionPointer(MEMORY)(handle, ctypes.byref(memory))
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)
    return memory


def _read_processes(symbol: str, handle: Any) -> list[tuple[int, int | None]]:
    """(pid, used bytes or None) from one process-list symbol with NVML's size-query convention: count 0 first
    (SUCCESS: no processes), then an array with room for processes started between the two calls."""
    fn = pynvml._nvmlGetFunctionPointer(symbol)  # cached by pynvml; raises FUNCTION_NOT_FOUND when the library lacks it
    count = ctypes.c_uint(0)
    ret = fn(handle, ctypes.byref(count), None)
    if ret == pynvml.NVML_SUCCESS:
        return []
    if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(ret)
    count.value = count.value * 2 + 5
    infos = (PROCESS_LAYOUTS[symbol] * count.value)()
    ret = fn(handle, ctypes.byref(count), infos)
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)
    return [(p.pid, None if (used := p.usedGpuMemory) == VALUE_NOT_AVAILABLE else used) for p in infos[: count.value]]


def _process_samples(handle: Any, last_seen_us: int) -> list[tuple[int, int, int]]:
    """(pid, timestamp µs, SM %) of the samples newer than ``last_seen_us``, with NVML's size-query convention;
    "none since then" (NOT_FOUND, or SUCCESS with 0) is an empty list."""
    fn = pynvml._nvmlGetFunctionPointer(PROCESS_UTILIZATION)
    count = ctypes.c_uint(0)
    since = ctypes.c_ulonglong(last_seen_us)
    ret = fn(handle, None, ctypes.byref(count), since)
    if ret in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_SUCCESS):
        return []
    if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(ret)
    samples = (_ProcessUtilizationSample * count.value)()
    ret = fn(handle, samples, ctypes.byref(count), since)
    if ret == pynvml.NVML_ERROR_NOT_FOUND:  # the samples aged out between the two calls
        return []
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)
    return [(s.pid, s.timeStamp, s.smUtil) for s in samples[: count.value]]


def _driver_version() -> str | None:
    try:
        return str(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError:
        return None


def _shutdown_quietly() -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception as exc:  # shutting down must not turn into a crash on the way out
        log.warning("nvml shutdown failed", error=repr(exc))
