"""Bounded label values with no vocabulary module of their own: why the circuit breaker tripped (the ``cause`` label)
and the namespace of GPUs held outside Kubernetes."""

from __future__ import annotations

from typing import Final

# Why the circuit breaker tripped: most would-be reclaims turned reclaimable within one cycle (a gateway answering
# "idle" for everything, idle clocks reset together by a restart, a sampler gap or an outage), or they became
# reclaimable over several cycles (a node that is genuinely mostly idle).
BREAKER_MASS_FLIP: Final = "mass-flip"
BREAKER_SUSTAINED: Final = "sustained"
BREAKER_CAUSES: tuple[str, ...] = (BREAKER_MASS_FLIP, BREAKER_SUSTAINED)

NO_NAMESPACE: Final = "-"  # namespace label value for GPUs held outside Kubernetes (not a valid namespace name)
