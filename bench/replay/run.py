"""The line-up: every strategy over every shape, in parallel processes (each run is independent and seeded)."""

from __future__ import annotations

import multiprocessing
import typing
from collections.abc import Sequence
from dataclasses import dataclass

from bench.replay import cullers
from bench.replay.ours import RELEASING_ACTION, Ours
from bench.replay.sim import Figures, Strategy, run
from bench.replay.trace import Trace
from bench.replay.world import SHAPES
from reclaimer.core.config import PolicySettings

STRATEGY_KEYS = ("none", "jupyter", "jupyter-connected", "kubeflow", "kubeflow-default", "hub", "gpu-util", "ours-default", "ours-auto",
                 "ours-auto-1h", "ours-aggressive")


def auto_on_main() -> bool:
    """Whether the policy accepts ``action: auto`` (the action that releases the allocation where it can)."""
    return "auto" in typing.get_args(PolicySettings.model_fields["action"].annotation)


def strategy(key: str, shape: str, step: float) -> Strategy:
    """A fresh strategy object (they keep state per run)."""
    if key == "none":
        return cullers.NoCulling()
    if key == "jupyter":
        return cullers.JupyterServerCuller(3600.0)
    if key == "jupyter-connected":
        return cullers.JupyterServerCuller(3600.0, cull_connected=True)
    if key == "kubeflow":
        return cullers.KubeflowCuller(3600.0)
    if key == "kubeflow-default":  # CULL_IDLE_TIME's default: one day
        return cullers.KubeflowCuller(86400.0)
    if key == "hub":
        return cullers.HubIdleCuller(3600.0)
    if key == "gpu-util":
        return cullers.GpuUtilCuller(1800.0)
    releasing = "auto" if auto_on_main() else RELEASING_ACTION[shape]
    if key == "ours-default":
        return Ours("ours default", [{"name": "default"}], sample_interval=step, decide_interval=step)
    if key == "ours-auto":
        name = "ours auto" if auto_on_main() else "ours best action"
        return Ours(name, [{"name": "default", "action": releasing}], sample_interval=step, decide_interval=step)
    if key == "ours-auto-1h":  # the same window as the anchors (1 h), for a like-for-like comparison
        name = ("ours auto" if auto_on_main() else "ours best action") + " 1h"
        policy = {"name": "default", "action": releasing, "idle_after": "1h", "warn_before": "10m"}
        return Ours(name, [policy], sample_interval=step, decide_interval=step)
    if key == "ours-aggressive":
        policy = {"name": "aggressive", "action": releasing, "idle_after": "10m", "warn_before": "2m",
                  "gpu_idle_below": 0.1}
        return Ours("ours aggressive", [policy], sample_interval=step, decide_interval=step)
    raise ValueError(f"unknown strategy {key!r} (one of {', '.join(STRATEGY_KEYS)})")


@dataclass(frozen=True)
class Job:
    trace: Trace
    shape: str
    key: str
    step: float
    users_per_node: int


def _run(job: Job) -> Figures:
    return run(job.trace, job.shape, strategy(job.key, job.shape, job.step), step=job.step,
               users_per_node=job.users_per_node)


def run_all(trace: Trace, *, shapes: Sequence[str] = SHAPES, keys: Sequence[str] = STRATEGY_KEYS,
            step: float = 60.0, users_per_node: int = 4, jobs: int = 2) -> list[Figures]:
    """Figures for every (shape, strategy), in a stable order; ``jobs`` worker processes (1: in this process)."""
    work = [Job(trace, shape, key, step, users_per_node) for shape in shapes for key in keys]
    # The slow runs (ours: the real policy every cycle) first, so the pool stays busy to the end.
    order = sorted(range(len(work)), key=lambda i: not work[i].key.startswith("ours"))
    if jobs <= 1:
        results = {i: _run(work[i]) for i in order}
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(jobs) as pool:
            done = pool.map(_run, [work[i] for i in order], chunksize=1)
        results = dict(zip(order, done))
    return [results[i] for i in range(len(work))]
