"""What each decide cycle adds to the cumulative metrics: GPU-seconds held idle, actions taken, breaker trips."""

from __future__ import annotations

from collections.abc import Sequence

from reclaimer.core import policy
from reclaimer.core.config import Settings
from reclaimer.core.model import ActionResult, CycleSnapshot, Decision
from reclaimer.core.views import allocation_holdings, candidate_namespace, held_idle_increments
from reclaimer.export.metrics import Metrics


class ExportAccounting:
    """Adds one cycle at a time to the counters of ``metrics``; remembers when the previous cycle ran, so each
    sample counts once (the held-idle counters cover the samples taken since then)."""

    def __init__(self, metrics: Metrics, settings: Settings) -> None:
        self.metrics = metrics
        self.settings = settings
        self.previous_at: float | None = None  # generated_at of the last cycle accounted

    def threshold(self, d: Decision) -> float:
        return policy.idle_threshold(self.settings, d.policy)

    def record(self, snap: CycleSnapshot, results: Sequence[ActionResult]) -> None:
        prev = self.previous_at
        self.metrics.add_held_idle(
            held_idle_increments(prev, snap, self.threshold),
            held_idle_increments(prev, snap, self.threshold, allocation_holdings),
        )
        self.metrics.forget_quiet_namespaces(
            {candidate_namespace(d.candidate) for d in snap.decisions}, snap.generated_at
        )
        for r in results:
            self.metrics.record_action(r)
        if snap.breaker.new_trip:
            self.metrics.record_breaker_trip(snap.breaker)
        self.previous_at = snap.generated_at
