"""Run one strategy over one trace in one shape, and sum the books up into the figures RESULTS.md reports."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from bench.replay.trace import Trace
from bench.replay.world import World

HOUR = 3600.0
GIB = float(1 << 30)


class Strategy(Protocol):
    name: str
    period: float

    def describe(self) -> str: ...

    def attach(self, world: World) -> None: ...

    def act(self, now: float) -> None: ...


@dataclass
class Figures:
    strategy: str
    shape: str
    describe: str
    reclaimable_alloc_h: float  # GPU allocation-hours held idle with no culling (intent)
    given_back_alloc_h: float
    held_idle_alloc_h: float
    cut_alloc_h: float  # allocation-hours taken from busy work
    reclaimable_mem_gib_h: float
    given_back_mem_gib_h: float
    actions: int
    releasing_actions: int
    false_reclaims: int
    interruptions: int
    median_idle_to_release_min: float | None
    false_reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def share(self) -> float | None:
        return self.given_back_alloc_h / self.reclaimable_alloc_h if self.reclaimable_alloc_h else None

    @property
    def mem_share(self) -> float | None:
        return self.given_back_mem_gib_h / self.reclaimable_mem_gib_h if self.reclaimable_mem_gib_h else None


def run(trace: Trace, shape: str, strategy: Strategy, *, step: float = 30.0, users_per_node: int = 4) -> Figures:
    """Replay ``trace`` under ``shape`` with ``strategy`` acting every ``strategy.period`` seconds."""
    return figures(simulate(trace, shape, strategy, step=step, users_per_node=users_per_node), strategy)


def simulate(trace: Trace, shape: str, strategy: Strategy, *, step: float = 30.0, users_per_node: int = 4) -> World:
    """The replayed world, its books and every action in them (``run`` sums them up)."""
    world = World(trace, shape, users_per_node=users_per_node, step=step)
    strategy.attach(world)
    sample = getattr(strategy, "sample", None)
    due = world.start + strategy.period
    for now in world.steps():
        world.advance(now)
        if sample is not None:
            sample(now)
        if now >= due:
            strategy.act(now)
            due += strategy.period
        world.account(now, step)
    return world


def _reason_kind(reason: str) -> str:
    if reason.startswith("cell executing"):
        return "cell executing (CPU only)" if "CPU only" in reason else "cell executing"
    return "GPU active in window"


def figures(world: World, strategy: Strategy) -> Figures:
    b = world.books
    mine = [a for a in b.actions if a.strategy == strategy.name]
    false = [a for a in mine if a.false_reason]
    releasing = [a for a in mine if a.releases != "none"]
    idle = [a.idle_for for a in releasing if a.idle_for is not None]
    extra: dict[str, object] = {"releases": dict(Counter(a.releases for a in mine))}
    for attr in ("verdicts", "demotions"):
        if hasattr(strategy, attr):
            extra[attr] = dict(getattr(strategy, attr))
    return Figures(
        strategy=strategy.name, shape=world.shape, describe=strategy.describe(),
        reclaimable_alloc_h=b.reclaimable_alloc / HOUR, given_back_alloc_h=b.given_back_alloc / HOUR,
        held_idle_alloc_h=b.held_idle_alloc / HOUR, cut_alloc_h=b.cut_alloc / HOUR,
        reclaimable_mem_gib_h=b.reclaimable_mem / HOUR / GIB, given_back_mem_gib_h=b.given_back_mem / HOUR / GIB,
        actions=len(mine), releasing_actions=len(releasing), false_reclaims=len(false), interruptions=b.interruptions,
        median_idle_to_release_min=statistics.median(idle) / 60 if idle else None,
        false_reasons=dict(Counter(_reason_kind(a.false_reason) for a in false)), extra=extra,
    )
