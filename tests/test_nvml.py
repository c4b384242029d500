"""NvmlBackend against the fake libnvidia-ml.so.1 through the real pynvml (and, with a GPU, the real driver)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pynvml
import pytest

from reclaimer.observe.nvml import (
    SM_HOLD_SECONDS,
    UNSUPPORTED_RETRY_SECONDS,
    NvmlBackend,
    NvmlUnavailable,
    _Memory,
    _ProcessInfo,
    _ProcessInfoV1,
    _ProcessUtilizationSample,
    _Utilization,
    code_name,
)
from tests.support.e2e import e2e_fixture
from tests.support.nvml_fixtures import (
    GIB,
    SOURCE,
    FakeDelay,
    FakeError,
    FakeGpu,
    FakeNvml,
    FakeProcess,
    FakeSample,
    gpu_uuid,
    mig_uuid,
    run_probe,
)

OpenNvml = Callable[..., NvmlBackend]


@pytest.fixture
def open_nvml(fake_nvml: FakeNvml) -> Iterator[OpenNvml]:
    """Write a node state (FakeNvml.write keywords) and open an NvmlBackend on it, preloading the fake library."""
    opened: list[NvmlBackend] = []

    def _open(**state: Any) -> NvmlBackend:
        if state:
            fake_nvml.write(**state)
        backend = NvmlBackend.open(library_path=str(fake_nvml.lib_path))
        opened.append(backend)
        return backend

    yield _open
    for backend in opened:
        backend.close()


def three_gpus(**overrides: Any) -> list[FakeGpu]:
    return [FakeGpu(uuid=gpu_uuid(i), util=10 * (i + 1), **overrides) for i in range(3)]


def calls_to(fake: FakeNvml, function: str, device: str) -> int:
    return sum(1 for fn, dev in fake.calls() if fn == function and dev == device)


# ---------------------------------------------------------------------- opening


def test_open_enumerates_devices_through_the_preloaded_library(open_nvml: OpenNvml) -> None:
    backend = open_nvml(
        gpus=[
            FakeGpu(uuid=gpu_uuid(0), name="NVIDIA H100 80GB HBM3", memory_total=80 * GIB),
            FakeGpu(uuid=gpu_uuid(1), name="NVIDIA A100-SXM4-40GB", memory_total=40 * GIB, mig=True),
            FakeGpu(uuid=gpu_uuid(2), name="Tesla T4", memory_total=16 * GIB, mig=None),
        ],
        driver_version="550.54.15",
    )
    assert [(d.index, d.uuid, d.model, d.mig_mode, d.memory_total_bytes) for d in backend.devices()] == [
        (0, gpu_uuid(0), "NVIDIA H100 80GB HBM3", False, 80 * GIB),
        (1, gpu_uuid(1), "NVIDIA A100-SXM4-40GB", True, 40 * GIB),
        (2, gpu_uuid(2), "Tesla T4", None, 16 * GIB),  # NOT_SUPPORTED mig mode: unknown, not False
    ]
    assert backend.driver_version == "550.54.15"
    assert backend.error_counts() == {}  # NOT_SUPPORTED mig mode at open is expected, not an error


def test_gpu_that_cannot_be_identified_at_open_is_skipped_and_counted(open_nvml: OpenNvml) -> None:
    backend = open_nvml(gpus=[FakeGpu(uuid=gpu_uuid(0)), FakeGpu(uuid=gpu_uuid(1), lost=True),
                              FakeGpu(uuid=gpu_uuid(2))])
    assert [d.uuid for d in backend.devices()] == [gpu_uuid(0), gpu_uuid(2)]
    assert backend.error_counts() == {("nvmlDeviceGetHandleByIndex_v2", "GPU_IS_LOST"): 1}


def test_mig_devices_map_to_their_parent_and_empty_slots_are_skipped(open_nvml: OpenNvml) -> None:
    backend = open_nvml(
        gpus=[
            FakeGpu(uuid=gpu_uuid(0)),
            FakeGpu(uuid=gpu_uuid(1), mig_devices=[mig_uuid(1, 0), mig_uuid(1, 1), mig_uuid(1, 2)]),
        ]
    )
    assert backend.mig_parents() == {mig_uuid(1, s): gpu_uuid(1) for s in range(3)}
    gpu0, gpu1 = backend.sample(1.0)
    assert gpu0.utilization == 0.0
    assert gpu1.up and gpu1.utilization is None  # MIG: NOT_SUPPORTED is unknown, never idle
    assert "nvmlDeviceGetUtilizationRates:NOT_SUPPORTED" in gpu1.errors
    # slots 3..6 of 7 are empty (NOT_FOUND): that is how NVML says "no MIG device here", not an error
    assert not any(fn == "nvmlDeviceGetMigDeviceHandleByIndex" for fn, _ in backend.error_counts())


@pytest.mark.parametrize(
    ("state", "library_path", "expected"),
    [
        pytest.param({}, "missing-dir", "NVML library libnvidia-ml.so.1 not found: is the NVIDIA driver installed",
                     id="no-library"),
        pytest.param({}, "/nonexistent/libnvidia-ml.so.1",
                     "/nonexistent/libnvidia-ml.so.1 not found (gpu.library_path)", id="library-path-missing"),
        pytest.param({}, "not-a-library", "cannot load NVML library", id="library-path-not-a-library"),
        pytest.param({"errors": [FakeError("nvmlInitWithFlags", "DRIVER_NOT_LOADED")]}, None,
                     "NVIDIA driver not loaded", id="driver-not-loaded"),
        pytest.param({"errors": [FakeError("nvmlInitWithFlags", "NO_PERMISSION")]}, None,
                     "no permission to use NVML", id="no-permission"),
        pytest.param({"errors": [FakeError("nvmlInitWithFlags", "LIB_RM_VERSION_MISMATCH")]}, None,
                     "versions differ", id="version-mismatch"),
        pytest.param({"errors": [FakeError("nvmlInitWithFlags", 42)]}, None, "NVML initialisation failed: UNKNOWN",
                     id="unknown-code"),
        pytest.param({"errors": [FakeError("nvmlDeviceGetCount_v2", "UNKNOWN")]}, None,
                     "NVML cannot count the GPUs: UNKNOWN", id="count-fails"),
    ],
)
@pytest.mark.e2e
def test_unusable_nvml_is_a_one_line_error_naming_the_cause(
    fake_nvml: FakeNvml, tmp_path: Any, state: dict[str, Any], library_path: str | None, expected: str
) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0))], **state)
    env = fake_nvml.env()
    if library_path == "missing-dir":
        env["LD_LIBRARY_PATH"] = str(tmp_path / "empty")
        library_path = None
    elif library_path == "not-a-library":
        library_path = str(tmp_path / "libnvidia-ml.so.1")
        (tmp_path / "libnvidia-ml.so.1").write_text("not an ELF file\n")
    result = run_probe(env, library_path=library_path)
    assert result["ok"] is False and result["error_type"] == "NvmlUnavailable"
    assert expected in result["message"]
    assert "\n" not in result["message"] and "Traceback" not in result["message"]


@pytest.mark.e2e
def test_library_path_is_what_pynvml_loads_in_a_fresh_process(fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(7))])
    env = fake_nvml.env()
    env["LD_LIBRARY_PATH"] = ""  # only the preload can make pynvml's dlopen("libnvidia-ml.so.1") succeed
    result = run_probe(env, library_path=str(fake_nvml.library("v1_only")))
    assert result["ok"], result
    assert [d[1] for d in result["devices"]] == [gpu_uuid(7)]
    # the variant without _v3/_v2 answered: the preloaded file, not some other libnvidia-ml.so.1, was used
    assert ["nvmlDeviceGetComputeRunningProcesses_v3", "FUNCTION_NOT_FOUND", 1] in result["error_counts"]


def test_library_path_that_cannot_take_effect_is_an_error(fake_nvml: FakeNvml, open_nvml: OpenNvml) -> None:
    open_nvml(gpus=[FakeGpu(uuid=gpu_uuid(0))]).close()  # pynvml now holds the "full" build for this process
    with pytest.raises(NvmlUnavailable, match="was not used") as err:
        NvmlBackend.open(library_path=str(fake_nvml.library("no_v3")))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- sampling


def test_sample_reads_utilisation_memory_and_processes(open_nvml: OpenNvml) -> None:
    backend = open_nvml(
        gpus=[FakeGpu(uuid=gpu_uuid(0), util=37, memory_total=80 * GIB), FakeGpu(uuid=gpu_uuid(1), memory_used="NA")],
        processes=[FakeProcess(pid=4242, gpu=0, memory=3 * GIB), FakeProcess(pid=4343, gpu=0, memory=None),
                   FakeProcess(pid=5000, gpu=1, memory=GIB)],
    )
    gpu0, gpu1 = backend.sample(123.0)
    assert (gpu0.timestamp, gpu0.index, gpu0.uuid, gpu0.up) == (123.0, 0, gpu_uuid(0), True)
    assert gpu0.utilization == pytest.approx(0.37)
    assert (gpu0.memory_used_bytes, gpu0.memory_total_bytes) == (3 * GIB, 80 * GIB)
    assert [(p.pid, p.used_memory_bytes) for p in gpu0.processes or ()] == [(4242, 3 * GIB), (4343, None)]
    assert gpu0.errors == ()
    assert gpu1.memory_used_bytes is None  # NVML_VALUE_NOT_AVAILABLE is unknown, not a huge number
    assert backend.error_counts() == {}


@pytest.mark.parametrize("count", [pytest.param(0, id="none"), pytest.param(1, id="one"),
                                   pytest.param(150, id="many")])
def test_process_list_follows_the_size_query_convention(open_nvml: OpenNvml, count: int) -> None:
    backend = open_nvml(gpus=[FakeGpu(uuid=gpu_uuid(0))],
                        processes=[FakeProcess(pid=1000 + i, gpu=0, memory=i) for i in range(count)])
    (gpu0,) = backend.sample(1.0)
    assert gpu0.processes is not None
    assert [(p.pid, p.used_memory_bytes) for p in gpu0.processes] == [(1000 + i, i) for i in range(count)]


@pytest.mark.parametrize("variant", [pytest.param("no_v3", id="no-v3-symbol"), pytest.param("v1_only", id="v1-only")])
@pytest.mark.e2e
def test_old_drivers_fall_back_to_older_process_symbols_once(fake_nvml: FakeNvml, variant: str) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0))],
                    processes=[FakeProcess(pid=77, gpu=0, memory=5 * GIB), FakeProcess(pid=78, gpu=0, memory=None)])
    result = run_probe(fake_nvml.env(variant), ticks=3)
    assert result["ok"], result
    for tick in result["samples"]:
        assert tick[0]["processes"] == [[77, 5 * GIB, None], [78, None, None]]
        assert tick[0]["errors"] == []
    missing = {"no_v3": ["nvmlDeviceGetComputeRunningProcesses_v3"],
               "v1_only": ["nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"]}
    assert result["error_counts"] == sorted([[fn, "FUNCTION_NOT_FOUND", 1] for fn in missing[variant]])
    calls = [fn for fn, _ in fake_nvml.calls() if fn.startswith("nvmlDeviceGetComputeRunningProcesses")]
    expected = {"no_v3": "nvmlDeviceGetComputeRunningProcesses_v2", "v1_only": "nvmlDeviceGetComputeRunningProcesses"}
    assert calls and set(calls) == {expected[variant]}


@pytest.mark.parametrize("variant", [pytest.param("full", id="v3"), pytest.param("no_v3", id="v2"),
                                     pytest.param("v1_only", id="v1")])
@pytest.mark.e2e
def test_every_process_struct_layout_reads_a_long_list(fake_nvml: FakeNvml, variant: str) -> None:
    """A wrong struct size would shift every entry after the first: 150 processes make that visible."""
    procs = [FakeProcess(pid=3000 + i, gpu=i % 2, memory=None if i % 5 == 0 else (i + 1) * GIB) for i in range(150)]
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0)), FakeGpu(uuid=gpu_uuid(1))], processes=procs)
    result = run_probe(fake_nvml.env(variant))
    assert result["ok"], result
    for gpu, sample in enumerate(result["samples"][0]):
        assert sample["processes"] == [[p.pid, p.memory, None] for p in procs if p.gpu == gpu]
        assert sample["errors"] == []


# What one tick reads: (pynvml struct, None where pynvml has none; ours; the fake library's typedef). NVML fixes them.
STRUCTS = [
    pytest.param("c_nvmlUtilization_t", _Utilization, "nvmlUtilization_t", id="utilization"),
    pytest.param("c_nvmlMemory_t", _Memory, "nvmlMemory_t", id="memory"),
    pytest.param(None, _ProcessInfoV1, "nvmlProcessInfo_v1_t", id="process-info-v1"),
    pytest.param("c_nvmlProcessInfo_v2_t", _ProcessInfo, "nvmlProcessInfo_v2_t", id="process-info-v2"),
    pytest.param("c_nvmlProcessInfo_v3_t", _ProcessInfo, "nvmlProcessInfo_v2_t", id="process-info-v3"),
    pytest.param("c_nvmlProcessUtilizationSample_t", _ProcessUtilizationSample, "nvmlProcessUtilizationSample_t",
                 id="process-utilization-sample"),
]


def layout(struct: type[ctypes.Structure]) -> dict[str, Any]:
    """sizeof and (name, offset, size) of every field: what must agree with the C side."""
    fields = [getattr(struct, name) for name, *_ in struct._fields_]
    return {"sizeof": ctypes.sizeof(struct),
            "fields": [[name, f.offset, f.size] for (name, *_), f in zip(struct._fields_, fields, strict=True)]}


@pytest.fixture(scope="module")
@e2e_fixture
def c_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """sizeof and per-field offset/size of the fake library's own typedefs, as gcc lays them out here."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "gcc is needed to build the fake NVML"
    lines = []
    for param in STRUCTS:
        _, ours, c_name = param.values
        names = [name for name, *_ in ours._fields_]
        values = "".join(f", offsetof({c_name}, {f}), sizeof((({c_name} *)0)->{f})" for f in names)
        lines.append(f'    printf("{c_name} %zu{" %zu %zu" * len(names)}\\n", sizeof({c_name}){values});')
    workdir = tmp_path_factory.mktemp("layout")
    (workdir / "layout.c").write_text(f'#include <stddef.h>\n#include "{SOURCE}"\nint main(void) {{\n'
                                      + "\n".join(lines) + "\n    return 0;\n}\n")
    built = subprocess.run([gcc, "-o", str(workdir / "layout"), str(workdir / "layout.c"), "-lpthread"],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    out = subprocess.run([str(workdir / "layout")], check=True, capture_output=True, text=True).stdout
    layouts: dict[str, dict[str, Any]] = {}
    for param, line in zip(STRUCTS, out.splitlines(), strict=True):
        _, ours, c_name = param.values
        c_type, size, *numbers = line.split()
        assert c_type == c_name
        names = [name for name, *_ in ours._fields_]
        layouts[c_name] = {"sizeof": int(size), "fields": [[f, int(numbers[2 * i]), int(numbers[2 * i + 1])]
                                                           for i, f in enumerate(names)]}
    return layouts


@pytest.mark.parametrize(("pynvml_name", "ours", "c_name"), STRUCTS)
def test_ctypes_structs_match_pynvml_and_the_c_layout(
    c_layouts: dict[str, Any], pynvml_name: str | None, ours: type[ctypes.Structure], c_name: str
) -> None:
    if pynvml_name is not None:
        assert layout(ours) == layout(getattr(pynvml, pynvml_name))
        assert [t for _, t in ours._fields_] == [t for _, t in getattr(pynvml, pynvml_name)._fields_]
    assert layout(ours) == c_layouts[c_name]


# ---------------------------------------------------------------------- per-process SM utilisation


def test_process_utilisation_carries_the_last_seen_timestamp_forward(fake_nvml: FakeNvml, open_nvml: OpenNvml) -> None:
    gpus = [FakeGpu(uuid=gpu_uuid(0))]
    procs = [FakeProcess(pid=10, gpu=0), FakeProcess(pid=11, gpu=0)]
    backend = open_nvml(gpus=gpus, processes=procs,
                        samples=[FakeSample(0, 10, 1_000, sm=20), FakeSample(0, 10, 2_000, sm=70)])

    def sm_at(now: float) -> dict[int, float | None]:
        (gpu0,) = backend.sample(now)
        assert gpu0.errors == ()
        return {p.pid: p.sm_utilization for p in gpu0.processes or ()}

    assert sm_at(100.0) == {10: pytest.approx(0.7), 11: None}  # newest of the two samples wins; 11 has none yet
    # a sample older than the newest seen (2000) is not handed out again: the timestamp was carried forward
    fake_nvml.write(gpus=gpus, processes=procs,
                    samples=[FakeSample(0, 10, 1_500, sm=99), FakeSample(0, 11, 3_000, sm=5)])
    assert sm_at(101.0) == {10: pytest.approx(0.7), 11: pytest.approx(0.05)}
    # no new samples: last values are held ...
    assert sm_at(100.0 + SM_HOLD_SECONDS) == {10: pytest.approx(0.7), 11: pytest.approx(0.05)}
    # ... for at most SM_HOLD_SECONDS, then unknown (never a made-up 0)
    assert sm_at(100.5 + SM_HOLD_SECONDS) == {10: None, 11: pytest.approx(0.05)}
    assert sm_at(102.0 + 2 * SM_HOLD_SECONDS) == {10: None, 11: None}


def test_a_pid_that_left_the_process_list_does_not_inherit_its_old_sm_value(
    fake_nvml: FakeNvml, open_nvml: OpenNvml
) -> None:
    gpus = [FakeGpu(uuid=gpu_uuid(0))]
    backend = open_nvml(gpus=gpus, processes=[FakeProcess(pid=10, gpu=0)], samples=[FakeSample(0, 10, 1_000, sm=90)])
    assert [(p.pid, p.sm_utilization) for p in backend.sample(1.0)[0].processes or ()] == [(10, pytest.approx(0.9))]
    fake_nvml.write(gpus=gpus, processes=[])
    assert backend.sample(2.0)[0].processes == ()
    fake_nvml.write(gpus=gpus, processes=[FakeProcess(pid=10, gpu=0)])  # PID reused by a new process
    (gpu0,) = backend.sample(3.0)
    assert [(p.pid, p.sm_utilization) for p in gpu0.processes or ()] == [(10, None)]


def test_a_gpu_without_processes_still_carries_the_sample_timestamp_forward(
    fake_nvml: FakeNvml, open_nvml: OpenNvml
) -> None:
    gpus = [FakeGpu(uuid=gpu_uuid(0))]
    backend = open_nvml(gpus=gpus, processes=[], samples=[FakeSample(0, 10, 5_000, sm=80)])
    (gpu0,) = backend.sample(1.0)
    assert (gpu0.processes, gpu0.errors) == ((), ())
    # a sample older than one seen while the GPU had no process is not handed out again
    fake_nvml.write(gpus=gpus, processes=[FakeProcess(pid=10, gpu=0)], samples=[FakeSample(0, 10, 4_000, sm=60)])
    assert [(p.pid, p.sm_utilization) for p in backend.sample(2.0)[0].processes or ()] == [(10, None)]
    fake_nvml.write(gpus=gpus, processes=[FakeProcess(pid=10, gpu=0)], samples=[FakeSample(0, 10, 6_000, sm=60)])
    assert [(p.pid, p.sm_utilization) for p in backend.sample(3.0)[0].processes or ()] == [(10, pytest.approx(0.6))]


@pytest.mark.parametrize("empty", [pytest.param("not_found", id="not-found"), pytest.param("success", id="success-0")])
def test_no_new_process_samples_is_not_an_error(open_nvml: OpenNvml, empty: str) -> None:
    backend = open_nvml(gpus=[FakeGpu(uuid=gpu_uuid(0))], processes=[FakeProcess(pid=10, gpu=0)],
                        empty_process_util=empty)
    for now in (1.0, 2.0, 3.0):
        (gpu0,) = backend.sample(now)
        assert gpu0.errors == ()
        assert [(p.pid, p.sm_utilization) for p in gpu0.processes or ()] == [(10, None)]
    assert backend.error_counts() == {}


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("code", [pytest.param("GPU_IS_LOST", id="lost"), pytest.param("RESET_REQUIRED", id="reset")])
def test_a_lost_gpu_is_down_while_the_others_go_on(fake_nvml: FakeNvml, open_nvml: OpenNvml, code: str) -> None:
    backend = open_nvml(gpus=three_gpus(), processes=[FakeProcess(pid=9, gpu=g) for g in range(3)])
    fake_nvml.write(gpus=three_gpus(), processes=[FakeProcess(pid=9, gpu=g) for g in range(3)],
                    errors=[FakeError("*", code, gpu=1)])
    gpu0, gpu1, gpu2 = backend.sample(5.0)
    assert (gpu0.up, gpu0.utilization) == (True, pytest.approx(0.1))
    assert (gpu2.up, gpu2.utilization) == (True, pytest.approx(0.3))
    assert gpu1.up is False
    assert (gpu1.utilization, gpu1.memory_used_bytes, gpu1.processes) == (None, None, None)
    assert gpu1.errors == (f"nvmlDeviceGetUtilizationRates:{code}",)  # nothing more is asked of a lost GPU
    assert backend.error_counts() == {("nvmlDeviceGetUtilizationRates", code): 1}
    fake_nvml.write(gpus=three_gpus(), processes=[FakeProcess(pid=9, gpu=g) for g in range(3)])
    assert [s.up for s in backend.sample(6.0)] == [True, True, True]  # a GPU that comes back is read again


def test_a_gpu_lost_in_the_middle_of_a_tick_is_down(fake_nvml: FakeNvml, open_nvml: OpenNvml) -> None:
    backend = open_nvml(gpus=three_gpus(), processes=[FakeProcess(pid=9, gpu=0)])
    fake_nvml.write(gpus=three_gpus(), processes=[FakeProcess(pid=9, gpu=0)],
                    errors=[FakeError("nvmlDeviceGetComputeRunningProcesses_v3", "GPU_IS_LOST", gpu=0)])
    gpu0, gpu1, _ = backend.sample(1.0)
    assert (gpu0.up, gpu0.utilization, gpu0.processes) == (False, None, None)
    assert gpu1.up


@pytest.mark.parametrize(
    ("function", "code", "unknown"),
    [
        pytest.param("nvmlDeviceGetUtilizationRates", "UNKNOWN", "utilization", id="util-unknown"),
        pytest.param("nvmlDeviceGetUtilizationRates", 77, "utilization", id="util-unlisted-code"),
        pytest.param("nvmlDeviceGetMemoryInfo", "TIMEOUT", "memory_used_bytes", id="memory-timeout"),
        pytest.param("nvmlDeviceGetComputeRunningProcesses_v3", "NO_PERMISSION", "processes", id="processes-denied"),
        pytest.param("nvmlDeviceGetProcessUtilization", "UNKNOWN", "sm_utilization", id="process-util-unknown"),
    ],
)
def test_a_failing_call_makes_its_value_unknown_and_is_counted(
    fake_nvml: FakeNvml, open_nvml: OpenNvml, function: str, code: str | int, unknown: str
) -> None:
    state: dict[str, Any] = {"gpus": three_gpus(), "processes": [FakeProcess(pid=9, gpu=0)],
                             "samples": [FakeSample(0, 9, 1_000, sm=40)]}
    backend = open_nvml(**state)
    fake_nvml.write(**state, errors=[FakeError(function, code, gpu=0)])
    gpu0, gpu1, _ = backend.sample(1.0)
    name = code if isinstance(code, str) else "UNKNOWN"
    assert gpu0.up and gpu1.up and gpu1.utilization is not None
    assert gpu0.errors == (f"{function}:{name}",)
    assert backend.error_counts() == {(function, name): 1}
    if unknown == "sm_utilization":
        assert [p.sm_utilization for p in gpu0.processes or ()] == [None]
    else:
        assert getattr(gpu0, unknown) is None
    known = {"utilization", "memory_used_bytes", "processes"} - {unknown}
    assert all(getattr(gpu0, f) is not None for f in known)


def test_not_supported_is_remembered_and_retried_rarely(fake_nvml: FakeNvml, open_nvml: OpenNvml) -> None:
    gpus = three_gpus()[:2]
    backend = open_nvml(gpus=gpus)
    fake_nvml.write(gpus=gpus, errors=[FakeError("nvmlDeviceGetMemoryInfo", "NOT_SUPPORTED", gpu=0)])
    fake_nvml.clear_calls()
    for now in (10.0, 11.0, 12.0, 13.0):
        gpu0, gpu1 = backend.sample(now)
        assert gpu0.memory_used_bytes is None and gpu0.errors == ("nvmlDeviceGetMemoryInfo:NOT_SUPPORTED",)
        assert gpu1.memory_used_bytes == 0
    assert calls_to(fake_nvml, "nvmlDeviceGetMemoryInfo", "0") == 1  # asked once, then remembered
    assert calls_to(fake_nvml, "nvmlDeviceGetMemoryInfo", "1") == 4
    assert backend.error_counts() == {("nvmlDeviceGetMemoryInfo", "NOT_SUPPORTED"): 1}
    fake_nvml.write(gpus=gpus)  # e.g. a driver update added support
    gpu0, _ = backend.sample(10.0 + UNSUPPORTED_RETRY_SECONDS)
    assert gpu0.memory_used_bytes == 0 and gpu0.errors == ()
    assert calls_to(fake_nvml, "nvmlDeviceGetMemoryInfo", "0") == 2


def test_sample_after_close_reports_every_gpu_down_without_raising(open_nvml: OpenNvml) -> None:
    backend = open_nvml(gpus=three_gpus())
    backend.close()
    backend.close()
    samples = backend.sample(1.0)
    assert [s.up for s in samples] == [False, False, False]
    assert backend.error_counts() == {("nvmlDeviceGetUtilizationRates", "UNINITIALIZED"): 3}


def test_a_config_the_fake_cannot_parse_fails_loudly(fake_nvml: FakeNvml) -> None:
    fake_nvml.config_path.write_text("gpu uuid=GPU-x memroy_total=1\n")  # typo: the fake must not guess
    with pytest.raises(NvmlUnavailable, match="NVML initialisation failed: UNKNOWN"):
        NvmlBackend.open(library_path=str(fake_nvml.lib_path))


def test_code_names_are_a_bounded_set() -> None:
    assert code_name(3) == "NOT_SUPPORTED"
    assert code_name(15) == "GPU_IS_LOST"
    assert code_name(123456) == "UNKNOWN"


def test_a_slow_nvml_call_blocks_only_its_caller(fake_nvml: FakeNvml, open_nvml: OpenNvml) -> None:
    """The delay knob other tests use to wedge NVML: it holds the call until the delay is written away."""
    backend = open_nvml(gpus=three_gpus())
    fake_nvml.write(gpus=three_gpus(), delays=[FakeDelay("nvmlDeviceGetUtilizationRates", ms=600_000, gpu=1)])
    fake_nvml.clear_calls()
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(backend.sample(1.0)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while calls_to(fake_nvml, "nvmlDeviceGetUtilizationRates", "1") == 0:
        assert worker.is_alive() and time.monotonic() < deadline, "the delayed call never started"
    assert out == [] and worker.is_alive()
    fake_nvml.write(gpus=three_gpus())
    worker.join(timeout=30)
    assert not worker.is_alive() and [s.up for s in out[0]] == [True, True, True]


# ---------------------------------------------------------------------- real hardware


@pytest.mark.gpu
def test_real_gpu_smoke() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}
    result = run_probe(env, ticks=2)
    assert result["ok"], result
    assert result["devices"], "the driver reports no GPU"
    for tick in result["samples"]:
        for s in tick:
            assert s["up"] and s["uuid"].startswith(("GPU-", "MIG-"))
            assert s["memory_used"] is not None and s["processes"] is not None
