"""Invariants 10 onwards (docs/safety.md) at the policy level: table tests with ids, then Hypothesis properties.

Each test changes one thing in the reclaimable default world of tests/support/policy_fixtures.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from reclaimer.model import ActionKind, Candidate, Decision, PolicyState, SamplerSnapshot, Verdict
from reclaimer.policy import decide, remember
from tests.support.policy_fixtures import (
    NOW,
    WARNED,
    activity,
    kernel,
    make_settings,
    policy,
    series,
    snapshot,
    utc,
)

NO_LIMITS = {"max_actions_per_cycle": 100, "cooldown": "10m", "max_fraction_per_cycle": 1.0, "breaker_min_reclaims": 0}


def decide_one(c: Candidate, snap: SamplerSnapshot | None = None, state: PolicyState = WARNED, **top) -> Decision:
    settings = make_settings(limits=NO_LIMITS, **top)
    [d] = decide([c], snap or snapshot(), settings, NOW, state)
    return d


# --------------------------------------------------------------------------- 11. warn, then wait


@pytest.mark.parametrize(
    "idle_for, warned_at, verdict, eta, reason_tail",
    [
        pytest.param(2 * 3600, None, Verdict.WARN, 300.0, "shutdown-kernel in 5m (warning now)",
                     id="idle-for-hours-never-warned"),
        pytest.param(2 * 3600, NOW - 60, Verdict.WARN, 240.0, "shutdown-kernel in 4m (warned at 22:12:20 UTC)",
                     id="warned-a-minute-ago"),
        pytest.param(2 * 3600, NOW - 300, Verdict.RECLAIM, 0.0, "shutdown-kernel in 0s (warned at 22:08:20 UTC)",
                     id="warned-exactly-warn-before-ago"),
        pytest.param(2 * 3600, NOW, Verdict.WARN, 300.0, "shutdown-kernel in 5m (warning now)",
                     id="warned-this-cycle-is-not-earlier"),
        pytest.param(2 * 3600, NOW + 600, Verdict.WARN, 300.0, "shutdown-kernel in 5m (warning now)",
                     id="warning-from-the-future-clock-stepped-back"),
        pytest.param(26 * 60, None, Verdict.WARN, 300.0, "shutdown-kernel in 5m (warning now)",
                     id="entering-the-warning-window-waits-warn-before-not-the-rest-of-the-window"),
        pytest.param(27 * 60, NOW - 240, Verdict.WARN, 180.0, "shutdown-kernel in 3m (warned at 22:09:20 UTC)",
                     id="window-ends-after-the-warning-wait"),
        pytest.param(20 * 60, None, Verdict.KEEP, 600.0, "shutdown-kernel in 10m", id="before-the-warning-window"),
    ],
)
def test_invariant_11_warn_then_wait(idle_for: float, warned_at: float | None, verdict: Verdict, eta: float,
                                     reason_tail: str) -> None:
    state = PolicyState() if warned_at is None else PolicyState(warned_at={kernel().key: warned_at})
    d = decide_one(kernel(act=activity(idle_for=idle_for)), state=state)
    assert (d.verdict, d.eta_seconds) == (verdict, eta)
    assert d.reason.endswith(reason_tail), d.reason
    if verdict is Verdict.KEEP:
        assert d.warned_at is None
    else:  # the warning time this episode carries into the next cycle
        assert d.warned_at == (NOW if warned_at is None or warned_at >= NOW else warned_at)


def test_invariant_11_warn_then_wait_even_with_no_warning_time() -> None:
    """warn_before 0: still never in the cycle that warns."""
    settings = {"policies": [policy("p", idle_after="30m", warn_before="0s")]}
    d = decide_one(kernel(), state=PolicyState(), **settings)
    assert (d.verdict, d.eta_seconds, d.warned_at) == (Verdict.WARN, 0.0, NOW)
    d2 = decide_one(kernel(), state=PolicyState(warned_at={kernel().key: NOW - 15}), **settings)
    assert d2.verdict is Verdict.RECLAIM


@pytest.mark.parametrize(
    "verdict_of, before, after",
    [
        pytest.param("warn", {}, {"k": NOW}, id="first-warning-starts-the-episode"),
        pytest.param("warn", {"k": NOW - 100}, {"k": NOW - 100}, id="episode-keeps-its-first-warning"),
        pytest.param("unknown", {"k": NOW - 100}, {"k": NOW - 100}, id="unknown-is-not-busy"),
        pytest.param("busy", {"k": NOW - 100}, {}, id="busy-ends-the-episode"),
        pytest.param("exempt", {"k": NOW - 100}, {}, id="exempt-ends-the-episode"),
        pytest.param("gone", {"k": NOW - 100}, {}, id="gone-is-forgotten"),
    ],
)
def test_invariant_11_warn_then_wait_episode_state(verdict_of: str, before: dict, after: dict) -> None:
    c = dataclasses.replace(kernel(), key="k")
    decisions = {
        "warn": [Decision(c, Verdict.WARN, ActionKind.SHUTDOWN_KERNEL, "", "p", 1700.0, 100.0,
                          warned_at=before.get("k", NOW))],
        "unknown": [Decision(c, Verdict.UNKNOWN, ActionKind.NONE, "gateway eg error")],
        "busy": [Decision(c, Verdict.KEEP, ActionKind.SHUTDOWN_KERNEL, "kernel busy", "p", 0.0)],
        "exempt": [Decision(c, Verdict.EXEMPT, ActionKind.NONE, "exempt: namespace kube-system")],
        "gone": [],
    }[verdict_of]
    assert dict(remember(PolicyState(warned_at=before), decisions, NOW).warned_at) == after


def test_invariant_11_warn_then_wait_blocked_target_keeps_its_episode() -> None:
    """A reclaim held back by a busy neighbour in the same pod is not a new episode (no second warning)."""
    busy = kernel("6f1c2a3b-0000-4000-8000-000000000009", act=activity("6f1c2a3b-0000-4000-8000-000000000009",
                                                                       state="busy"))
    settings = make_settings(policies=[policy("p", action="evict-pod")], limits=NO_LIMITS)
    decisions = decide([kernel(), busy], snapshot(), settings, NOW, WARNED)
    held = next(d for d in decisions if d.candidate.key == kernel().key)
    assert held.verdict is Verdict.KEEP and "would also end" in held.reason
    assert remember(PolicyState(), decisions, NOW).warned_at == {kernel().key: held.warned_at}


# A cycle: seconds since the previous one, the kernel's state at the gateway, and whether the daemon restarted.
_cycle = st.tuples(st.floats(1, 200), st.sampled_from(["idle", "busy", "unknown"]), st.booleans())


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cycles=st.lists(_cycle, min_size=1, max_size=25), idle_since=st.floats(0, 4 * 3600))
def test_invariant_11_property_reclaim_only_warn_before_after_a_warning_of_the_same_episode(
    cycles: list[tuple[float, str, bool]], idle_since: float
) -> None:
    """Whatever the cycle spacing, busy spells, unknown answers and restarts: every reclaim follows a warning that an
    earlier cycle of the same idle episode (since the last restart, no busy cycle in between) gave warn_before ago."""
    settings = make_settings(policies=[policy("p", idle_after="10m", warn_before="2m")], limits=NO_LIMITS)
    history = series(start=NOW - 6 * 3600, end=NOW + 2 * 3600, interval=60.0)
    t = NOW - 4 * 3600
    last_busy = t - idle_since
    state = PolicyState()
    warnings: list[float] = []  # times of the warnings of the current episode
    for gap, gateway_state, restart in cycles:
        t += gap
        if restart:
            state, warnings = PolicyState(), []
        if gateway_state == "busy":
            last_busy = t
        act = activity(state=gateway_state if gateway_state != "unknown" else "idle", observed_at=t - 1,
                       error="timeout" if gateway_state == "unknown" else None)
        act = dataclasses.replace(act, last_activity=utc(last_busy))
        snap = snapshot(tuple(s for s in history if s.timestamp <= t), interval=60.0, started_at=NOW - 6 * 3600)
        [d] = decide([kernel(act=act)], snap, settings, t, state)
        if d.verdict is Verdict.RECLAIM:
            assert warnings and warnings[0] < t and t - warnings[0] >= 120.0, (t, warnings, d.reason)
            assert d.warned_at == warnings[0]
        if d.warned_at is not None and d.warned_at == t:
            warnings.append(t)
        elif d.warned_at is None and d.verdict is not Verdict.UNKNOWN:
            warnings = []
        state = remember(state, [d], t)
