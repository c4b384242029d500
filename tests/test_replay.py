"""The fleet replay (bench/replay) at tiny sizes: the trace format, the books, our real policy never reclaiming
falsely on generated fleets, and each culler model reproducing its documented blind spots on small hand-made
traces (with the positive control that it does act when its own rule says so)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from bench.replay import cullers
from bench.replay import trace as tr
from bench.replay.__main__ import main as replay_main
from bench.replay.generate import FleetParams, generate
from bench.replay.ours import RELEASING_ACTION, Ours
from bench.replay.sim import Figures, run, simulate
from bench.replay.world import SHAPES
from bench.results import ANALYSIS_BEGIN, ANALYSIS_END, PLACEHOLDER

EXAMPLE = Path(__file__).resolve().parents[1] / "bench" / "replay" / "example.jsonl"
H = 3600.0
GIB = 1 << 30
K1 = "00000000-0000-4000-8000-000000000001"
K2 = "00000000-0000-4000-8000-000000000002"
STEP = 60.0


def micro(*records: tuple[float, str, dict[str, Any]], hours: float = 12.0) -> tr.Trace:
    """A trace from (t, ev, fields) tuples: alice's server (1 GPU) starts at 0 with one GPU kernel K1 and the tab
    open unless the records say otherwise."""
    header = {"format": tr.FORMAT, "version": 1, "start": "2026-11-30T08:00:00Z", "duration": hours * H,
              "description": "micro", "generator": None}
    base = [
        (0, "server_start", {"server": "alice", "user": "alice", "gpus": 1, "gpu_memory": 80 * GIB}),
        (1, "kernel_start", {"kernel": K1, "server": "alice", "name": "python3", "gpu": True}),
        (2, "cell", {"kernel": K1, "duration": 60, "output_every": None}),
        (2, "gpu", {"kernel": K1, "proc": "main", "util": 0.0, "mem": 10 * GIB}),
    ]
    rows = sorted([*base, *records], key=lambda r: r[0])
    lines = [tr.json.dumps(header)] + [tr.json.dumps({"t": t, "ev": ev, **f}) for t, ev, f in rows]
    return tr.parse(lines, "<micro>")


def tab(t: float, is_open: bool) -> tuple[float, str, dict[str, Any]]:
    return (t, "tab", {"server": "alice", "open": is_open})


def cell(t: float, duration: float, kernel: str = K1, output_every: float | None = None) -> tuple[float, str, dict]:
    return (t, "cell", {"kernel": kernel, "duration": duration, "output_every": output_every})


def gpu(t: float, util: float, mem: int = 10 * GIB, proc: str = "main", kernel: str = K1) -> tuple[float, str, dict]:
    return (t, "gpu", {"kernel": kernel, "proc": proc, "util": util, "mem": mem})


def ours_default() -> Ours:
    return Ours("ours default", [{"name": "default"}], sample_interval=STEP, decide_interval=STEP)


def replay(trace: tr.Trace, strategy: Any, shape: str = "kernel-in-pod") -> Figures:
    return run(trace, shape, strategy, step=STEP)


# --------------------------------------------------------------------------- the trace format


def test_generated_trace_round_trips_through_the_file_format() -> None:
    trace = generate(FleetParams(users=3, days=2, seed=5))
    buf = io.StringIO()
    tr.dump(trace, buf)
    again = tr.parse(buf.getvalue().splitlines(), "<buf>")
    assert again.records == trace.records
    assert again.header.start == trace.header.start and again.header.duration == trace.header.duration
    assert again.header.generator == trace.header.generator
    assert {type(r) for r in trace.records} >= {tr.ServerStart, tr.KernelStart, tr.Cell, tr.Gpu, tr.Tab}


def test_generation_is_seeded() -> None:
    assert generate(FleetParams(users=2, days=2, seed=3)).records == generate(FleetParams(users=2, days=2, seed=3)).records
    assert generate(FleetParams(users=2, days=2, seed=3)).records != generate(FleetParams(users=2, days=2, seed=4)).records


def test_committed_example_trace_replays() -> None:
    trace = tr.load(EXAMPLE)
    assert trace.users == ["alice", "bob"]
    f = replay(trace, cullers.NoCulling())
    assert f.reclaimable_alloc_h > 10 and f.given_back_alloc_h == 0 and f.actions == 0


HEADER = '{"format": "gpu-reclaimer-replay-trace", "version": 1, "start": 0, "duration": 1000}'
SERVER = '{"t": 0, "ev": "server_start", "server": "a", "user": "a", "gpus": 1, "gpu_memory": 1000}'
KERNEL = '{"t": 1, "ev": "kernel_start", "kernel": "%s", "server": "a", "name": "p", "gpu": true}' % K1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        pytest.param([], "empty trace", id="empty"),
        pytest.param(['{"format": "other"}'], "not a replay trace", id="not-a-trace"),
        pytest.param([HEADER.replace('"version": 1', '"version": 2')], "version 2 is not supported", id="version"),
        pytest.param([HEADER, "{nope"], "<t>:2: not JSON", id="bad-json"),
        pytest.param([HEADER, '{"t": 0, "ev": "explode"}'], "<t>:2: unknown ev 'explode'", id="unknown-ev"),
        pytest.param([HEADER, SERVER.replace('"gpus": 1', '"gpus": "1"')], "server_start.gpus has the wrong type",
                     id="wrong-type"),
        pytest.param([HEADER, SERVER, KERNEL.replace(K1, "kernel-1")], "not a canonical lower-case UUID",
                     id="kernel-not-uuid"),
        pytest.param([HEADER, SERVER, KERNEL, '{"t": 0.5, "ev": "reconnect", "server": "a"}'],
                     "<t>:4: records must be sorted", id="unsorted"),
        pytest.param([HEADER, SERVER, KERNEL,
                      '{"t": 2, "ev": "gpu", "kernel": "%s", "proc": "main", "util": 1.5, "mem": 1}' % K1],
                     "gpu.util must be a ratio", id="util-over-1"),
        pytest.param([HEADER, SERVER, '{"t": 2, "ev": "cell", "kernel": "%s", "duration": 5, "output_every": null}'
                      % K1], "before its kernel_start", id="cell-unknown-kernel"),
        pytest.param([HEADER, SERVER, '{"t": 2, "ev": "tab", "server": "a"}'], "tab lacks 'open'", id="missing"),
        pytest.param([HEADER, '{"t": 2000, "ev": "reconnect", "server": "a"}'], "after the trace's duration",
                     id="past-end"),
    ],
)
def test_bad_trace_names_the_line_and_the_culprit(lines: list[str], message: str) -> None:
    with pytest.raises(tr.TraceError, match=message.replace("(", r"\(")):
        tr.parse(lines, "<t>")


def test_cli_reports_a_bad_trace_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(HEADER + "\n" + '{"t": 0, "ev": "explode"}\n')
    assert replay_main(["--trace", str(bad), "--out", str(tmp_path), "--jobs", "1", "--no-plot"]) == 2
    assert "bad.jsonl:2: unknown ev 'explode'" in capsys.readouterr().err


# --------------------------------------------------------------------------- our policy over generated fleets


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_our_default_policy_never_reclaims_falsely(seed: int, shape: str) -> None:
    trace = generate(FleetParams(users=3, days=2, seed=seed))
    f = replay(trace, ours_default(), shape)
    assert f.false_reclaims == 0, f"false reclaims: {f.false_reasons}"
    assert f.actions > 0, "positive control: the fleet has idle kernels the policy must reclaim"
    assert f.given_back_mem_gib_h > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_releases_allocations_and_never_reclaims_falsely(shape: str) -> None:
    """The whole target (stop-server ends every kernel of the server) and idle bounded by holding time, over a
    fleet with busy CPU-only kernels beside idle GPU kernels and re-spawned servers."""
    trace = generate(FleetParams(users=4, days=2, seed=1))
    auto = Ours("ours auto", [{"name": "default", "action": "auto"}], sample_interval=STEP, decide_interval=STEP)
    f = replay(trace, auto, shape)
    assert f.false_reclaims == 0, f"false reclaims: {f.false_reasons}"
    assert f.extra["releases"].get("allocation", 0) > 0 and f.given_back_alloc_h > 0


# --------------------------------------------------------------------------- the books and the anchors' blind spots


def test_books_balance_and_an_idle_kernel_is_reclaimed_by_ours() -> None:
    trace = micro(tab(5, True), tab(600, False))  # one cell, then idle with the GPU memory held for 12 h
    none = replay(trace, cullers.NoCulling())
    assert none.given_back_alloc_h == 0 and none.held_idle_alloc_h == pytest.approx(none.reclaimable_alloc_h)
    f = replay(trace, ours_default(), "kernel-pod")
    assert f.actions == 1 and f.false_reclaims == 0 and f.interruptions == 0
    assert 30 <= f.median_idle_to_release_min <= 32
    assert f.given_back_alloc_h + f.held_idle_alloc_h == pytest.approx(f.reclaimable_alloc_h)
    assert f.given_back_alloc_h == pytest.approx(12 - 0.5, abs=0.1)


def test_shutting_a_kernel_down_inside_a_notebook_pod_frees_memory_not_the_allocation() -> None:
    trace = micro(tab(600, False))
    inside = replay(trace, cullers.JupyterServerCuller(3600.0))
    as_pod = replay(trace, cullers.JupyterServerCuller(3600.0), "kernel-pod")
    assert inside.actions == as_pod.actions == 1
    assert inside.given_back_alloc_h == 0 and inside.given_back_mem_gib_h > 0
    assert as_pod.given_back_alloc_h > 10


def test_jupyter_culler_never_culls_a_connected_idle_kernel_unless_cull_connected() -> None:
    trace = micro(tab(5, True))  # idle for 12 h with the tab open
    assert replay(trace, cullers.JupyterServerCuller(3600.0)).actions == 0
    connected = replay(trace, cullers.JupyterServerCuller(3600.0, cull_connected=True))
    assert connected.actions == 1 and connected.false_reclaims == 0
    assert 60 <= connected.median_idle_to_release_min <= 66  # timeout + up to one cull_interval
    assert replay(trace, ours_default()).actions == 1  # positive control: connections do not keep ours


def test_jupyter_and_kubeflow_cullers_are_blind_to_a_gpu_child_process() -> None:
    child = micro(cell(100, 2), gpu(102, 0.9, 20 * GIB, "child-1"), gpu(4 * H, 0.0, 0, "child-1"))
    for culler in (cullers.JupyterServerCuller(3600.0), cullers.KubeflowCuller(3600.0)):
        f = replay(child, culler)
        assert f.false_reclaims >= 1 and f.false_reasons == {"GPU active in window": f.false_reclaims}, culler.name
    f = replay(child, ours_default())
    assert f.false_reclaims == 0 and f.actions == 1  # after the child ended and 30 idle minutes passed


def test_hub_culler_is_kept_alive_by_an_open_tab_and_kills_a_silent_busy_cell() -> None:
    open_tab = micro(tab(5, True))
    assert replay(open_tab, cullers.HubIdleCuller(3600.0)).actions == 0  # proxy-counted websocket traffic
    silent = micro(tab(5, True), cell(300, 4 * H), gpu(300, 0.0), tab(310, False))
    f = replay(silent, cullers.HubIdleCuller(3600.0))
    assert f.actions == 1 and f.false_reasons == {"cell executing": 1}
    ours = replay(silent, ours_default())  # busy is never idle: it acts only 30 min after the cell ended
    assert ours.false_reclaims == 0 and ours.actions == 1 and ours.median_idle_to_release_min <= 32


def test_kubeflow_keeps_a_busy_cpu_kernel_that_a_gpu_only_culler_kills() -> None:
    cpu_job = micro(
        (200, "kernel_start", {"kernel": K2, "server": "alice", "name": "cpu", "gpu": False}),
        cell(300, 3 * H, K2),
    )
    assert replay(cpu_job, cullers.KubeflowCuller(3600.0)).false_reclaims == 0
    f = replay(cpu_job, cullers.GpuUtilCuller(1800.0))
    assert f.false_reasons == {"cell executing (CPU only)": 1}
    assert replay(cpu_job, ours_default()).false_reclaims == 0


def test_gpu_only_culler_stops_a_data_loading_cell_and_cannot_touch_kernel_pods() -> None:
    loading = micro(cell(300, 3 * H, output_every=60), gpu(300, 0.0), gpu(300 + 50 * 60, 0.9),
                    gpu(300 + 3 * H, 0.0))
    f = replay(loading, cullers.GpuUtilCuller(1800.0))
    assert f.false_reasons == {"cell executing": 1} and f.interruptions == 0
    assert replay(loading, cullers.GpuUtilCuller(1800.0), "kernel-pod").actions == 0  # no root object to scale
    assert replay(loading, ours_default()).actions == 1  # only after the cell, never during it
    assert replay(loading, ours_default()).false_reclaims == 0


def test_interruption_is_a_user_back_within_the_hour() -> None:
    lunch = micro(tab(600, False), tab(80 * 60, True), cell(80 * 60 + 30, 10))  # back after 80 min
    f = replay(lunch, ours_default(), "kernel-pod")
    assert f.actions >= 1 and f.interruptions == 1
    overnight = micro(tab(600, False), tab(10 * H, True), cell(10 * H + 30, 10))
    assert replay(overnight, ours_default(), "kernel-pod").interruptions == 0


def test_best_action_releases_the_allocation_in_each_shape() -> None:
    trace = micro(tab(600, False))
    for shape in SHAPES:
        s = Ours("best", [{"name": "default", "action": RELEASING_ACTION[shape]}], sample_interval=STEP,
                 decide_interval=STEP)
        f = replay(trace, s, shape)
        assert f.extra["releases"] == {"allocation": 1}, shape
        assert f.given_back_alloc_h > 10


# --------------------------------------------------------------------------- the command


@pytest.mark.e2e
def test_smoke_run_writes_results_and_keeps_the_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--smoke", "--users", "2", "--out", str(tmp_path), "--only", "none,jupyter,ours-default", "--jobs", "1",
            "--no-plot"]
    assert replay_main(args) == 0
    results = (tmp_path / "RESULTS.md").read_text()
    for section in ("# Fleet replay", "(`kernel-in-pod`)", "(`kernel-pod`)", "## Strategies", "ours default",
                    "cull_connected=False", "jupyter/EG culler", ANALYSIS_BEGIN, ANALYSIS_END):
        assert section in results, section
    assert "no culling" in capsys.readouterr().out
    (tmp_path / "RESULTS.md").write_text(results.replace(PLACEHOLDER, "## Analysis\n\nHand-written.\n"))
    assert replay_main(args) == 0
    assert "Hand-written." in (tmp_path / "RESULTS.md").read_text()


def test_a_kernel_is_judged_by_its_own_gpu_work_not_its_neighbours() -> None:
    training_ends = 800 + 3 * H
    neighbour = micro(
        tab(600, False),
        (700, "kernel_start", {"kernel": K2, "server": "alice", "name": "python3", "gpu": True}),
        cell(800, 3 * H, K2, output_every=60), gpu(800, 0.9, 8 * GIB, kernel=K2), gpu(training_ends, 0.0, kernel=K2),
    )
    culled = simulate(neighbour, "kernel-in-pod", cullers.JupyterServerCuller(3600.0), step=STEP)
    first = culled.books.actions[0]  # K1 after an idle hour: sound, though K2 kept the GPU busy meanwhile
    assert first.t - culled.start < training_ends and not first.false_reason
    # Ours reads the device: it waits until the GPU itself has been idle for 30 min, then ends both idle kernels.
    world = simulate(neighbour, "kernel-in-pod", ours_default(), step=STEP)
    actions = world.books.actions
    assert len(actions) == 2 and not any(a.false_reason for a in actions)
    assert min(a.t - world.start for a in actions) >= training_ends + 30 * 60
