"""``python -m bench.replay``: replay a fleet through every strategy and shape; write RESULTS.md and replay.png.

By default it generates the fleet (``--users``, ``--days``, ``--seed``); ``--trace FILE`` replays a recorded
trace instead (format: bench/replay/trace.py), ``--write-trace FILE`` saves the generated one. ``--smoke`` is a
tiny run into a temporary directory (what tests/test_replay.py runs). Exit code 0, or 2 for a bad trace/usage.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.replay import generate as gen
from bench.replay import report
from bench.replay.run import STRATEGY_KEYS, auto_on_main, run_all
from bench.replay.trace import Trace, TraceError, load, save
from bench.replay.world import SHAPES

REPLAY_DIR = Path(__file__).resolve().parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=24, help="users in the generated fleet (default 24)")
    p.add_argument("--days", type=int, default=7, help="days, starting on a Monday (default 7)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    p.add_argument("--trace", type=Path, help="replay this trace file instead of generating one")
    p.add_argument("--write-trace", type=Path, help="also save the generated trace here")
    p.add_argument("--step", type=float, default=60.0,
                   help="simulation step = sample and decide interval of our daemon, in seconds (default 60)")
    p.add_argument("--users-per-node", type=int, default=4, help="users sharing one GPU node (default 4)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated (default {','.join(SHAPES)})")
    p.add_argument("--only", default=",".join(STRATEGY_KEYS), help=f"strategies (default {','.join(STRATEGY_KEYS)})")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--out", type=Path, help="where RESULTS.md and replay.png go (default bench/replay/, or a "
                                            "temporary directory with --smoke)")
    p.add_argument("--no-plot", action="store_true", help="do not draw replay.png (as when matplotlib is missing)")
    p.add_argument("--smoke", action="store_true", help="tiny fleet (4 users x 2 days), for the test suite")
    ns = p.parse_args(argv)
    ns.shapes = [s for s in ns.shapes.split(",") if s]
    ns.only = [k for k in ns.only.split(",") if k]
    for name, values, allowed in (("--shapes", ns.shapes, SHAPES), ("--only", ns.only, STRATEGY_KEYS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if ns.smoke:
        ns.users, ns.days = min(ns.users, 4), min(ns.days, 2)
    if ns.users < 1 or ns.days < 1 or ns.step <= 0 or ns.users_per_node < 1:
        p.error("--users, --days, --users-per-node and --step must be positive")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    started = time.perf_counter()
    trace: Trace
    if ns.trace is not None:
        try:
            trace = load(ns.trace)
        except (OSError, TraceError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        fleet = f"trace `{ns.trace.name}`: {trace.header.description or 'no description'}"
    else:
        params = gen.FleetParams(users=ns.users, days=ns.days, seed=ns.seed)
        trace = gen.generate(params)
        fleet = (f"generated, {ns.users} users x {ns.days} days from Monday 00:00 UTC, seed {ns.seed} "
                 f"(`bench/replay/generate.py`, default behaviour odds), {ns.users_per_node} users per node, "
                 f"{len(trace.records):,} records")
        if ns.write_trace is not None:
            save(trace, ns.write_trace)
    fleet += f"; simulated in {ns.step:g} s steps (our daemon samples and decides every step)."
    figs = run_all(trace, shapes=ns.shapes, keys=ns.only, step=ns.step, users_per_node=ns.users_per_node,
                   jobs=ns.jobs)
    out: Path = ns.out or (Path(tempfile.mkdtemp(prefix="reclaimer-replay-")) if ns.smoke else REPLAY_DIR)
    out.mkdir(parents=True, exist_ok=True)
    plot_note = None
    if not ns.no_plot:
        try:
            report.plot(out / "replay.png", figs)
            plot_note = "![share given back and its cost, per strategy and shape](replay.png)"
        except ImportError:
            plot_note = "(replay.png not drawn: matplotlib is not installed; `pip install .[bench]`)"
    from bench.common import machine_info

    machine = machine_info()
    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.replay", *(shlex.quote(a) for a in args)])
    auto_note = ("`ours auto` uses the policy's `action: auto`." if auto_on_main() else
                 "`action: auto` is not on main yet: `ours best action` uses the action that releases the "
                 "allocation in each shape (stop-server for kernels inside notebook pods, shutdown-kernel for "
                 "kernel pods), which is what `auto` is specified to choose.")
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    report.write_markdown(out / "RESULTS.md", figs, command=command, machine=machine, fleet=fleet,
                          seconds=time.perf_counter() - started, cpu_seconds=cpu, plot=plot_note, auto_note=auto_note)
    sys.stdout.write(report.text_table(figs))
    sys.stdout.write(f"wrote {out / 'RESULTS.md'} in {time.perf_counter() - started:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
