"""Invariants 10 onwards (docs/safety.md) at the policy level: table tests with ids, then Hypothesis properties.

Each test changes one thing in the reclaimable default world of tests/support/policy_fixtures.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from reclaimer.core.candidates import join
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import Candidate, Decision, GpuSample, PodGpuAllocation, PolicyState, ProcessSample, SamplerSnapshot
from reclaimer.core.policy import decide, fold_presence, remember
from tests.support.policy_fixtures import (
    GIB,
    KID,
    KID2,
    NODE,
    NOW,
    POD_UID,
    STARTED,
    UUID0,
    UUID1,
    WARNED,
    activity,
    kernel,
    make_settings,
    pod,
    pod_candidate,
    policy,
    process,
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


# --------------------------------------------------------------------------- 10. idle time is bounded by holding time


# Pod candidates (no process, no kernel) are judged only where the policy opts in to bare allocations (invariant 12).
EVICT = {"policies": [policy("p", action="evict-pod", reclaim_bare_allocations=True)]}


@pytest.mark.parametrize(
    "candidate, top, verdict, idle, reason_part",
    [
        pytest.param(kernel(held_since=NOW - 5), {}, Verdict.KEEP, 5.0,
                     "kernel idle since 20:13 UTC; its GPU process first seen at 22:13:15 UTC; shutdown-kernel in 29m55s",
                     id="kernel-idle-for-hours-whose-process-appeared-one-sample-ago"),
        pytest.param(kernel(held_since=NOW - 26 * 60), {}, Verdict.WARN, 26 * 60.0,
                     "its GPU process first seen at 21:47:20 UTC; shutdown-kernel in 4m", id="kernel-held-26m-warns"),
        pytest.param(kernel(held_since=NOW - 30 * 60), {}, Verdict.RECLAIM, 30 * 60.0,
                     "its GPU process first seen at 21:43:20 UTC; shutdown-kernel in 0s", id="kernel-held-the-whole-window"),
        pytest.param(kernel(held_since=STARTED - 3600), {}, Verdict.RECLAIM, 2 * 3600.0,
                     "kernel idle since 20:13 UTC; shutdown-kernel in 0s", id="held-longer-than-idle-changes-nothing"),
        pytest.param(kernel(held_since=None), {}, Verdict.UNKNOWN, None,
                     "when the kernel's GPU processes first appeared is unknown (not in the sampler's record)",
                     id="kernel-holding-time-unknown"),
        pytest.param(pod_candidate(held_since=NOW - 60), EVICT, Verdict.KEEP, 60.0,
                     "pod team-a/jupyter-alice first seen holding the GPU at 22:12:20 UTC; evict-pod in 29m",
                     id="pod-just-allocated-a-long-free-gpu"),
        pytest.param(pod_candidate(dataclasses.replace(pod(), started_at=NOW - 120), held_since=NOW - 120), EVICT,
                     Verdict.KEEP, 120.0, "pod team-a/jupyter-alice started at 22:11:20 UTC", id="pod-started-2m-ago"),
        pytest.param(pod_candidate(held_since=None), EVICT, Verdict.UNKNOWN, None,
                     "when pod team-a/jupyter-alice was first seen holding its GPU allocation is unknown",
                     id="pod-holding-time-unknown"),
        pytest.param(pod_candidate(dataclasses.replace(pod(), phase="Pending", started_at=None)), EVICT, Verdict.KEEP,
                     None, "pod team-a/jupyter-alice is 'Pending', not Running", id="pending-pod"),
        pytest.param(pod_candidate(dataclasses.replace(pod(), phase=None)), EVICT, Verdict.KEEP, None,
                     "pod team-a/jupyter-alice is in an unknown phase, not Running", id="pod-phase-unknown"),
        pytest.param(pod_candidate(dataclasses.replace(pod(), deleting=True)), EVICT, Verdict.KEEP, None,
                     "pod team-a/jupyter-alice is terminating (deletionTimestamp set)", id="terminating-pod"),
        pytest.param(pod_candidate(dataclasses.replace(pod(), containers_running=False)), EVICT, Verdict.KEEP, None,
                     "pod team-a/jupyter-alice has containers that have not started", id="containers-not-started"),
        pytest.param(pod_candidate(dataclasses.replace(pod(), containers_running=None)), EVICT, Verdict.KEEP, None,
                     "has containers that have not started", id="container-state-unknown"),
        pytest.param(kernel(pod_info=dataclasses.replace(pod(), deleting=True)), EVICT, Verdict.KEEP, None,
                     "is terminating", id="kernel-in-terminating-pod-is-not-evicted"),
        pytest.param(kernel(pod_info=dataclasses.replace(pod(), deleting=True)), {}, Verdict.RECLAIM, 7200.0,
                     "shutdown-kernel in 0s", id="kernel-in-terminating-pod-may-still-be-shut-down"),
    ],
)
def test_invariant_10_idle_bounded_by_holding_time(candidate: Candidate, top: dict, verdict: Verdict,
                                                   idle: float | None, reason_part: str) -> None:
    d = decide_one(candidate, **top)
    assert d.verdict is verdict, d.reason
    assert reason_part in d.reason, d.reason
    if idle is not None:
        assert d.idle_seconds == idle


def _gs(ts: float, pids: tuple[int, ...] | None = (), up: bool = True) -> GpuSample:
    procs = None if pids is None else tuple(ProcessSample(p, GIB) for p in pids)
    return GpuSample(ts, 0, UUID0, up, 0.0 if up else None, GIB, 80 * GIB, procs)


@pytest.mark.parametrize(
    "samples, first_seen",
    [
        pytest.param([_gs(0, (1,)), _gs(5, (1,)), _gs(10, (1, 2))], {1: 0, 2: 10}, id="counted-from-the-first-sample"),
        pytest.param([_gs(0, (1,)), _gs(5, ()), _gs(10, (1,))], {1: 10}, id="gone-and-back-starts-again"),
        pytest.param([_gs(0, (1,)), _gs(5, None), _gs(10, (1,))], {1: 10}, id="unknown-process-list-breaks-presence"),
        pytest.param([_gs(0, (1,)), _gs(5, (1,), up=False), _gs(10, (1,))], {1: 10}, id="gpu-down-breaks-presence"),
        pytest.param([_gs(0, (1,)), _gs(20, (1,))], {1: 20}, id="sampling-gap-breaks-presence"),
        pytest.param([_gs(0, (1,)), _gs(15, (1,))], {1: 0}, id="three-intervals-is-not-a-gap"),
        pytest.param([_gs(10, (1,)), _gs(5, (1,))], {1: 5}, id="clock-stepped-back"),
        pytest.param([_gs(0, (1, 2)), _gs(5, (2,))], {2: 0}, id="pruned-to-the-pids-listed"),
    ],
)
def test_invariant_10_first_sighting_per_gpu(samples: list[GpuSample], first_seen: dict[int, float]) -> None:
    state = None
    for s in samples:
        state = fold_presence(state, s, 5.0)
    assert state is not None and dict(state.first_seen) == first_seen


def test_invariant_10_first_sighting_is_shared_while_the_pids_do_not_change() -> None:
    a = fold_presence(None, _gs(0, (1, 2)), 5.0)
    b = fold_presence(a, _gs(5, (2, 1)), 5.0)
    assert b.first_seen is a.first_seen  # no new mapping per tick while nothing changes (cheap at 1 Hz x 64 processes)


@pytest.mark.parametrize(
    "first_seen, started_at, held_since",
    [
        pytest.param({UUID0: {4242: NOW - 600}, UUID1: {4243: NOW - 60}}, None, NOW - 60, id="newest-process-bounds"),
        pytest.param({UUID0: {4242: NOW - 600}, UUID1: {4243: NOW - 60}}, NOW - 30, NOW - 30,
                     id="a-process-that-started-after-its-pid-was-listed-counts-from-its-start"),
        pytest.param({UUID0: {4242: NOW - 600}}, None, None, id="a-process-not-in-the-record-is-unknown"),
        pytest.param(None, None, None, id="no-record-is-unknown"),
    ],
)
def test_invariant_10_join_kernel_held_since(first_seen: dict | None, started_at: float | None,
                                             held_since: float | None) -> None:
    procs = [process(4242, UUID0), dataclasses.replace(process(4243, UUID1), started_at=started_at)]
    (c,) = join(node=NODE, processes=procs, pods_by_uid={POD_UID: pod()}, allocations=None,
                activities={KID: activity()}, first_seen=first_seen).candidates
    assert c.held_since == held_since


@pytest.mark.parametrize(
    "seen, started_at, held_since",
    [
        pytest.param({POD_UID: NOW - 60}, STARTED, NOW - 60, id="first-cycle-that-saw-the-allocation"),
        pytest.param({POD_UID: STARTED}, NOW - 30, NOW - 30, id="never-before-the-pod-started"),
        pytest.param({}, STARTED, None, id="allocation-not-seen-yet"),
    ],
)
def test_invariant_10_join_pod_held_since(seen: dict, started_at: float, held_since: float | None) -> None:
    alloc = [PodGpuAllocation("team-a", "jupyter-alice", "notebook", (UUID0,))]
    p = dataclasses.replace(pod(), started_at=started_at)
    (c,) = join(node=NODE, processes=[], pods_by_uid={POD_UID: p}, allocations=alloc, activities={},
                allocation_seen=seen).candidates
    assert (c.key, c.held_since) == (f"pod:{POD_UID}", held_since)


# One sample of GPU 0's history: (kernel process listed?, process list readable?, GPU utilisation, gap before it?)
_sample = st.tuples(st.booleans(), st.booleans(), st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.5]), st.booleans())


@hyp_settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(_sample, max_size=30),
    quiet=st.integers(0, 300),
    held=st.integers(1, 250),
    after=st.lists(_sample, max_size=4),
    kernel_idle_for=st.floats(0, 6 * 3600),
    process_age=st.floats(0, 24 * 3600),
)
def test_invariant_10_property_no_reclaim_before_idle_after_since_the_candidate_first_held_the_gpu(
    before: list[tuple[bool, bool, float, bool]], quiet: int, held: int, after: list[tuple[bool, bool, float, bool]],
    kernel_idle_for: float, process_age: float,
) -> None:
    """Whatever GPU 0 did before (busy, unreadable, gaps, the process coming and going, then a quiet stretch with no
    process) and however old the kernel's process is: through the real sampler fold, join and policy, a reclaim needs
    idle_after since the first sample of the process's current unbroken presence on the GPU."""
    history = [*before, *[(False, True, 0.0, False)] * quiet, *[(True, True, 0.0, False)] * held, *after]
    _check_holding_bound(history, kernel_idle_for, process_age)


def _check_holding_bound(
    history: list[tuple[bool, bool, float, bool]], kernel_idle_for: float, process_age: float
) -> None:
    """Whatever GPU 0 did before (idle for hours, busy, unreadable, gaps) and however old the kernel's process is:
    through the real sampler fold, join and policy, a reclaim needs idle_after since the first sample of the
    process's current unbroken presence on the GPU."""
    settings = make_settings(policies=[policy("p", idle_after="10m", warn_before="2m")], limits=NO_LIMITS)
    interval = 5.0
    t = NOW - 3 * 3600
    samples: list[GpuSample] = []
    presence = None
    held_from: float | None = None  # the first sample of the process's current unbroken presence
    for listed, readable, util, gap in history:
        t += interval * (5 if gap else 1)
        procs = None if not readable else ((ProcessSample(4242, GIB),) if listed else ())
        s = GpuSample(t, 0, UUID0, True, util, GIB, 80 * GIB, procs)
        samples.append(s)
        presence = fold_presence(presence, s, interval)
        held_from = (held_from if held_from is not None and not gap else t) if listed and readable else None
    now = t + 1
    if held_from is None:
        return  # the process is not on the GPU now: no kernel candidate
    snap = snapshot(tuple(samples), interval=interval, started_at=NOW - 3 * 3600 - interval)
    snap = dataclasses.replace(snap, first_seen={UUID0: presence.first_seen})
    proc = dataclasses.replace(process(4242, UUID0), started_at=now - process_age)
    act = activity(observed_at=now - 1, idle_for=None)
    act = dataclasses.replace(act, last_activity=utc(now - kernel_idle_for))
    joined = join(node=NODE, processes=[proc], pods_by_uid={POD_UID: pod()}, allocations=None,
                  activities={KID: act}, first_seen=snap.first_seen)
    [d] = decide(joined.candidates, snap, settings, now, WARNED)
    if d.verdict is Verdict.RECLAIM:
        assert now - held_from >= 600.0, (now - held_from, d.reason)
    assert d.idle_seconds is None or d.idle_seconds <= now - held_from


# --------------------------------------------------------------------------- 15. an unreadable GPU taints

LIST_ERR = ("nvmlDeviceGetComputeRunningProcesses_v3:UNKNOWN",)


def _gpu1(**patch_at: dict) -> tuple[GpuSample, ...]:
    return series(UUID1, 1, patch={ts: fields for ts, fields in patch_at.get("p", {}).items()})


def _in_pod(allocated: tuple[str, ...] | None) -> Candidate:
    c = kernel()
    if allocated is None:
        return c
    return dataclasses.replace(c, allocated=True, allocated_gpus=allocated)


@pytest.mark.parametrize(
    "candidate, gpu1, verdict, reason",
    [
        pytest.param(kernel(pod_info=None), {NOW - 600: {"processes": None, "errors": LIST_ERR}}, Verdict.UNKNOWN,
                     "GPU 1 process list unknown (UNKNOWN) at 22:03:20 UTC: a process of this kernel could have been "
                     "there (which GPUs it can use is unknown)", id="host-kernel-another-gpu-list-failed"),
        pytest.param(kernel(pod_info=None), {NOW - 300: {"up": False, "errors": ("nvmlDeviceGetHandleByIndex:GPU_IS_LOST",)}},
                     Verdict.UNKNOWN, "GPU 1 down (GPU_IS_LOST) at 22:08:20 UTC: a process of this kernel could have "
                     "been there", id="host-kernel-another-gpu-down"),
        pytest.param(kernel(pod_info=None), {NOW - 3600: {"processes": None}}, Verdict.RECLAIM, "shutdown-kernel in 0s",
                     id="unreadable-before-the-window-no-longer-taints"),
        pytest.param(_in_pod(None), {NOW - 600: {"processes": None}}, Verdict.UNKNOWN,
                     "(which GPUs it can use is unknown)", id="pod-without-allocation-info-cannot-be-narrowed"),
        pytest.param(_in_pod((UUID0,)), {NOW - 600: {"processes": None}}, Verdict.RECLAIM, "shutdown-kernel in 0s",
                     id="pod-allocated-another-gpu-only-is-narrowed"),
        pytest.param(_in_pod((UUID0, UUID1)), {NOW - 600: {"processes": None}}, Verdict.UNKNOWN,
                     "GPU 1 process list unknown (no value) at 22:03:20 UTC: a process of this kernel could have been "
                     "there (its pod is allocated that GPU)", id="pod-allocated-the-unreadable-gpu"),
        pytest.param(kernel(pod_info=None), {NOW - 600: {"utilization": None, "errors": ("x:NOT_SUPPORTED",)}},
                     Verdict.RECLAIM, "shutdown-kernel in 0s", id="unknown-utilisation-alone-elsewhere-does-not-taint"),
        pytest.param(pod_candidate(), {NOW - 600: {"processes": None}}, Verdict.RECLAIM, "evict-pod in 0s",
                     id="pod-candidate-narrowed-to-its-allocation"),
    ],
)
def test_invariant_15_unreadable_gpu_taints(candidate: Candidate, gpu1: dict, verdict: Verdict, reason: str) -> None:
    snap = snapshot(series(), series(UUID1, 1, patch=gpu1))
    top = EVICT if candidate.kernel_id is None else {}
    d = decide_one(candidate, snap, **top)
    assert d.verdict is verdict, d.reason
    assert reason in d.reason, d.reason


def test_invariant_15_unreadable_gpu_taints_an_unattributed_process_in_the_same_pod() -> None:
    stranger = dataclasses.replace(process(777, UUID1, kernel_id=None),
                                   reason="no kernel connection file among 3 ancestors")
    joined = join(node=NODE, processes=[process(), stranger], pods_by_uid={POD_UID: pod()}, allocations=None,
                  activities={KID: activity()}, first_seen={UUID0: {4242: STARTED}}, pods_listed_at=NOW - 1)
    (c,) = joined.candidates
    assert c.unattributed == (stranger,) and joined.unattributed == (stranger,)
    d = decide_one(c, snapshot(series(), series(UUID1, 1)))
    assert d.verdict is Verdict.UNKNOWN
    assert d.reason == ("GPU process 777 on GPU 1 in the same pod belongs to no kernel (no kernel connection file "
                        "among 3 ancestors): it may be this kernel's work")


@pytest.mark.parametrize(
    "stranger, attached",
    [
        pytest.param(dict(pod_uid="b0b0b0b0-0000-4000-8000-00000000bbbb", container_id="0ther"), False,
                     id="another-pod"),
        pytest.param(dict(pod_uid=None, container_id="c0ffee"), True, id="host-kernel-same-container"),
        pytest.param(dict(pod_uid=None, container_id="deadbeef"), False, id="host-kernel-other-container"),
        pytest.param(dict(pod_uid=None, container_id=None), False, id="no-container-no-pod"),
    ],
)
def test_invariant_15_unattributed_process_binds_only_to_its_own_pod_or_container(stranger: dict,
                                                                                   attached: bool) -> None:
    other = dataclasses.replace(process(777, UUID1, kernel_id=None), reason="process exited", **stranger)
    mine = dataclasses.replace(process(), pod_uid=None)
    pods = {POD_UID: pod()} if stranger.get("pod_uid") else {}
    (c,) = join(node=NODE, processes=[mine, other], pods_by_uid=pods, allocations=None,
                activities={KID: activity()}).candidates
    assert c.unattributed == ((other,) if attached else ())


# --------------------------------------------------------------------------- 16. stale pod metadata is unknown


@pytest.mark.parametrize(
    "candidate, listed_ago, verdict, reason",
    [
        pytest.param(kernel(), 1.0, Verdict.RECLAIM, "shutdown-kernel in 0s", id="fresh-pod-data"),
        pytest.param(kernel(), 45.0, Verdict.RECLAIM, "shutdown-kernel in 0s", id="three-resyncs-old-is-still-fresh"),
        pytest.param(kernel(), 46.0, Verdict.UNKNOWN, "data of pod team-a/jupyter-alice is 46s old (the pod list keeps "
                     "failing): an exemption added since would not be seen", id="kernel-in-pod-stale-data"),
        pytest.param(pod_candidate(), 600.0, Verdict.UNKNOWN, "data of pod team-a/jupyter-alice is 10m old",
                     id="pod-candidate-stale-data"),
        pytest.param(kernel(), None, Verdict.UNKNOWN, "when the data of pod team-a/jupyter-alice was listed is unknown",
                     id="listing-time-unknown"),
        pytest.param(kernel(pod_info=None), 600.0, Verdict.RECLAIM, "shutdown-kernel in 0s",
                     id="host-kernel-needs-no-pod-data"),
        pytest.param(kernel(pod_info=pod(annotations={"reclaimer.io/exempt": "true"})), 600.0, Verdict.EXEMPT,
                     "exempt: annotation", id="stale-data-that-exempts-still-exempts"),
    ],
)
def test_invariant_16_stale_pod_metadata_is_unknown(candidate: Candidate, listed_ago: float | None,
                                                    verdict: Verdict, reason: str) -> None:
    """decide_interval 15s (the default) and resync 15s: pod data older than 3 x 15s vouches for nothing."""
    c = dataclasses.replace(candidate, pod_listed_at=None if listed_ago is None else NOW - listed_ago)
    top = EVICT if c.kernel_id is None else {}
    d = decide_one(c, kubernetes={"resync_interval": "15s"}, **top)
    assert d.verdict is verdict, d.reason
    assert reason in d.reason, d.reason


def test_invariant_16_join_carries_the_listing_time_to_pod_bound_candidates_only() -> None:
    host = dataclasses.replace(process(5151, UUID1, kernel_id=KID2, pod_uid=None), container_id=None)
    alloc = [PodGpuAllocation("team-a", "other", "main", (UUID0,))]
    other = dataclasses.replace(pod("other"), uid="0b0b0b0b-0000-4000-8000-00000000cccc")
    joined = join(node=NODE, processes=[process(), host], pods_by_uid={POD_UID: pod(), other.uid: other},
                  allocations=alloc, activities={}, pods_listed_at=NOW - 7)
    listed = {c.key: c.pod_listed_at for c in joined.candidates}
    assert listed == {f"kernel:{KID}": NOW - 7, f"kernel:{KID2}": None, f"pod:{other.uid}": NOW - 7}


# --------------------------------------------------------------------------- 19. clocks and identity


@pytest.mark.parametrize(
    "skew, limit, last_ahead, verdict, reason",
    [
        pytest.param(None, None, None, Verdict.RECLAIM, "shutdown-kernel in 0s", id="no-date-header"),
        pytest.param(-0.8, None, None, Verdict.RECLAIM, "shutdown-kernel in 0s", id="date-header-second-resolution"),
        pytest.param(59.0, None, None, Verdict.RECLAIM, "shutdown-kernel in 0s", id="within-tolerance"),
        pytest.param(-120.0, None, None, Verdict.UNKNOWN, "gateway eg clock is 2m behind ours (its Date header; "
                     "limits.max_clock_skew 1m): its last_activity cannot be trusted", id="gateway-clock-behind"),
        pytest.param(3600.0, None, None, Verdict.UNKNOWN, "gateway eg clock is 1h ahead of ours",
                     id="gateway-clock-ahead"),
        pytest.param(float("nan"), None, None, Verdict.UNKNOWN, "clock is", id="skew-not-a-number"),
        pytest.param(-120.0, "5m", None, Verdict.RECLAIM, "shutdown-kernel in 0s", id="configured-tolerance"),
        pytest.param(None, None, 120.0, Verdict.UNKNOWN, "kernel last_activity is 2m in the future (the gateway writes "
                     "local time or its clock is off)", id="last-activity-in-the-future"),
        pytest.param(None, None, 30.0, Verdict.KEEP, "kernel idle since", id="last-activity-just-ahead-is-not-idle"),
    ],
)
def test_invariant_19_clock_skew_is_unknown(skew: float | None, limit: str | None, last_ahead: float | None,
                                            verdict: Verdict, reason: str) -> None:
    act = dataclasses.replace(activity(), clock_skew=skew)
    if last_ahead is not None:
        act = dataclasses.replace(act, last_activity=utc(NOW + last_ahead))
    limits = dict(NO_LIMITS, **({"max_clock_skew": limit} if limit else {}))
    [d] = decide([kernel(act=act)], snapshot(), make_settings(limits=limits), NOW, WARNED)
    assert d.verdict is verdict, d.reason
    assert reason in d.reason, d.reason


@pytest.mark.parametrize(
    "raw, error",
    [
        pytest.param("2026-11-23T19:13:42.25Z", None, id="utc"),
        pytest.param("2026-11-23T19:13:42+02:00", None, id="offset"),
        pytest.param("2026-11-23T19:13:42.25", "'last_activity' has no time zone (local time could shorten the idle "
                     "window)", id="naive-local-time"),
    ],
)
def test_invariant_19_naive_last_activity_is_unknown(raw: str, error: str | None) -> None:
    from reclaimer.observe.jupyter_rest import parse_kernel_model

    a = parse_kernel_model({"id": KID, "name": "python3", "execution_state": "idle", "last_activity": raw,
                            "connections": 0}, "eg", NOW, clock_skew=-0.5)
    assert a.error == error and a.clock_skew == -0.5


async def test_invariant_19_gateway_date_header_gives_the_skew(aiohttp_server) -> None:
    """A real GatewayClient against a gateway whose Date header is 10 minutes ahead of our clock."""
    import email.utils
    import time as _time

    from aiohttp import web

    from reclaimer.core.config import GatewaySettings
    from reclaimer.observe.gateway import GatewayClient

    async def kernel_model(request: web.Request) -> web.Response:
        body = {"id": KID, "name": "python3", "execution_state": "idle", "last_activity": "2026-01-01T00:00:00Z",
                "connections": 0}
        return web.json_response(body, headers={"Date": email.utils.formatdate(_time.time() + 600, usegmt=True)})

    app = web.Application()
    app.router.add_get("/api/kernels/{id}", kernel_model)
    server = await aiohttp_server(app)
    client = GatewayClient(GatewaySettings(name="skewed", url=str(server.make_url("")), timeout=2))
    try:
        a = await client.get_kernel(KID)
    finally:
        await client.close()
    assert a.error is None and a.clock_skew is not None and 597 <= a.clock_skew <= 601


@pytest.mark.parametrize(
    "listed_ago, attributed",
    [
        pytest.param(60.0, False, id="started-after-the-sample-listed-its-pid"),
        pytest.param(40.0, True, id="started-before-the-sample"),
        pytest.param(50.02, True, id="within-the-clock-resolution"),
    ],
)
def test_invariant_19_a_reused_pid_is_not_the_process_listed(tmp_path, listed_ago: float, attributed: bool) -> None:
    """The process now at the pid started 50 s ago (boot 1000 s ago + 950 s of ticks); the GPU sample listing the pid
    was taken ``listed_ago`` seconds ago."""
    from reclaimer.observe.attribution import Attributor
    from tests.support.procfs_fixtures import FakeProc, kernel_cmdline

    fake = FakeProc(tmp_path / "proc")
    fake.host_init()
    fake.set_uptime(1000.0)
    fake.add(200, ppid=1, cmdline=kernel_cmdline(KID), starttime=95_000)  # CLK_TCK 100: 950 s after boot
    t = NOW
    (p,) = Attributor(fake.root, clock=lambda: t).attribute([(UUID0, ProcessSample(200, GIB))],
                                                            listed_at={UUID0: t - listed_ago})
    assert p.started_at == pytest.approx(t - 50.0)
    if attributed:
        assert (p.kernel_id, p.reason) == (KID, "")
    else:
        assert p.kernel_id is None
        assert p.reason == ("pid 200 was reused: the process there now started at 22:12:30.00 UTC, after the GPU "
                            "sample of 22:12:20.00 UTC listed that pid")
