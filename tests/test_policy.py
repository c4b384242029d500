"""Table tests for reclaimer.core.policy: rule selection, verdicts, reasons, idle/eta, pod candidates, actions, recheck."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from reclaimer.core.config import Settings
from reclaimer.observe.gpusim import SimulatedBackend
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import Candidate, Decision, KernelActivity, PolicyState, ProcessSample, ServerRef
from reclaimer.core.policy import IDLE_AFTER_ANNOTATION, decide, gpu_idle_seconds, recheck, select_policy
from reclaimer.observe.sampler import Sampler
from tests.support.policy_fixtures import (
    WARNED,
    GIB,
    INTERVAL,
    KID,
    KID2,
    NOW,
    STARTED,
    UUID0,
    UUID1,
    activity,
    device,
    kernel,
    make_settings,
    pod,
    pod_candidate,
    policy,
    server,
    process,
    series,
    snapshot,
    utc,
)

NO_LIMITS = {"max_actions_per_cycle": 100, "cooldown": "10m", "max_fraction_per_cycle": 1.0}
MODELS = {UUID0: "NVIDIA A100-SXM4-80GB", UUID1: "NVIDIA H100 80GB HBM3"}


def decide_one(c: Candidate, snap: Any = None, settings: Settings | None = None, now: float = NOW) -> Decision:
    """decide() for a single candidate with the blast-radius limits out of the way."""
    settings = settings or make_settings(limits=NO_LIMITS)
    [d] = decide([c], snap or snapshot(), settings, now, WARNED)
    assert d.candidate is c
    return d


def with_policy(**fields: Any) -> Settings:
    return make_settings(policies=[policy("p", **fields)], limits=NO_LIMITS)


# --------------------------------------------------------------------------- policy selection


@pytest.mark.parametrize(
    "match, candidate, matches",
    [
        pytest.param({}, kernel(), True, id="empty-match-any-kernel"),
        pytest.param({}, pod_candidate(), True, id="empty-match-any-pod"),
        pytest.param({"namespaces": ["team-a", "x"]}, kernel(), True, id="namespace-in-list"),
        pytest.param({"namespaces": ["team-b"]}, kernel(), False, id="namespace-not-in-list"),
        pytest.param({"namespaces": ["team-a"]}, kernel(pod_info=None, processes=()), False, id="namespace-needs-pod"),
        pytest.param(
            {"pod_labels": {"app": "jupyterhub", "tier": "gold"}},
            kernel(pod_info=pod(labels={"app": "jupyterhub", "tier": "gold", "extra": "1"})),
            True,
            id="pod-labels-all-match",
        ),
        pytest.param(
            {"pod_labels": {"app": "jupyterhub", "tier": "gold"}},
            kernel(pod_info=pod(labels={"app": "jupyterhub", "tier": "silver"})),
            False,
            id="pod-labels-one-differs",
        ),
        pytest.param(
            {"pod_labels": {"app": "x"}}, kernel(pod_info=None, processes=()), False, id="pod-labels-need-pod"
        ),
        pytest.param({"users": ["alice"]}, kernel(), True, id="user-of-candidate"),
        pytest.param(
            {"users": ["carol"]}, kernel(user=None, pod_info=pod(user="carol")), True, id="user-from-pod"
        ),
        pytest.param(
            {"users": ["dave"]},
            kernel(user=None, pod_info=None, processes=(), server=ServerRef(user="dave")),
            True,
            id="user-from-server",
        ),
        pytest.param({"users": ["bob"]}, kernel(), False, id="user-not-in-list"),
        pytest.param(
            {"users": ["alice"]}, kernel(user=None, pod_info=pod(user=None)), False, id="users-need-a-known-user"
        ),
        pytest.param({"kernel_names": ["python3"]}, kernel(), True, id="kernel-name-in-list"),
        pytest.param({"kernel_names": ["ir"]}, kernel(), False, id="kernel-name-not-in-list"),
        pytest.param({"kernel_names": ["python3"]}, pod_candidate(), False, id="kernel-names-need-a-kernel"),
        pytest.param({"gateways": ["eg"]}, kernel(), True, id="gateway-in-list"),
        pytest.param({"gateways": ["eg"]}, kernel(gateway=None), True, id="gateway-from-activity"),
        pytest.param({"gateways": ["other"]}, kernel(), False, id="gateway-not-in-list"),
        pytest.param({"gateways": ["eg"]}, pod_candidate(), False, id="gateways-need-a-gateway"),
        pytest.param({"gpu_models": ["a100"]}, kernel(), True, id="gpu-model-substring-case-insensitive"),
        pytest.param({"gpu_models": ["H100"]}, kernel(), False, id="gpu-model-not-held"),
        pytest.param({"gpu_models": ["H100"]}, kernel(gpus=(UUID0, UUID1)), True, id="gpu-model-any-held-gpu"),
        pytest.param(
            {"gpu_models": ["a100"]}, kernel(gpus=("GPU-unknown",)), False, id="gpu-model-unknown-does-not-match"
        ),
        pytest.param({"namespaces": ["team-a"], "users": ["bob"]}, kernel(), False, id="keys-are-anded"),
    ],
)
def test_select_policy_match_keys(match: dict[str, Any], candidate: Candidate, matches: bool) -> None:
    settings = make_settings(policies=[policy("p", match=match)])
    chosen = select_policy(candidate, settings, MODELS)
    assert (chosen.name if chosen else None) == ("p" if matches else None)


@pytest.mark.parametrize(
    "order, candidate, expected",
    [
        pytest.param(["team-a", "catch-all"], kernel(), "team-a", id="specific-first-wins"),
        pytest.param(
            ["team-a", "catch-all"], kernel(pod_info=pod(namespace="team-b")), "catch-all", id="falls-through"
        ),
        pytest.param(["catch-all", "team-a"], kernel(), "catch-all", id="catch-all-first-shadows"),
    ],
)
def test_select_policy_first_match_wins(order: list[str], candidate: Candidate, expected: str) -> None:
    defs = {"team-a": policy("team-a", match={"namespaces": ["team-a"]}), "catch-all": policy("catch-all")}
    settings = make_settings(policies=[defs[name] for name in order])
    chosen = select_policy(candidate, settings, MODELS)
    assert chosen is not None and chosen.name == expected


def test_no_policy_matches_keeps_and_does_nothing() -> None:
    settings = make_settings(policies=[policy("gold", match={"pod_labels": {"tier": "gold"}})], limits=NO_LIMITS)
    d = decide_one(kernel(), settings=settings)
    assert (d.verdict, d.action, d.reason, d.policy) == (Verdict.KEEP, ActionKind.NONE, "no policy matches", None)


# --------------------------------------------------------------------------- gpu_idle_seconds


def _gis(samples: Any, *, threshold: float = 0.05, now: float = NOW, started_at: float = STARTED) -> float | None:
    return gpu_idle_seconds(samples, threshold, now, started_at, INTERVAL)


@pytest.mark.parametrize(
    "samples, kwargs, expected",
    [
        pytest.param(series(), {}, NOW - STARTED, id="idle-since-first-sample"),
        pytest.param((), {}, None, id="no-samples-unknown"),
        pytest.param(series(util=0.5), {}, 0.0, id="newest-busy-is-zero"),
        pytest.param(series(util=0.05), {}, 0.0, id="at-threshold-is-busy"),
        pytest.param(series(util=0.0499), {}, NOW - STARTED, id="just-below-threshold-is-idle"),
        pytest.param(series(patch={NOW: {"utilization": None}}), {}, None, id="newest-unknown"),
        pytest.param(series(patch={NOW: {"up": False}}), {}, None, id="newest-down"),
        pytest.param(series(patch={NOW: {"utilization": float("nan")}}), {}, None, id="newest-nan"),
        pytest.param(series(patch={NOW: {"utilization": -0.1}}), {}, None, id="newest-negative"),
        pytest.param(series(patch={NOW: {"utilization": 5.0}}), {}, None, id="newest-percent-not-ratio"),
        pytest.param(series(end=NOW - 3 * INTERVAL), {}, 3 * 3600.0, id="three-intervals-old-still-fresh"),
        pytest.param(series(end=NOW - 3 * INTERVAL - 1), {}, None, id="older-than-three-intervals-stale"),
        pytest.param(series(patch={NOW - 600: {"utilization": 0.9}}), {}, 600 - INTERVAL, id="busy-sample-resets"),
        pytest.param(series(patch={NOW - 600: {"utilization": None}}), {}, 600 - INTERVAL, id="unknown-sample-resets"),
        pytest.param(series(patch={NOW - 600: {"up": False}}), {}, 600 - INTERVAL, id="down-sample-resets"),
        pytest.param(
            tuple(s for s in series() if not NOW - 620 < s.timestamp < NOW - 600),
            {},
            600.0,
            id="gap-longer-than-three-intervals-resets",
        ),
        pytest.param(
            tuple(s for s in series() if not NOW - 615 < s.timestamp < NOW - 600),
            {},
            NOW - STARTED,
            id="gap-of-three-intervals-continues",
        ),
        pytest.param(series(start=STARTED - 3600), {}, NOW - STARTED, id="never-before-started-at"),
        pytest.param(series(), {"started_at": NOW - 60}, 60.0, id="restart-counts-from-start"),
        pytest.param(tuple(reversed(series())), {}, NOW - STARTED, id="unsorted-input"),
        pytest.param(series(end=NOW + INTERVAL), {}, NOW - STARTED, id="sample-slightly-after-now"),
        pytest.param(series(), {"threshold": 0.0}, 0.0, id="zero-threshold-nothing-idle"),
    ],
)
def test_gpu_idle_seconds(samples: Any, kwargs: dict[str, Any], expected: float | None) -> None:
    assert _gis(samples, **kwargs) == expected


# --------------------------------------------------------------------------- verdicts, idle, eta

A, W = 1800.0, 300.0  # default policy: idle_after 30m, warn_before 5m


@pytest.mark.parametrize(
    "candidate, snap, verdict, idle, eta",
    [
        pytest.param(kernel(), None, Verdict.RECLAIM, 7200.0, 0.0, id="idle-whole-window-reclaims"),
        pytest.param(kernel(act=activity(idle_for=A)), None, Verdict.RECLAIM, A, 0.0, id="exactly-idle-after"),
        pytest.param(kernel(act=activity(idle_for=A - 1)), None, Verdict.WARN, A - 1, 1.0, id="one-second-short-warns"),
        pytest.param(kernel(act=activity(idle_for=A - W)), None, Verdict.WARN, A - W, W, id="warn-boundary-warns"),
        pytest.param(
            kernel(act=activity(idle_for=A - W - 1)), None, Verdict.KEEP, A - W - 1, W + 1, id="before-warn-keeps"
        ),
        pytest.param(kernel(act=activity(idle_for=60)), None, Verdict.KEEP, 60.0, A - 60, id="recent-activity-keeps"),
        pytest.param(
            kernel(act=activity(idle_for=-30)), None, Verdict.KEEP, 0.0, A, id="activity-in-future-counts-as-now"
        ),
        pytest.param(kernel(act=activity(state="busy")), None, Verdict.KEEP, 0.0, A, id="busy-keeps"),
        pytest.param(kernel(act=activity(state="starting")), None, Verdict.KEEP, 0.0, A, id="starting-keeps"),
        pytest.param(kernel(act=activity(state="restarting")), None, Verdict.KEEP, 0.0, A, id="restarting-keeps"),
        pytest.param(kernel(act=activity(state="dead")), None, Verdict.KEEP, 0.0, A, id="dead-keeps"),
        pytest.param(kernel(act=activity(state="")), None, Verdict.KEEP, 0.0, A, id="empty-state-keeps"),
        pytest.param(kernel(act=activity(state="Idle")), None, Verdict.KEEP, 0.0, A, id="idle-is-case-sensitive"),
        pytest.param(
            kernel(),
            snapshot(series(patch={NOW - 600: {"utilization": 0.5}})),
            Verdict.KEEP,
            600 - INTERVAL,
            A - 600 + INTERVAL,
            id="gpu-busy-10m-ago-keeps",
        ),
        pytest.param(
            kernel(),
            snapshot(series(patch={NOW - 1600: {"utilization": 0.5}})),
            Verdict.WARN,
            1600 - INTERVAL,
            A - 1600 + INTERVAL,
            id="gpu-busy-27m-ago-warns",
        ),
        pytest.param(kernel(), snapshot(series(util=0.3)), Verdict.KEEP, 0.0, A, id="gpu-busy-now-keeps"),
        pytest.param(
            kernel(processes=(process(sm=0.37),)), None, Verdict.KEEP, 0.0, A, id="process-sm-busy-keeps"
        ),
        pytest.param(kernel(processes=(process(sm=0.01),)), None, Verdict.RECLAIM, 7200.0, 0.0, id="process-sm-idle"),
        pytest.param(
            kernel(gpus=(UUID0, UUID1)),
            snapshot(series(), series(UUID1, 1, start=NOW - 900)),
            Verdict.KEEP,
            900.0,
            A - 900,
            id="min-over-held-gpus",
        ),
        pytest.param(
            kernel(),
            snapshot(series(), series(UUID1, 1, util=0.9)),
            Verdict.RECLAIM,
            7200.0,
            0.0,
            id="other-gpus-do-not-matter",
        ),
    ],
)
def test_verdict_idle_and_eta(candidate: Candidate, snap: Any, verdict: Verdict, idle: float, eta: float) -> None:
    d = decide_one(candidate, snap)
    assert (d.verdict, d.idle_seconds, d.eta_seconds, d.policy) == (verdict, idle, eta, "default")
    assert d.action is ActionKind.SHUTDOWN_KERNEL


def test_naive_last_activity_is_unknown() -> None:
    """Invariant 19 (was: naive = UTC): naive local time west of UTC would make a kernel look idle hours longer."""
    naive = utc(NOW - 2 * 3600).replace(tzinfo=None)
    d = decide_one(kernel(act=dataclasses.replace(activity(), last_activity=naive)))
    assert (d.verdict, d.reason) == (
        Verdict.UNKNOWN, "kernel last_activity has no time zone (local time could shorten the idle window)")


# --------------------------------------------------------------------------- reasons


@pytest.mark.parametrize(
    "candidate, snap, settings, reason",
    [
        pytest.param(
            kernel(act=activity(idle_for=47 * 60)),
            None,
            None,
            "GPU 0 at 0% for 3h and kernel idle since 21:26 UTC; shutdown-kernel in 0s (warned at 21:13:20 UTC)",
            id="reclaim",
        ),
        pytest.param(
            kernel(act=activity(idle_for=27 * 60)),
            snapshot(series(util=lambda ts: 0.02 if ts > NOW - 60 else 0.0)),
            None,
            "GPU 0 at 2% for 3h and kernel idle since 21:46 UTC; shutdown-kernel in 3m (warned at 21:13:20 UTC)",
            id="warn-shows-peak-and-countdown",
        ),
        pytest.param(kernel(act=activity(state="busy")), None, None, "kernel busy", id="busy"),
        pytest.param(
            kernel(act=activity(state="restarting")), None, None, "kernel 'restarting' (not idle)", id="not-idle-state"
        ),
        pytest.param(
            kernel(gpus=(UUID0, UUID1)),
            snapshot(series(), series(UUID1, 1, util=0.63)),
            None,
            "GPU 0 at 0% for 3h, GPU 1 busy (63%) and kernel idle since 20:13 UTC",
            id="one-gpu-busy",
        ),
        pytest.param(
            kernel(processes=(process(sm=0.37),)), None, None, "process 4242 at 37% SM on GPU 0", id="process-busy"
        ),
        pytest.param(
            kernel(act=activity(idle_for=3 * 86400)),
            snapshot(series(), started_at=STARTED),
            None,
            "GPU 0 at 0% for 3h and kernel idle since 2023-11-11 22:13 UTC; shutdown-kernel in 0s (warned at 21:13:20 UTC)",
            id="old-activity-shows-date",
        ),
        pytest.param(
            kernel(),
            snapshot(
                series(
                    UUID1,
                    1,
                    patch={NOW: {"utilization": None, "errors": ("nvmlDeviceGetUtilizationRates:NOT_SUPPORTED",)}},
                )
            ),
            None,
            f"{UUID0} not in the sampler snapshot",
            id="gpu-not-in-snapshot",
        ),
        pytest.param(
            kernel(gpus=(UUID1,), processes=()),
            snapshot(
                series(
                    UUID1,
                    1,
                    patch={NOW: {"utilization": None, "errors": ("nvmlDeviceGetUtilizationRates:NOT_SUPPORTED",)}},
                )
            ),
            None,
            "GPU 1 utilisation unknown (NOT_SUPPORTED)",
            id="utilisation-unknown",
        ),
        pytest.param(
            kernel(),
            snapshot(series(patch={NOW - 600: {"utilization": None}})),
            None,
            "GPU 0 utilisation unknown (no value) at 22:03:20 UTC",
            id="earlier-unknown-says-when",
        ),
        pytest.param(
            kernel(),
            None,
            make_settings(policies=[policy("watch", action="none")], limits=NO_LIMITS),
            "policy watch observes only; GPU 0 at 0% for 3h and kernel idle since 20:13 UTC",
            id="observe-only",
        ),
        pytest.param(
            pod_candidate(),
            None,
            with_policy(action="evict-pod", reclaim_bare_allocations=True),
            "GPU 0 at 0% for 3h with no process in pod team-a/jupyter-alice; evict-pod in 0s (warned at 21:13:20 UTC)",
            id="pod-candidate",
        ),
    ],
)
def test_reasons(candidate: Candidate, snap: Any, settings: Settings | None, reason: str) -> None:
    assert decide_one(candidate, snap, settings).reason == reason


# --------------------------------------------------------------------------- actions per policy, pod candidates


@pytest.mark.parametrize(
    "action, candidate, verdict, decision_action, reason_part",
    [
        pytest.param("shutdown-kernel", kernel(), Verdict.RECLAIM, "shutdown-kernel", "in 0s", id="shutdown-kernel"),
        pytest.param("evict-pod", kernel(), Verdict.RECLAIM, "evict-pod", "evict-pod in 0s", id="evict-pod-kernel"),
        pytest.param(
            "evict-pod",
            kernel(pod_info=None, processes=(process(pod_uid=None),)),
            Verdict.UNKNOWN,
            "none",
            "evict-pod needs the kernel's pod, which is unknown",
            id="evict-pod-needs-pod",
        ),
        pytest.param(
            "stop-server",
            kernel(),
            Verdict.UNKNOWN,
            "none",
            "stop-server needs the server the hub lists this cycle, but it lists no default server for user alice "
            "(never another server instead)",
            id="stop-never-falls-back-to-the-default-server",
        ),
        pytest.param(
            "stop-server",
            kernel(pod_info=pod(annotations={"hub.jupyter.org/servername": "gpu"}), server=server("alice", "gpu")),
            Verdict.RECLAIM,
            "stop-server",
            "stop-server in 0s",
            id="stop-by-server-ref",
        ),
        pytest.param(
            "stop-server",
            kernel(user=None, pod_info=pod(user=None)),
            Verdict.UNKNOWN,
            "none",
            "stop-server needs the user's server",
            id="stop-server-needs-user",
        ),
        pytest.param("none", kernel(), Verdict.KEEP, "none", "policy p observes only", id="none-observes"),
        pytest.param(
            "none",
            kernel(act=activity(state="busy")),
            Verdict.KEEP,
            "none",
            "observes only; kernel busy",
            id="none-busy",
        ),
        pytest.param(
            "evict-pod",
            pod_candidate(server=server()),
            Verdict.RECLAIM,
            "evict-pod",
            "evict-pod in 0s",
            id="pod-evict-server-known-and-idle",
        ),
        pytest.param(
            "evict-pod",
            pod_candidate(),
            Verdict.KEEP,
            "evict-pod",
            "pod team-a/jupyter-alice holds GPUs with no process and no kernel or JupyterHub server to show it is "
            "unused (policy p does not set reclaim_bare_allocations); GPU 0 at 0% for 3h",
            id="pod-evict-bare-allocation-keeps",
        ),
        pytest.param(
            "stop-server", pod_candidate(server=server()), Verdict.RECLAIM, "stop-server", "in 0s",
            id="pod-stop-server",
        ),
        pytest.param(
            "stop-server",
            pod_candidate(pod(user=None)),
            Verdict.UNKNOWN,
            "none",
            "stop-server needs the user's server",
            id="pod-stop-server-needs-user",
        ),
        pytest.param(
            "shutdown-kernel",
            pod_candidate(),
            Verdict.KEEP,
            "shutdown-kernel",
            "shutdown-kernel cannot apply to pod team-a/jupyter-alice: it holds GPUs with no kernel",
            id="pod-shutdown-kernel-cannot-apply",
        ),
        pytest.param(
            "evict-pod",
            dataclasses.replace(pod_candidate(), allocated=False),
            Verdict.UNKNOWN,
            "none",
            "has no kernel and no GPU allocation",
            id="pod-without-allocation",
        ),
        pytest.param(
            "evict-pod",
            dataclasses.replace(pod_candidate(), pod=None, key="pod:?"),
            Verdict.UNKNOWN,
            "none",
            "neither a kernel id nor a pod",
            id="neither-kernel-nor-pod",
        ),
        pytest.param(
            "evict-pod",
            dataclasses.replace(pod_candidate(), gpu_uuids=()),
            Verdict.UNKNOWN,
            "none",
            "holds no known GPU",
            id="no-gpu-held",
        ),
    ],
)
def test_actions_per_policy(
    action: str, candidate: Candidate, verdict: Verdict, decision_action: str, reason_part: str
) -> None:
    d = decide_one(candidate, settings=with_policy(action=action))
    assert (d.verdict, d.action.value) == (verdict, decision_action)
    assert reason_part in d.reason
    if verdict is not Verdict.RECLAIM:
        assert d.eta_seconds is None


def test_pod_candidate_with_a_process_in_window_is_not_idle() -> None:
    seen = series(patch={NOW - 120: {"processes": (ProcessSample(pid=9, used_memory_bytes=GIB),)}})
    d = decide_one(pod_candidate(), snapshot(seen), with_policy(action="evict-pod"))
    assert (d.verdict, d.idle_seconds) == (Verdict.KEEP, 120.0)
    assert "a process was on GPU 0 at 22:11:20 UTC" in d.reason


def test_pod_candidate_idle_seconds_are_gpu_idle_time() -> None:
    settings = with_policy(action="evict-pod", reclaim_bare_allocations=True)
    d = decide_one(pod_candidate(), snapshot(series(start=NOW - 1000)), settings)
    assert (d.verdict, d.idle_seconds, d.eta_seconds) == (Verdict.KEEP, 1000.0, 800.0)


@pytest.mark.parametrize(
    "value, verdict, idle_after_note",
    [
        pytest.param("4h", Verdict.KEEP, "(idle-after 4h from pod annotation)", id="longer-override-applies"),
        pytest.param("1h30m", Verdict.WARN, "(idle-after 1h30m from pod annotation)", id="override-warns"),
        pytest.param("5m", Verdict.RECLAIM, None, id="shorter-override-ignored"),
    ],
)
def test_idle_after_override(value: str, verdict: Verdict, idle_after_note: str | None) -> None:
    c = kernel(pod_info=pod(annotations={IDLE_AFTER_ANNOTATION: value}), act=activity(idle_for=86 * 60))
    d = decide_one(c, snapshot(series(start=NOW - 4 * 3600), started_at=NOW - 4 * 3600))
    assert d.verdict is verdict
    assert (idle_after_note in d.reason) if idle_after_note else ("annotation" not in d.reason)


# --------------------------------------------------------------------------- kernels sharing a pod


def _two_kernels_one_pod(second_state: str) -> list[Candidate]:
    acts = [activity(KID), activity(KID2, state=second_state)]
    return [
        kernel(KID, gpus=(UUID0,), server=server(), target=tuple(acts)),
        kernel(KID2, gpus=(UUID1,), act=acts[1], server=server(), target=tuple(acts)),
    ]


def test_evict_pod_blocked_when_a_kernel_in_the_same_pod_is_busy() -> None:
    settings = with_policy(action="evict-pod")
    decisions = decide(_two_kernels_one_pod("busy"), snapshot(series(), series(UUID1, 1)), settings, NOW, WARNED)
    assert [d.verdict for d in decisions] == [Verdict.KEEP, Verdict.KEEP]
    # The whole target (the pod's server lists both kernels) says so on the first kernel itself.
    assert decisions[0].reason.startswith(f"evict-pod would also end kernel {KID2[:8]} in server alice, which is busy")


def test_shutdown_kernel_is_not_blocked_by_a_busy_neighbour() -> None:
    decisions = decide(
        _two_kernels_one_pod("busy"), snapshot(series(), series(UUID1, 1)), with_policy(), NOW, WARNED
    )
    assert [d.verdict for d in decisions] == [Verdict.RECLAIM, Verdict.KEEP]


@pytest.mark.parametrize("action", ["evict-pod", "stop-server"])
def test_one_action_per_pod_or_server(action: str) -> None:
    settings = with_policy(action=action)
    decisions = decide(_two_kernels_one_pod("idle"), snapshot(series(), series(UUID1, 1)), settings, NOW, WARNED)
    assert [d.verdict for d in decisions] == [Verdict.RECLAIM, Verdict.WARN]
    assert decisions[1].reason.startswith(f"covered by the {action} planned for kernel:{KID}")
    assert decisions[1].eta_seconds == settings.decide_interval


# --------------------------------------------------------------------------- determinism and bad input


def test_output_sorted_by_key_and_independent_of_order() -> None:
    cands = [kernel(KID2, act=activity(KID2, state="busy")), pod_candidate(), kernel(KID)]
    first = decide(cands, snapshot(), make_settings(limits=NO_LIMITS), NOW, WARNED)
    second = decide(list(reversed(cands)), snapshot(), make_settings(limits=NO_LIMITS), NOW, WARNED)
    assert [d.candidate.key for d in first] == sorted(c.key for c in cands)
    assert first == second


def test_duplicate_keys_are_unknown() -> None:
    a, b = kernel(), kernel(act=activity(state="busy"))
    decisions = decide([a, b], snapshot(), make_settings(limits=NO_LIMITS), NOW, WARNED)
    assert {d.verdict for d in decisions} == {Verdict.UNKNOWN}
    assert all(f"candidate key kernel:{KID} appears more than once" in d.reason for d in decisions)


def test_no_candidates_no_decisions() -> None:
    assert decide([], snapshot(), make_settings(), NOW, WARNED) == []


# --------------------------------------------------------------------------- recheck


def _planned(c: Candidate | None = None, settings: Settings | None = None) -> Decision:
    d = decide_one(c or kernel(), settings=settings)
    assert d.verdict is Verdict.RECLAIM
    return d


@pytest.mark.parametrize(
    "fresh, snap, verdict, reason",
    [
        pytest.param(activity(), None, Verdict.RECLAIM, None, id="still-idle-unchanged"),
        pytest.param(activity(state="busy"), None, Verdict.KEEP, "re-check: kernel busy", id="became-busy"),
        pytest.param(
            activity(idle_for=5), None, Verdict.KEEP, "re-check: GPU 0 at 0% for 3h and kernel idle", id="new-activity"
        ),
        pytest.param(None, None, Verdict.UNKNOWN, "re-check: no fresh answer from the gateway", id="no-answer"),
        pytest.param(
            activity(error="HTTP 503"),
            None,
            Verdict.UNKNOWN,
            "re-check: gateway eg error: HTTP 503",
            id="gateway-error",
        ),
        pytest.param(
            activity(KID2), None, Verdict.UNKNOWN, f"re-check: gateway answered for kernel {KID2}", id="other-kernel"
        ),
        pytest.param(
            activity(),
            snapshot(series(patch={NOW: {"utilization": 0.8}})),
            Verdict.KEEP,
            "re-check: GPU 0 busy (80%)",
            id="gpu-busy-now",
        ),
        pytest.param(
            activity(),
            snapshot(series(patch={NOW: {"up": False, "errors": ("nvmlDeviceGetUtilizationRates:GPU_IS_LOST",)}})),
            Verdict.UNKNOWN,
            "re-check: GPU 0 down (GPU_IS_LOST)",
            id="gpu-lost",
        ),
    ],
)
def test_recheck(fresh: Any, snap: Any, verdict: Verdict, reason: str | None) -> None:
    planned = _planned()
    again = recheck(planned, fresh, snap or snapshot(), make_settings(limits=NO_LIMITS), NOW)
    if reason is None:
        assert again is planned
    else:
        assert again.verdict is verdict and again.reason.startswith(reason)
        assert again.candidate.key == planned.candidate.key


def test_recheck_returns_non_reclaim_unchanged() -> None:
    kept = decide_one(kernel(act=activity(state="busy")))
    assert recheck(kept, activity(), snapshot(), make_settings(), NOW) is kept


def test_recheck_pod_candidate_needs_no_gateway() -> None:
    settings = with_policy(action="evict-pod", reclaim_bare_allocations=True)
    planned = _planned(pod_candidate(), settings)
    assert recheck(planned, None, snapshot(), settings, NOW) is planned
    busy = snapshot(series(patch={NOW: {"utilization": 0.5}}))
    assert recheck(planned, None, busy, settings, NOW).verdict is Verdict.KEEP


def test_recheck_refuses_a_changed_plan() -> None:
    planned = _planned(settings=with_policy(action="shutdown-kernel"))
    again = recheck(planned, activity(), snapshot(), with_policy(action="evict-pod"), NOW)
    assert again.verdict is Verdict.KEEP
    assert again.reason.startswith("re-check: plan changed (shutdown-kernel by policy p -> evict-pod by policy p)")


def test_models_from_devices_drive_gpu_model_policies() -> None:
    settings = make_settings(
        policies=[policy("h100", match={"gpu_models": ["h100"]}, action="none"), policy("rest")], limits=NO_LIMITS
    )
    h100 = snapshot(devices=[device(model="NVIDIA H100 80GB HBM3")])
    assert decide_one(kernel(), h100, settings).policy == "h100"
    assert decide_one(kernel(), snapshot(), settings).policy == "rest"


# --------------------------------------------------------------------------- issue 10 item 4: idle-after beyond the ring


def _driven(idle_after_override: str, events: Mapping[float, Callable[[SimulatedBackend], None]], hours: float,
            decide_every: float = 300.0) -> list[tuple[float, Decision]]:
    """The real Sampler over the simulated GPU, ticked in simulated time (5 s samples, default 30 min policy, so the
    ring holds ~30 min); one decision every ``decide_every`` for a kernel whose pod asks for a longer idle-after.
    ``events`` maps seconds since start to a change of the simulated GPU."""
    settings = make_settings()
    backend = SimulatedBackend({"gpus": [{"uuid": UUID0, "model": "NVIDIA A100-SXM4-80GB", "memory_total": 80 * GIB,
                                          "utilization": 0.0}]})
    clock = [NOW]
    sampler = Sampler(backend, interval=INTERVAL, window_seconds=settings.longest_window, clock=lambda: clock[0],
                      idle_thresholds={p.gpu_idle_below for p in settings.policies})
    sampler.start(thread=False)
    annotated = pod(annotations={IDLE_AFTER_ANNOTATION: idle_after_override})
    out: list[tuple[float, Decision]] = []
    pending = dict(events)
    elapsed = 0.0
    while elapsed <= hours * 3600:
        for at in [t for t in pending if t <= elapsed]:
            pending.pop(at)(backend)
        sampler.tick()
        if elapsed % decide_every == 0:
            act = KernelActivity(KID, "eg", clock[0], "python3", "idle", utc(NOW - 86400), 0)
            (d,) = decide([kernel(pod_info=annotated, act=act)], sampler.snapshot(), settings, clock[0], WARNED)
            out.append((elapsed, d))
        clock[0] += INTERVAL
        elapsed += INTERVAL
    assert len(sampler.snapshot().samples[UUID0]) < 400  # the ring really is ~30 minutes, not the 4 hours
    return out


def test_item4_idle_after_longer_than_the_ring_counts_down_and_reclaims_on_time() -> None:
    seen = _driven("4h", {}, hours=4.5)
    etas = [(t, d.eta_seconds) for t, d in seen if d.verdict in (Verdict.KEEP, Verdict.WARN)]
    assert all(b[1] < a[1] for a, b in zip(etas, etas[1:])), etas  # never frozen: every cycle is closer
    first = next(t for t, d in seen if d.verdict is Verdict.RECLAIM)
    assert first == 4 * 3600  # on time, not at the 30 min the ring holds, not never
    at_2h = dict(seen)[2 * 3600]
    assert at_2h.verdict is Verdict.KEEP and at_2h.idle_seconds == 2 * 3600 and at_2h.eta_seconds == 2 * 3600
    assert "(idle-after 4h from pod annotation)" in at_2h.reason and "for 2h" in at_2h.reason


def test_item4_busy_moment_beyond_the_ring_restarts_the_long_count() -> None:
    busy, idle = (lambda b: b.set_utilization(0, 0.9)), (lambda b: b.set_utilization(0, 0.0))
    seen = dict(_driven("2h", {3600.0: busy, 3605.0: idle}, hours=3.5))
    # At 2h the busy moment (1h ago) is long out of the ring: still counted, so no reclaim.
    assert seen[2 * 3600].verdict is Verdict.KEEP and seen[2 * 3600].idle_seconds == 7200 - 3605
    # The run restarts at 3605 s: reclaim at the first cycle at or after 3605 + 7200 = 10805 s, never before.
    assert next(t for t, d in sorted(seen.items()) if d.verdict is Verdict.RECLAIM) == 11100


def test_item4_unknown_sample_beyond_the_ring_is_unknown_until_it_leaves_the_window() -> None:
    lost, back = (lambda b: b.set_lost(0, True)), (lambda b: b.set_lost(0, False))
    seen = dict(_driven("2h", {1800.0: lost, 1805.0: back}, hours=4.0))
    at = seen[3600 + 1800]  # 1 h after the lost sample: out of the ring, inside the 2 h window
    assert at.verdict is Verdict.UNKNOWN and "GPU 0 down (GPU_IS_LOST) at" in at.reason
    assert seen[1800 + 2 * 3600 + 300].verdict is Verdict.RECLAIM  # once it left the window, idle since 1805 s


def test_item4_gpu_idle_seconds_counts_beyond_the_ring_with_the_history() -> None:
    """reclaimer_gpu_idle_seconds does not stop at the ring's length either: 2 h idle reads 2 h, not ~30 min."""
    backend = SimulatedBackend({"gpus": [{"uuid": UUID0, "model": "A100", "memory_total": 80 * GIB,
                                          "utilization": [[0, 0.9], [600, 0.0]]}]})
    clock = [NOW]
    sampler = Sampler(backend, interval=INTERVAL, window_seconds=1800, clock=lambda: clock[0], idle_thresholds=(0.05,))
    sampler.start(thread=False)
    for _ in range(int(3 * 3600 / INTERVAL)):  # busy for 10 minutes, then idle
        sampler.tick()
        clock[0] += INTERVAL
    snap = sampler.snapshot()
    now = clock[0] - INTERVAL
    ring_only = gpu_idle_seconds(snap.samples[UUID0], 0.05, now, snap.started_at, INTERVAL)
    with_history = gpu_idle_seconds(snap.samples[UUID0], 0.05, now, snap.started_at, INTERVAL, snap.history[UUID0])
    assert ring_only is not None and ring_only < 1900  # what the ring alone can see
    assert with_history == 3 * 3600 - 600 - INTERVAL
