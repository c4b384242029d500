"""SimulatedBackend: scenarios, timelines, the runtime API, dead-PID cleanup and scenario validation."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from reclaimer.observe.gpusim import DEFAULT_SCENARIO, ScenarioError, SimulatedBackend
from reclaimer.core.model import GpuSample
from reclaimer.observe.sampler import Sampler
from tests.support.e2e import e2e_fixture

GIB = 1024**3
UUID0 = "GPU-00000000-0000-4000-8000-000000000000"
UUID1 = "GPU-00000000-0000-4000-8000-000000000001"


def scenario(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "gpus": [
            {"uuid": UUID0, "model": "NVIDIA A100-SXM4-80GB", "memory_total": 80 * GIB},
            {"uuid": UUID1, "model": "NVIDIA A100-SXM4-80GB", "memory_total": 80 * GIB, "utilization": 0.5},
        ],
        "processes": [],
        "drop_dead_pids": False,
    }
    return {**base, **overrides}


def by_uuid(samples: list[GpuSample]) -> dict[str, GpuSample]:
    return {s.uuid: s for s in samples}


@pytest.fixture
@e2e_fixture
def sleeper() -> Any:
    """A real process that lives until the test ends it."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- scenarios


def test_devices_and_constant_utilisation() -> None:
    sim = SimulatedBackend(scenario())
    assert [(d.index, d.uuid, d.model, d.mig_mode, d.memory_total_bytes) for d in sim.devices()] == [
        (0, UUID0, "NVIDIA A100-SXM4-80GB", False, 80 * GIB),
        (1, UUID1, "NVIDIA A100-SXM4-80GB", False, 80 * GIB),
    ]
    g0, g1 = sim.sample(100.0)
    assert (g0.timestamp, g0.up, g0.utilization, g0.memory_used_bytes, g0.processes) == (100.0, True, 0.0, 0, ())
    assert g1.utilization == 0.5
    assert sim.mig_parents() == {} and sim.error_counts() == {}


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        pytest.param(0.0, 0.9, id="start"),
        pytest.param(59.9, 0.9, id="before-second-step"),
        pytest.param(60.0, 0.0, id="on-second-step"),
        pytest.param(119.0, 0.0, id="between"),
        pytest.param(120.0, None, id="unknown-step"),
        pytest.param(10_000.0, None, id="long-after"),
    ],
)
def test_utilisation_timeline_steps(offset: float, expected: float | None) -> None:
    gpus = [{"uuid": UUID0, "utilization": [[0, 0.9], [60, 0.0], [120, None]]}]
    sim = SimulatedBackend({"gpus": gpus}, start_time=1000.0)
    assert sim.sample(1000.0 + offset)[0].utilization == expected


def test_timeline_starts_at_the_first_sample_by_default() -> None:
    sim = SimulatedBackend({"gpus": [{"uuid": UUID0, "utilization": [[0, 1.0], [10, 0.0]]}]})
    assert sim.sample(5000.0)[0].utilization == 1.0
    assert sim.sample(5009.0)[0].utilization == 1.0
    assert sim.sample(5010.0)[0].utilization == 0.0


def test_scenario_processes_by_index_or_uuid_and_memory_used() -> None:
    sim = SimulatedBackend(scenario(
        gpus=[{"uuid": UUID0, "memory_reserved": 500}, {"uuid": UUID1}],
        processes=[
            {"pid": 11, "gpu": 0, "memory_bytes": 2 * GIB, "sm_utilization": 0.25},
            {"pid": 12, "gpu": UUID1, "memory_bytes": None},
            {"pid": 13, "gpu": UUID0, "memory_bytes": GIB},
        ],
    ))
    s = by_uuid(sim.sample(1.0))
    assert [(p.pid, p.used_memory_bytes, p.sm_utilization) for p in s[UUID0].processes or ()] == [
        (11, 2 * GIB, 0.25), (13, GIB, None)]
    assert s[UUID0].memory_used_bytes == 500 + 3 * GIB
    assert [(p.pid, p.used_memory_bytes) for p in s[UUID1].processes or ()] == [(12, None)]
    assert s[UUID1].memory_used_bytes == 0  # unknown process memory adds nothing it could not know


def test_mig_gpu_reports_no_utilisation_and_maps_its_mig_devices() -> None:
    sim = SimulatedBackend({"gpus": [{"uuid": UUID0, "mig_devices": ["MIG-a", "MIG-b"], "utilization": 0.0}]})
    assert sim.devices()[0].mig_mode is True
    assert sim.mig_parents() == {"MIG-a": UUID0, "MIG-b": UUID0}
    for t in (1.0, 2.0):
        (g,) = sim.sample(t)
        assert g.up and g.utilization is None and g.errors == ("nvmlDeviceGetUtilizationRates:NOT_SUPPORTED",)
    assert sim.error_counts() == {("nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED"): 1}


def test_default_scenario_is_valid() -> None:
    sim = SimulatedBackend()
    assert len(sim.devices()) == len(DEFAULT_SCENARIO["gpus"])
    assert all(s.up and s.utilization == 0.0 for s in sim.sample(1.0))


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(f"gpus:\n  - uuid: {UUID0}\n    utilization: [[0, 0.2], [30, 0.8]]\n"
                    "processes:\n  - {pid: 1, gpu: 0, memory_bytes: 1024}\ndrop_dead_pids: false\n")
    sim = SimulatedBackend.from_file(path, start_time=0.0)
    assert sim.sample(31.0)[0].utilization == 0.8
    assert [p.pid for p in sim.sample(31.0)[0].processes or ()] == [1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(None, "cannot read scenario", id="missing-file"),
        pytest.param("gpus: [\n  {uuid: x\n", "(line", id="bad-yaml"),
        pytest.param("- just a list\n", "top level must be a mapping", id="not-a-mapping"),
        pytest.param("gpus:\n  - {uuid: x, utilisation: 0.5}\n", "gpus[0]: unknown key 'utilisation'", id="typo-key"),
    ],
)
def test_bad_scenario_files_name_the_file_and_culprit(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "node.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ScenarioError) as err:
        SimulatedBackend.from_file(path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("data", "culprit"),
    [
        pytest.param({}, "gpus: must be a non-empty list", id="no-gpus"),
        pytest.param({"gpus": []}, "gpus: must be a non-empty list", id="empty-gpus"),
        pytest.param({"gpus": [{"uuid": UUID0}], "extra": 1}, "unknown key 'extra'", id="unknown-top-key"),
        pytest.param({"gpus": ["GPU-x"]}, "gpus[0]: must be a mapping", id="gpu-not-a-mapping"),
        pytest.param({"gpus": [{"model": "x"}]}, "gpus[0].uuid: is required", id="missing-uuid"),
        pytest.param({"gpus": [{"uuid": UUID0}, {"uuid": UUID0}]}, "gpus[1]: uuid", id="duplicate-uuid"),
        pytest.param({"gpus": [{"uuid": UUID0, "memory_total": "80GiB"}]}, "gpus[0].memory_total", id="memory-string"),
        pytest.param({"gpus": [{"uuid": UUID0, "memory_total": -1}]}, "gpus[0].memory_total", id="memory-negative"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": 37}]}, "gpus[0].utilization: must be a ratio",
                     id="percent-not-ratio"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": True}]}, "gpus[0].utilization", id="bool-ratio"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": float("nan")}]}, "gpus[0].utilization", id="nan"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": [[5, 0.1]]}]}, "gpus[0].utilization[0]: the first step",
                     id="timeline-not-from-zero"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": [[0, 0.1], [0, 0.2]]}]},
                     "gpus[0].utilization[1]: offsets must increase", id="timeline-not-increasing"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": [[0, 0.1, 3]]}]}, "gpus[0].utilization[0]",
                     id="timeline-bad-step"),
        pytest.param({"gpus": [{"uuid": UUID0, "utilization": [[0, 1.5]]}]}, "gpus[0].utilization[0]",
                     id="timeline-ratio-too-big"),
        pytest.param({"gpus": [{"uuid": UUID0, "mig_devices": "MIG-a"}]}, "gpus[0].mig_devices", id="mig-not-list"),
        pytest.param({"gpus": [{"uuid": UUID0, "mig_devices": [UUID0]}]}, "is used twice", id="mig-reuses-uuid"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 1}]}, "processes[0].gpu: is required",
                     id="process-without-gpu"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 1, "gpu": 3}]},
                     "processes[0].gpu: no GPU with index 3", id="process-gpu-index"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 1, "gpu": "GPU-nope"}]},
                     "processes[0].gpu: no GPU with uuid 'GPU-nope'", id="process-gpu-uuid"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 0, "gpu": 0}]}, "processes[0].pid",
                     id="pid-zero"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": "12", "gpu": 0}]}, "processes[0].pid",
                     id="pid-string"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 1, "gpu": 0, "sm_utilization": 50}]},
                     "processes[0].sm_utilization", id="sm-percent"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 1, "gpu": 0}, {"pid": 1, "gpu": 0}]},
                     "processes[1]: pid 1 is listed twice", id="duplicate-process"),
        pytest.param({"gpus": [{"uuid": UUID0}], "processes": [{"pid": 1, "gpu": 0, "mem": 1}]},
                     "processes[0]: unknown key 'mem'", id="process-typo"),
        pytest.param({"gpus": [{"uuid": UUID0}], "drop_dead_pids": "yes"}, "drop_dead_pids", id="drop-not-bool"),
    ],
)
def test_invalid_scenarios_name_the_culprit(data: dict[str, Any], culprit: str) -> None:
    with pytest.raises(ScenarioError) as err:
        SimulatedBackend(data, source="demo.yaml")
    assert str(err.value).startswith("demo.yaml")
    assert culprit in str(err.value)


# ---------------------------------------------------------------------- runtime API


def test_set_utilization_overrides_the_timeline() -> None:
    sim = SimulatedBackend(scenario(), start_time=0.0)
    sim.set_utilization(UUID1, 0.0)
    sim.set_utilization(0, None)
    g0, g1 = sim.sample(1.0)
    assert (g0.utilization, g1.utilization) == (None, 0.0)


def test_add_and_remove_processes() -> None:
    sim = SimulatedBackend(scenario())
    sim.add_process(0, 101, 4 * GIB)
    sim.add_process(UUID1, 101, GIB, 0.5)  # one process may hold two GPUs
    sim.add_process(0, 102, None, sm_utilization=0.0)
    s = by_uuid(sim.sample(1.0))
    assert [(p.pid, p.used_memory_bytes) for p in s[UUID0].processes or ()] == [(101, 4 * GIB), (102, None)]
    assert s[UUID0].memory_used_bytes == 4 * GIB
    assert [(p.pid, p.sm_utilization) for p in s[UUID1].processes or ()] == [(101, 0.5)]
    sim.add_process(0, 101, 6 * GIB)  # same pid on the same GPU: replaced, not doubled
    sim.remove_process(102)
    s = by_uuid(sim.sample(2.0))
    assert [(p.pid, p.used_memory_bytes) for p in s[UUID0].processes or ()] == [(101, 6 * GIB)]
    sim.remove_process(101)
    sim.remove_process(999)  # absent: no error
    assert all(g.processes == () for g in sim.sample(3.0))


def test_set_lost_takes_one_gpu_down_and_back() -> None:
    sim = SimulatedBackend(scenario())
    sim.add_process(1, 7, GIB)
    sim.set_lost(1, True)
    g0, g1 = sim.sample(1.0)
    assert g0.up and g0.utilization == 0.0
    assert (g1.up, g1.utilization, g1.memory_used_bytes, g1.processes) == (False, None, None, None)
    assert g1.errors == ("nvmlDeviceGetUtilizationRates:GPU_IS_LOST",)
    assert sim.error_counts() == {("nvmlDeviceGetUtilizationRates", "GPU_IS_LOST"): 1}
    sim.set_lost(UUID1, False)
    g1 = sim.sample(2.0)[1]
    assert g1.up and [p.pid for p in g1.processes or ()] == [7]


@pytest.mark.parametrize(
    ("call", "culprit"),
    [
        pytest.param(lambda s: s.set_utilization(5, 0.1), "no GPU with index 5", id="util-bad-index"),
        pytest.param(lambda s: s.set_utilization("GPU-x", 0.1), "no GPU with uuid 'GPU-x'", id="util-bad-uuid"),
        pytest.param(lambda s: s.set_utilization(0, 1.5), "ratio", id="util-out-of-range"),
        pytest.param(lambda s: s.add_process(0, -4, GIB), "pid", id="add-negative-pid"),
        pytest.param(lambda s: s.add_process(0, 4, -1), "memory_bytes", id="add-negative-memory"),
        pytest.param(lambda s: s.add_process(0, 4, GIB, 80), "sm_utilization", id="add-percent"),
        pytest.param(lambda s: s.add_process(True, 4, GIB), "GPU index or uuid", id="add-bool-gpu"),
        pytest.param(lambda s: s.set_lost(2, True), "no GPU with index 2", id="lost-bad-index"),
    ],
)
def test_runtime_calls_reject_bad_input(call: Any, culprit: str) -> None:
    sim = SimulatedBackend(scenario())
    with pytest.raises(ScenarioError) as err:
        call(sim)
    assert culprit in str(err.value)
    assert all(g.up and g.processes == () for g in sim.sample(1.0))  # nothing half-applied


def test_close_reports_every_gpu_down() -> None:
    sim = SimulatedBackend(scenario())
    sim.close()
    assert [s.up for s in sim.sample(1.0)] == [False, False]


# ---------------------------------------------------------------------- dead PIDs


def test_a_process_that_exits_vanishes(sleeper: subprocess.Popen[bytes]) -> None:
    sim = SimulatedBackend(scenario(drop_dead_pids=True))
    sim.add_process(0, sleeper.pid, 8 * GIB)
    g0 = sim.sample(1.0)[0]
    assert [p.pid for p in g0.processes or ()] == [sleeper.pid] and g0.memory_used_bytes == 8 * GIB
    sleeper.kill()
    sleeper.wait()  # reaped: /proc/<pid> is gone
    g0 = sim.sample(2.0)[0]
    assert g0.processes == () and g0.memory_used_bytes == 0  # memory released, like real NVML


def test_dead_pids_stay_when_dropping_is_off(sleeper: subprocess.Popen[bytes]) -> None:
    sim = SimulatedBackend(scenario(drop_dead_pids=False))
    sim.add_process(0, sleeper.pid, GIB)
    sleeper.kill()
    sleeper.wait()
    assert [p.pid for p in sim.sample(1.0)[0].processes or ()] == [sleeper.pid]


def write_stat(root: Path, pid: int, starttime: int) -> None:
    fields = ["S", "1"] + ["0"] * 17 + [str(starttime), "0"]  # field 22 is starttime
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "stat").write_text(f"{pid} (python3 (x)) " + " ".join(fields) + "\n")


def test_a_reused_pid_is_another_process(tmp_path: Path) -> None:
    write_stat(tmp_path, 500, starttime=1111)
    write_stat(tmp_path, 501, starttime=2222)
    sim = SimulatedBackend(scenario(drop_dead_pids=True, processes=[{"pid": 501, "gpu": 0, "memory_bytes": 1}]),
                           proc_root=tmp_path)
    sim.add_process(0, 500, GIB)
    assert [p.pid for p in sim.sample(1.0)[0].processes or ()] == [500, 501]
    write_stat(tmp_path, 500, starttime=9999)  # the kernel died and the PID came back as something else
    assert [p.pid for p in sim.sample(2.0)[0].processes or ()] == [501]
    write_stat(tmp_path, 500, starttime=1111)
    assert [p.pid for p in sim.sample(3.0)[0].processes or ()] == [501]  # gone for good


# ---------------------------------------------------------------------- with the sampler, across threads


def test_runtime_api_is_safe_under_a_running_sampler() -> None:
    sim = SimulatedBackend(scenario())
    sampler = Sampler(sim, interval=0.001, window_seconds=0.05)
    errors: list[BaseException] = []

    def churn(gpu: int) -> None:
        try:
            for pid in range(1000 + gpu * 1000, 1200 + gpu * 1000):
                sim.add_process(gpu, pid, GIB)
                sim.set_utilization(gpu, (pid % 10) / 10)
                sim.remove_process(pid)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    sampler.start()
    workers = [threading.Thread(target=churn, args=(g,)) for g in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert sampler.stop(20)
    assert errors == [] and sampler.failures == 0 and sampler.ticks > 0
    assert all(g.processes == () for g in sim.sample(1.0))
