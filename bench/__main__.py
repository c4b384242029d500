"""``python -m bench``: run every measure, print the headline table, write RESULTS.md and scaling.png.

``--smoke`` runs tiny sizes (what tests/test_bench.py runs) and writes to a temporary directory unless ``--out``
says otherwise. Optional parts (nvitop-exporter, matplotlib, pyinstrument, psutil) are reported as not installed,
never required; ``--assume-missing peer,plot,profile,psutil`` makes the harness behave as if they were absent (as
in CI).
The exit code is 0 when every measure ran (targets missed or not), 1 when a measure failed to run.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bench import BENCH_DIR
from bench.common import (
    OPTIONAL,
    SKIPPED,
    KernelProcesses,
    MeasureResult,
    Row,
    build_fake_lib,
    kernel_ids,
    machine_info,
    missing_optional,
)
from bench.steady import SteadySizes

MEASURES = ("tick", "attribution", "gateway", "scrape", "steady", "profile")


@dataclass(frozen=True)
class Sizes:
    tick_gpus: tuple[int, ...]
    tick_processes: tuple[int, ...]
    tick_reps: int
    tick_warmup: int
    attribution_sizes: tuple[int, ...]
    attribution_reps: int
    steady: SteadySizes
    steady_gpu_processes: int
    gateway_ks: tuple[int, ...]
    gateway_gs: tuple[int, ...]
    gateway_cycles: int
    gateway_nodes: int
    extrapolate: tuple[tuple[int, int], ...]
    scrape_gpus: int
    scrape_kernels: int
    scrapes: int
    decide_cycles: int
    profile_tick: tuple[int, int]
    profile_ticks: int


FULL = Sizes(
    tick_gpus=(1, 8, 16), tick_processes=(0, 8, 64, 256), tick_reps=41, tick_warmup=5,
    attribution_sizes=(8, 64, 256), attribution_reps=7,
    steady=SteadySizes(gpus=8, kernels=200, duration=90.0, sample_interval=1.0, decide_interval=15.0,
                       scrape_interval=5.0, ready_timeout=90.0),
    steady_gpu_processes=64,
    gateway_ks=(100, 1000, 5000), gateway_gs=(1, 8, 32), gateway_cycles=4, gateway_nodes=20,
    extrapolate=((10, 100), (100, 1000), (1000, 5000)),
    scrape_gpus=8, scrape_kernels=500, scrapes=100,
    decide_cycles=20, profile_tick=(16, 256), profile_ticks=200,
)
SMOKE = Sizes(
    tick_gpus=(1, 2), tick_processes=(0, 4), tick_reps=3, tick_warmup=1,
    attribution_sizes=(4,), attribution_reps=2,
    steady=SteadySizes(gpus=2, kernels=8, duration=3.0, sample_interval=0.5, decide_interval=1.0,
                       scrape_interval=1.0, ready_timeout=45.0),
    steady_gpu_processes=4,
    gateway_ks=(10, 40), gateway_gs=(1, 2), gateway_cycles=2, gateway_nodes=3,
    extrapolate=((10, 100), (1000, 5000)),
    scrape_gpus=2, scrape_kernels=20, scrapes=5,
    decide_cycles=2, profile_tick=(2, 4), profile_ticks=5,
)


def _configure_logging() -> None:
    """Progress lines on stderr; the library's own info lines (in-process measures) are dropped."""

    def quiet_library(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if not event.pop("harness", False) and method in ("debug", "info"):
            raise structlog.DropEvent
        return event

    structlog.configure(
        processors=[quiet_library, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S"), structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds per measure")
    parser.add_argument("--out", type=Path, default=None,
                        help="where RESULTS.md and scaling.png go (default: bench/ for a full run, a temporary "
                             "directory for --smoke)")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated measures to run (default: all of {','.join(MEASURES)})")
    parser.add_argument("--assume-missing", default="",
                        help=f"comma-separated optional parts to treat as not installed ({','.join(OPTIONAL)})")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the scratch directory (logs, configs)")
    ns = parser.parse_args(argv)
    ns.only = tuple(m for m in ns.only.split(",") if m)
    unknown = [m for m in ns.only if m not in MEASURES]
    if unknown:
        parser.error(f"--only: unknown measure(s) {', '.join(unknown)} (choose from {', '.join(MEASURES)})")
    ns.assume_missing = frozenset(p for p in ns.assume_missing.split(",") if p)
    bad = [p for p in ns.assume_missing if p not in OPTIONAL]
    if bad:
        parser.error(f"--assume-missing: unknown part(s) {', '.join(bad)} (choose from {', '.join(OPTIONAL)})")
    return ns


def _guarded(key: str, title: str, fn: Callable[[], MeasureResult]) -> MeasureResult:
    """Run one measure; a failure becomes an ``error`` row (the other measures still run)."""
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one broken measure must not lose the others' results
        structlog.get_logger("bench").error("measure failed", measure=key, error=repr(exc), harness=True)
        traceback.print_exc(file=sys.stderr)
        result = MeasureResult(key, title, rows=[Row(key, "measure failed to run", type(exc).__name__, "", "error",
                                                     " ".join(str(exc).split())[:200])],
                               markdown=f"The measure failed to run:\n\n```\n{exc}\n```\n")
    result.seconds = time.perf_counter() - started
    return result


def run(ns: argparse.Namespace, workdir: Path) -> tuple[list[MeasureResult], dict[str, str]]:
    from bench import attribution_cost, gateway_load, profiles, scrape, steady, tick

    sizes = SMOKE if ns.smoke else FULL
    missing = missing_optional(ns.assume_missing)
    lib = build_fake_lib(workdir)
    all_ids = kernel_ids(sizes.steady.kernels)
    n_gpu = sizes.steady_gpu_processes
    gpu_ids = [all_ids[round(i * len(all_ids) / n_gpu)] for i in range(n_gpu)]
    extra = max(0, (max(sizes.attribution_sizes) + 1) // 2 - n_gpu)
    results: list[MeasureResult] = []
    with KernelProcesses(workdir) as kp:
        gpu_kernels = kp.spawn(gpu_ids)
        all_kernels = gpu_kernels + kp.spawn(kernel_ids(extra, seed=8)) if extra else gpu_kernels
        plan: list[tuple[str, str, Callable[[], MeasureResult]]] = [
            ("tick", "1. Sampling tick cost vs floor",
             lambda: tick.run(lib, workdir, sizes.tick_gpus, sizes.tick_processes, sizes.tick_reps, sizes.tick_warmup)),
            ("attribution", "2. Attribution cost",
             lambda: attribution_cost.run(all_kernels, workdir, sizes.attribution_sizes, sizes.attribution_reps)),
            ("gateway", "5. Gateway load",
             lambda: gateway_load.run(sizes.gateway_ks, sizes.gateway_gs, sizes.gateway_cycles, sizes.gateway_nodes,
                                      sizes.extrapolate)),
            ("scrape", "6. /metrics scrape latency",
             lambda: scrape.run(sizes.scrape_gpus, sizes.scrape_kernels, sizes.scrapes, "psutil" not in missing)),
            ("steady", "3–4. Daemon steady state and peer",
             lambda: steady.run(lib, workdir, all_ids, gpu_kernels, sizes.steady, missing.get("peer"),
                                "psutil" not in missing)),
            ("profile", "Profiles of the hot paths",
             lambda: profiles.run(lib, workdir, all_ids, gpu_kernels, sizes.steady.gpus, sizes.decide_cycles,
                                  sizes.profile_tick, sizes.profile_ticks, missing.get("profile"))),
        ]
        for key, title, fn in plan:
            if key in ns.only:
                results.append(_guarded(key, title, fn))
    return results, missing


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["soak"]:  # python -m bench soak: its own measure, its own section of RESULTS.md
        from bench import soak

        return soak.main(args[1:])
    ns = parse_args(argv)
    _configure_logging()
    log = structlog.get_logger("bench")
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="reclaimer-bench-"))
    out: Path = ns.out or (Path(tempfile.mkdtemp(prefix="reclaimer-bench-smoke-")) if ns.smoke else BENCH_DIR)
    out.mkdir(parents=True, exist_ok=True)
    try:
        machine = machine_info()
        results, missing = run(ns, scratch)
    finally:
        if ns.keep_workdir:
            log.info("scratch directory kept", path=str(scratch), harness=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)  # ours alone: made by mkdtemp above
    from bench import results as output

    plot_note: str | None = None
    tick_result = next((r for r in results if r.key == "tick" and "points" in r.data), None)
    if tick_result is not None:
        if "plot" in missing:
            tick_result.rows.append(Row("plot", "scaling.png", missing["plot"], "", SKIPPED, "plot not written"))
        else:
            output.plot_scaling(out / "scaling.png", tick_result, machine)
            plot_note = "![tick CPU vs processes](scaling.png)"
    total = time.perf_counter() - started
    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in args)])
    output.write_markdown(out / "RESULTS.md", results, machine, "smoke" if ns.smoke else "full", command, total,
                          plot_note)
    rows = [r for res in results for r in res.rows]
    sys.stdout.write(output.text_table(rows))
    sys.stdout.write(f"\nwrote {out / 'RESULTS.md'} in {total:.0f} s\n")
    failed = [r.measure for r in rows if r.status == "error"]
    if failed:
        log.error("some measures failed to run", measures=failed, harness=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
