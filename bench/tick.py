"""Measure 1: the sampling tick's cost against its floor (the bare pynvml calls one tick needs).

Each GPU count runs in its own subprocess with the fake NVML (devices are enumerated at open); inside it the
process counts are interleaved rep by rep. Per repetition the worker times one ``Sampler.tick()`` (NvmlBackend
underneath), one floor pass and one plain-ctypes floor pass, in alternating order, CPU by ``time.thread_time``
and wall by ``perf_counter``. Before each timed pass the fake state is rewritten with fresh
per-process utilisation samples (a real driver has new ones every tick) and the library re-reads it outside the
timed region. "processes" is the node's total, spread round-robin over the GPUs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    INFO,
    FakeLib,
    MeasureResult,
    Row,
    child_env,
    fmt_us,
    linear_fit,
    md_table,
    median,
    node_state,
    run_worker,
    stage,
    verdict,
    write_fake_state,
)

TARGET_RATIO = 1.5
PID_BASE = 20_000  # NVML-only measure: the pids need not exist


def run(lib: FakeLib, workdir: Path, gpus: tuple[int, ...], processes: tuple[int, ...], reps: int,
        warmup: int) -> MeasureResult:
    """Every (gpus, processes) configuration: one subprocess per GPU count; rows, markdown and plot data."""
    result = MeasureResult("tick", "1. Sampling tick cost vs floor")
    points: list[dict[str, Any]] = []
    with stage("tick", configs=len(gpus) * len(processes)):
        for g in gpus:
            state = workdir / f"tick-{g}.conf"
            args = {"gpus": g, "processes": list(processes), "reps": reps, "warmup": warmup, "state": str(state),
                    "lib": str(lib.lib_path)}
            points += run_worker("bench.tick", args, child_env(lib, state), timeout=480)["points"]
    result.data["points"] = points
    fits = {}
    for g in gpus:
        # Fit over GPUs that have processes: with none, NVML's size query answers in one call, with any it takes
        # a second call to fetch them (tick and floor alike), a step between 0 and the first process, not a slope.
        mine = [p for p in points if p["gpus"] == g and p["processes"] > 0]
        if len(mine) >= 2:
            fits[g] = linear_fit([p["processes"] for p in mine], [p["tick_cpu"] for p in mine])
    result.data["fits"] = {g: vars(f) for g, f in fits.items()}
    worst = max(points, key=lambda p: p["ratio_cpu"])
    result.rows.append(Row("tick", f"tick/floor CPU, worst ({_gpus(worst['gpus'])} × {worst['processes']} procs)",
                           f"{worst['ratio_cpu']:.2f}×", f"≤ {TARGET_RATIO}×",
                           verdict(worst["ratio_cpu"] <= TARGET_RATIO)))
    most = max(processes)
    at_most = sorted((p for p in points if p["processes"] == most), key=lambda p: p["gpus"])
    if most > 0 and at_most:
        which = ", ".join(_gpus(p["gpus"]) for p in at_most)
        result.rows.append(Row("tick", f"tick/floor CPU at {most} procs ({which})",
                               " / ".join(f"{p['ratio_cpu']:.2f}×" for p in at_most), f"≤ {TARGET_RATIO}×",
                               verdict(all(p["ratio_cpu"] <= TARGET_RATIO for p in at_most))))
    big = max(points, key=lambda p: (p["gpus"], p["processes"]))
    result.rows.append(Row("tick", f"tick CPU at {_gpus(big['gpus'])} × {big['processes']} procs",
                           f"{fmt_us(big['tick_cpu'])} (floor {fmt_us(big['floor_cpu'])})", "", INFO,
                           f"{big['tick_cpu'] * 100:.3f}% of a core at 1 Hz"))
    for g, f in fits.items():
        r2 = "n/a" if f.r2 is None else f"{f.r2:.4f}"
        ok = None if f.r2 is None else f.r2 >= 0.98
        result.rows.append(Row("tick", f"linearity over 1+ processes, {_gpus(g)}",
                               f"slope {f.slope * 1e6:.2f} µs/proc, R² {r2}", "R² ≥ 0.98", verdict(ok)))
    table = [
        (p["gpus"], p["processes"], fmt_us(p["tick_cpu"]), fmt_us(p["floor_cpu"]), f"{p['ratio_cpu']:.2f}×",
         fmt_us(p["tick_wall"]), fmt_us(p["floor_wall"]), f"{p['ratio_wall']:.2f}×", fmt_us(p["c_floor_cpu"]),
         p["reps"], "yes" if p["checked"] else "NO")
        for p in points
    ]
    fit_rows = [(g, f"{f.slope * 1e6:.3f}", fmt_us(f.intercept), "n/a" if f.r2 is None else f"{f.r2:.4f}")
                for g, f in fits.items()]
    result.markdown = (
        "Median per tick; CPU = `time.thread_time` of the sampling thread, wall = `perf_counter`. The floor is "
        "`nvmlDeviceGetUtilizationRates`, `GetMemoryInfo`, `GetComputeRunningProcesses` (v3) and "
        "`GetProcessUtilization` per GPU, bare, timed in the same process, alternating with the tick. "
        "\"C floor\": the same four calls through plain ctypes structs (no pynvml objects), for reference. "
        "\"checked\": every tick returned every process with a known SM utilisation.\n\n"
        + md_table(["GPUs", "processes", "tick CPU", "floor CPU", "ratio CPU", "tick wall", "floor wall",
                    "ratio wall", "C floor CPU", "reps", "checked"], table)
        + "\nLinear fit of tick CPU against processes (per GPU count, over the points with processes: with none, "
        "NVML's size query needs one call instead of two, a step that the floor has too):\n\n"
        + md_table(["GPUs", "slope µs/process", "intercept", "R²"], fit_rows)
    )
    return result


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- the worker (own process, fake NVML)


def _floor_pass(pynvml: Any, handles: list[Any], last_seen: list[int]) -> None:
    """The bare calls one tick needs; only what correctness needs is kept (the newest sample timestamp)."""
    for i, h in enumerate(handles):
        pynvml.nvmlDeviceGetUtilizationRates(h)
        pynvml.nvmlDeviceGetMemoryInfo(h)
        pynvml.nvmlDeviceGetComputeRunningProcesses_v3(h)
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(h, last_seen[i])
        except pynvml.NVMLError:  # NOT_FOUND: no new samples since last_seen
            continue
        for s in samples:
            if s.timeStamp > last_seen[i]:
                last_seen[i] = s.timeStamp


class _Util(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _Proc(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong), ("gpuInstanceId", ctypes.c_uint),
                ("computeInstanceId", ctypes.c_uint)]


class _Sample(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("timeStamp", ctypes.c_ulonglong), ("smUtil", ctypes.c_uint),
                ("memUtil", ctypes.c_uint), ("encUtil", ctypes.c_uint), ("decUtil", ctypes.c_uint)]


def _c_floor_pass(pynvml: Any, handles: list[Any], last_seen: list[int]) -> None:
    """The same four calls through plain ctypes (no pynvml objects): what the C library itself costs here."""
    get = pynvml._nvmlGetFunctionPointer
    util_fn, mem_fn = get("nvmlDeviceGetUtilizationRates"), get("nvmlDeviceGetMemoryInfo")
    proc_fn, sample_fn = get("nvmlDeviceGetComputeRunningProcesses_v3"), get("nvmlDeviceGetProcessUtilization")
    util, mem, count = _Util(), _Memory(), ctypes.c_uint(0)
    for i, h in enumerate(handles):
        util_fn(h, ctypes.byref(util))
        mem_fn(h, ctypes.byref(mem))
        count.value = 0
        if proc_fn(h, ctypes.byref(count), None) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
            procs = (_Proc * (count.value * 2 + 5))()
            count.value = len(procs)
            proc_fn(h, ctypes.byref(count), procs)
        count.value = 0
        since = ctypes.c_ulonglong(last_seen[i])
        if sample_fn(h, None, ctypes.byref(count), since) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
            samples = (_Sample * count.value)()
            if sample_fn(h, samples, ctypes.byref(count), since) == pynvml.NVML_SUCCESS:
                last_seen[i] = max([last_seen[i], *(s.timeStamp for s in samples[: count.value])])


@dataclass
class _Series:
    """Timings for one process count inside a worker."""

    tick_cpu: list[float] = field(default_factory=list)
    tick_wall: list[float] = field(default_factory=list)
    floor_cpu: list[float] = field(default_factory=list)
    floor_wall: list[float] = field(default_factory=list)
    c_floor_cpu: list[float] = field(default_factory=list)
    checked: bool = True


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """One GPU count (devices are enumerated at open); the process counts are interleaved rep by rep, so slow
    drifts of a shared machine hit every point alike."""
    import pynvml

    from reclaimer.observe.nvml import NvmlBackend
    from reclaimer.observe.sampler import Sampler

    gpus = int(args["gpus"])
    counts = [int(n) for n in args["processes"]]
    state = Path(args["state"])
    write_fake_state(state, **node_state(gpus, [], tick=0))
    backend = NvmlBackend.open(library_path=args["lib"])
    sampler = Sampler(backend, interval=1.0, window_seconds=1800.0)  # the default policy's 30 min window
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
    last_seen, c_last_seen = [0] * gpus, [0] * gpus
    step = [1]

    def fresh_state(n: int) -> None:
        write_fake_state(state, **node_state(gpus, range(PID_BASE, PID_BASE + n), tick=step[0]))
        step[0] += 1
        pynvml.nvmlDeviceGetCount()  # the library re-reads its state here, outside the timed region

    def timed(n: int, fn: Any) -> tuple[float, float]:
        fresh_state(n)
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        fn()
        return (time.thread_time_ns() - c0) / 1e9, (time.perf_counter_ns() - w0) / 1e9

    if args.get("profile_ticks"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001)
        for _ in range(int(args["profile_ticks"])):
            fresh_state(counts[-1])
            profiler.start()
            sampler.tick()
            profiler.stop()
        return {"profile": _render_profile(profiler)}

    series = {n: _Series() for n in counts}
    for rep in range(int(args["warmup"]) + int(args["reps"])):
        keep = rep >= int(args["warmup"])
        for n in counts[rep % len(counts):] + counts[: rep % len(counts)]:
            s = series[n]
            # Untimed settling pass: the first tick after a change of process count drops the old pids' state.
            for settle in (sampler.tick, lambda: _floor_pass(pynvml, handles, last_seen),
                           lambda: _c_floor_pass(pynvml, handles, c_last_seen)):
                fresh_state(n)
                settle()
            for what in (("tick", "floor", "c") if rep % 2 == 0 else ("c", "floor", "tick")):
                if what == "tick":
                    cpu, wall = timed(n, sampler.tick)
                    snap = sampler.snapshot()
                    procs = [p for d in snap.devices if (x := snap.latest(d.uuid)) is not None and x.processes
                             for p in x.processes]
                    s.checked &= len(procs) == n and all(p.sm_utilization is not None for p in procs)
                    if keep:
                        s.tick_cpu.append(cpu)
                        s.tick_wall.append(wall)
                elif what == "floor":
                    cpu, wall = timed(n, lambda: _floor_pass(pynvml, handles, last_seen))
                    if keep:
                        s.floor_cpu.append(cpu)
                        s.floor_wall.append(wall)
                else:
                    cpu, _ = timed(n, lambda: _c_floor_pass(pynvml, handles, c_last_seen))
                    if keep:
                        s.c_floor_cpu.append(cpu)
    backend.close()
    points = []
    for n, s in series.items():
        t_cpu, f_cpu = median(s.tick_cpu), median(s.floor_cpu)
        t_wall, f_wall = median(s.tick_wall), median(s.floor_wall)
        points.append({
            "gpus": gpus, "processes": n, "reps": len(s.tick_cpu), "checked": s.checked,
            "tick_cpu": t_cpu, "floor_cpu": f_cpu, "c_floor_cpu": median(s.c_floor_cpu),
            "tick_wall": t_wall, "floor_wall": f_wall,
            "ratio_cpu": t_cpu / f_cpu if f_cpu > 0 else float("inf"),
            "ratio_wall": t_wall / f_wall if f_wall > 0 else float("inf"),
        })
    return {"points": points}


def _render_profile(profiler: Any) -> str:
    """The call tree (library internals folded), trimmed to its top lines."""
    from pyinstrument.renderers import ConsoleRenderer

    tree = ConsoleRenderer(unicode=False, color=False, show_all=False).render(profiler.last_session)
    kept = [line for line in tree.splitlines() if line.strip() and not line.startswith(("  _ ", " /_", "/   _"))]
    return "\n".join(kept[:60])


def profile(lib: FakeLib, workdir: Path, gpus: int, processes: int, ticks: int) -> str:
    """pyinstrument text for ``ticks`` sampling ticks at this size (needs pyinstrument)."""
    state = workdir / f"tick-profile-{gpus}x{processes}.conf"
    args = {"gpus": gpus, "processes": [processes], "state": str(state), "lib": str(lib.lib_path),
            "profile_ticks": ticks}
    return str(run_worker("bench.tick", args, child_env(lib, state), timeout=300)["profile"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench worker: sampling tick vs floor (run by `python -m bench`)")
    parser.add_argument("--worker", required=True, help="JSON arguments")
    ns = parser.parse_args(argv)
    print(json.dumps(worker(json.loads(ns.worker))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
