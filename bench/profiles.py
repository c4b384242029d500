"""Profiles of the hot paths (pyinstrument): the sampling tick, and one decide cycle of the real Daemon.

The decide cycle runs in its own process with the fake NVML, against two fake gateways in the harness and real
kernel stand-in processes, exactly as ``reclaimer run`` builds it (``build_adapters`` + ``Daemon``). For the
profile only, the cycle's ``asyncio.to_thread`` hops run inline so pyinstrument (which samples one thread) sees
attribution too; CPU and wall per cycle are measured separately, unprofiled and with the real thread hops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import tick
from bench.common import (
    INFO,
    FakeLib,
    KernelProcess,
    MeasureResult,
    Row,
    child_env,
    fmt_ms,
    median,
    node_state,
    run_worker,
    stage,
    write_fake_state,
)
from bench.fake_gateways import TOKEN, TOKEN_ENV, GatewaysInThread


def run(lib: FakeLib, workdir: Path, all_kernel_ids: Sequence[str], gpu_kernels: Sequence[KernelProcess],
        gpus: int, cycles: int, tick_size: tuple[int, int], ticks: int, missing: str | None) -> MeasureResult:
    """Decide-cycle CPU/wall (always) and the pyinstrument profiles (unless ``missing`` says why not)."""
    result = MeasureResult("profile", "Profiles of the hot paths")
    state = workdir / "profile-nvml.conf"
    write_fake_state(state, **node_state(gpus, [k.pid for k in gpu_kernels], 0))
    half = len(all_kernel_ids) // 2
    with stage("decide cycle", cycles=cycles), GatewaysInThread([all_kernel_ids[:half], all_kernel_ids[half:]]) as gws:
        args = {"lib": str(lib.lib_path), "urls": [g.url for g in gws.gateways], "cycles": cycles,
                "profile": missing is None}
        out = run_worker("bench.profiles", args, child_env(lib, state, {TOKEN_ENV: TOKEN}), timeout=300)
    result.data["decide"] = {k: v for k, v in out.items() if k != "profile"}
    result.rows.append(Row("decide", f"decide cycle, {gpus} GPUs × {len(gpu_kernels)} procs, "
                           f"{len(all_kernel_ids)} kernels (CPU / wall)",
                           f"{fmt_ms(out['cycle_cpu'])} / {fmt_ms(out['cycle_wall'])}", "", INFO,
                           f"{out['candidates']} candidates; {out['cycle_cpu'] / 15 * 100:.3f}% of a core at 15 s"))
    parts = [
        f"Decide cycle (`Daemon.cycle`, {gpus} GPUs, {len(gpu_kernels)} GPU processes, {len(all_kernel_ids)} kernels "
        f"on 2 gateways, dry-run): median over {cycles} cycles, CPU {fmt_ms(out['cycle_cpu'])} (process time: "
        f"includes the attribution thread), wall {fmt_ms(out['cycle_wall'])}, {out['candidates']} candidates.\n"
    ]
    if missing is not None:
        parts.append(f"\nProfiles skipped: {missing}.\n")
        result.rows.append(Row("profile", "pyinstrument profiles", missing, "", "skipped"))
    else:
        with stage("tick profile", size=tick_size, ticks=ticks):
            tick_text = tick.profile(lib, workdir, tick_size[0], tick_size[1], ticks)
        parts.append(f"\nSampling tick, {tick_size[0]} GPUs × {tick_size[1]} processes, {ticks} ticks "
                     f"(pyinstrument, 0.1 ms interval):\n\n```\n{tick_text}\n```\n")
        parts.append(f"\nDecide cycle, {cycles} cycles (to_thread inlined for the profile):\n\n"
                     f"```\n{out['profile']}\n```\n")
    result.markdown = "".join(parts)
    return result


# --------------------------------------------------------------------------- the worker (own process, fake NVML)


def _settings(args: dict[str, Any]) -> Any:
    from reclaimer.core.config import parse_settings

    gateways = "\n".join(f"  - {{name: gw-{i}, url: \"{u}\", kind: kernel-gateway, token_env: {TOKEN_ENV}}}"
                         for i, u in enumerate(args["urls"]))
    return parse_settings(
        "mode: dry-run\nnode_name: bench-node\nlisten: 127.0.0.1:0\nsample_interval: 1s\ndecide_interval: 15s\n"
        f"gpu: {{backend: nvml, library_path: \"{args['lib']}\"}}\ngateways:\n{gateways}\n"
        "kubernetes: {enabled: false}\nlog_level: warning\n"
    )


async def _cycles(args: dict[str, Any]) -> dict[str, Any]:
    from reclaimer.app.daemon import Daemon, build_adapters
    from reclaimer.export.logs import configure_logging

    configure_logging("warning")
    settings = _settings(args)
    daemon = Daemon(settings, build_adapters(settings))
    assert daemon.sampler is not None
    for _ in range(5):
        daemon.sampler.tick()
    try:
        snap, _ = await daemon.cycle()  # discovery: the gateways' listings, cold attribution
        cpu, wall = [], []
        for _ in range(int(args["cycles"])):
            daemon.sampler.tick()
            c0, w0 = time.process_time(), time.perf_counter()
            snap, _ = await daemon.cycle()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        out: dict[str, Any] = {"cycle_cpu": median(cpu), "cycle_wall": median(wall), "candidates": len(snap.decisions)}
        if args.get("profile"):
            out["profile"] = await _profile(daemon, int(args["cycles"]))
        return out
    finally:
        await daemon.close()


async def _profile(daemon: Any, cycles: int) -> str:
    from pyinstrument import Profiler

    async def inline(fn: Any, *fn_args: Any, timeout: float, what: str) -> Any:
        return fn(*fn_args)

    for worker in daemon.pipeline.stages.values():  # profile only: pyinstrument samples one thread
        worker.call = inline
    profiler = Profiler(interval=0.0001, async_mode="enabled")
    for _ in range(cycles):
        daemon.sampler.tick()
        profiler.start()
        await daemon.cycle()
        profiler.stop()
    return tick._render_profile(profiler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="bench worker: decide-cycle cost and profile (run by `python -m bench`)")
    parser.add_argument("--worker", required=True, help="JSON arguments")
    ns = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_cycles(json.loads(ns.worker)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
