"""Measure 2: attribution cost per call, cold (new PIDs: every identity parsed) and warm (known PIDs: cached).

Two sources: real processes in the real /proc (bash stand-ins whose cmdline names ``kernel-<uuid>.json``, each with
a ``sleep`` child), and a synthetic /proc tree (tests/support/procfs_fixtures.py) whose processes sit in pods
(cgroup v2, systemd driver, containerd), so cgroup parsing is on the path. Half the GPU processes are kernels
themselves, half are a kernel's child (one step up the parent chain). No NVML: this runs in the harness process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import (
    INFO,
    KernelProcess,
    MeasureResult,
    Row,
    fmt_us,
    kernel_ids,
    md_table,
    median,
    stage,
)
from reclaimer.observe.attribution import Attributor
from reclaimer.core.model import ProcessSample

GPU = "GPU-bench0000-0000-4000-8000-000000000000"


def _gpu_processes(pairs: Sequence[tuple[int, int]], n: int) -> list[tuple[str, ProcessSample]]:
    """``n`` GPU processes: even ones the kernel pid, odd ones its child's pid."""
    out = []
    for i in range(n):
        kernel_pid, child_pid = pairs[i // 2]
        pid = child_pid if i % 2 else kernel_pid
        out.append((GPU, ProcessSample(pid=pid, used_memory_bytes=1 << 30, sm_utilization=0.0)))
    return out


def _time_calls(make: Callable[[], Attributor], procs: list[tuple[str, ProcessSample]], reps: int,
                ) -> tuple[float, float, float, int]:
    """(cold median, warm median CPU s, warm wall s, attributed count) over ``reps`` fresh attributors."""
    cold: list[float] = []
    warm: list[float] = []
    warm_wall: list[float] = []
    attributed = 0
    for _ in range(reps):
        attributor = make()
        c0 = time.thread_time()
        out = attributor.attribute(procs)
        cold.append(time.thread_time() - c0)
        attributed = sum(1 for p in out if p.kernel_id)
        for _ in range(3):
            c0, w0 = time.thread_time(), time.perf_counter()
            attributor.attribute(procs)
            warm.append(time.thread_time() - c0)
            warm_wall.append(time.perf_counter() - w0)
    return median(cold), median(warm), median(warm_wall), attributed


def _synthetic_tree(root: Path, n_kernels: int) -> list[tuple[int, int]]:
    """A fake /proc with ``n_kernels`` pod kernels (each with a child); (kernel pid, child pid) pairs."""
    from tests.support.procfs_fixtures import FakeProc, kernel_cmdline, pod_cgroup

    proc = FakeProc(root)
    proc.host_init()
    pairs = []
    for i, kid in enumerate(kernel_ids(n_kernels, seed=11)):
        pod_uid = f"aaaaaaaa-0000-4000-8000-{i:012d}"
        container = f"{i:064x}"
        kpid, cpid = 10_000 + 2 * i, 10_001 + 2 * i
        proc.add(kpid, ppid=1, cmdline=kernel_cmdline(kid), cgroup=pod_cgroup(pod_uid, container), starttime=500 + i)
        proc.add(cpid, ppid=kpid, cmdline=["python", "train.py"], cgroup=pod_cgroup(pod_uid, container),
                 starttime=900 + i)
        pairs.append((kpid, cpid))
    return pairs


def run(kernels: Sequence[KernelProcess], workdir: Path, sizes: tuple[int, ...], reps: int) -> MeasureResult:
    """Cold and warm attribution per call at each size, real /proc and synthetic tree."""
    result = MeasureResult("attribution", "2. Attribution cost per call (cold vs warm cache)")
    real_pairs = [(k.pid, k.child_pid) for k in kernels]
    synth_pairs = _synthetic_tree(workdir / "synthetic-proc", max(1, (max(sizes) + 1) // 2))
    rows = []
    with stage("attribution", sizes=list(sizes)):
        for source, root, pairs in (("real /proc", "/proc", real_pairs),
                                    ("synthetic pods", str(workdir / "synthetic-proc"), synth_pairs)):
            for n in sizes:
                if (n + 1) // 2 > len(pairs):
                    raise RuntimeError(f"{source}: {len(pairs)} kernels cannot provide {n} GPU processes")
                procs = _gpu_processes(pairs, n)
                cold, warm, warm_wall, attributed = _time_calls(lambda r=root: Attributor(procfs_root=r), procs, reps)
                rows.append((source, n, cold, warm, warm_wall, attributed))
    result.data["rows"] = [dict(zip(("source", "n", "cold", "warm", "warm_wall", "attributed"), r)) for r in rows]
    for source, n, cold, warm, _, attributed in rows:
        if n == max(sizes):
            result.rows.append(Row("attribution", f"{source}, {n} GPU procs: cold / warm CPU",
                                   f"{fmt_us(cold)} / {fmt_us(warm)}", "", INFO,
                                   f"{cold / n * 1e6:.0f} / {warm / n * 1e6:.0f} µs per process; "
                                   f"{attributed}/{n} attributed"))
    result.markdown = (
        "Median CPU (`thread_time`) of one `Attributor.attribute()` call. Cold: a fresh Attributor, every "
        "identity parsed (stat, cmdline, cgroup). Warm: later calls on the same set (stat re-read for identity, "
        "the rest cached). Half the GPU processes are kernel children, so the walk goes one parent up.\n\n"
        + md_table(["source", "GPU processes", "cold CPU", "warm CPU", "warm wall", "cold / process",
                    "warm / process", "attributed"],
                   [(s, n, fmt_us(c), fmt_us(w), fmt_us(ww), f"{c / n * 1e6:.0f} µs", f"{w / n * 1e6:.0f} µs",
                     f"{a}/{n}") for s, n, c, w, ww, a in rows])
    )
    return result
