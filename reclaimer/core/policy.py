"""The policy: candidates + samples + settings + ``now`` in, one ``Decision`` per candidate out.

Pure (stdlib, ``reclaimer.core.model`` and ``reclaimer.core.config`` only): no clock reads, no I/O. The same inputs give
the same decisions, sorted by candidate key, whatever the order of the candidates.

A cycle has two stages:

1. Each candidate on its own (``_evaluate``): exemptions first (they win and fail closed), then the first matching
   policy, then everything that could be unknown (unknown is never idle), then the idle arithmetic:
   ``idle_seconds = min(GPU continuous idle time, now - last_activity)`` against the policy's window; a reclaim
   also needs this idle episode's warning to have gone out ``warn_before`` earlier (``PolicyState.warned_at``).
2. Blast radius over all of them (``decide``): shared pod/server guard, cooldown, one action per target,
   circuit breaker, rate limit — each can only turn a ``reclaim`` into something milder. The breaker keeps memory
   between cycles in ``PolicyState`` (``plan`` returns the next state; the daemon owns it).
"""

from __future__ import annotations

import contextvars
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from reclaimer.core import actionkinds
from reclaimer.core.actions import ActionKind
from reclaimer.core.config import PolicySettings, Settings, format_duration, parse_duration
from reclaimer.core.keys import notebook_key, pod_key, server_key
from reclaimer.core.labels import BREAKER_MASS_FLIP, BREAKER_SUSTAINED
from reclaimer.core.model import (
    BreakerStatus,
    Candidate,
    Decision,
    GpuHistory,
    GpuPresence,
    GpuSample,
    KernelActivity,
    PodInfo,
    PolicyState,
    SamplerSnapshot,
)
from reclaimer.core.redact import redact_line
from reclaimer.core.verdicts import Verdict

STALE_FACTOR = 3.0  # a sample (or observation) older than this many intervals is stale; so is a gap this long
IDLE_AFTER_ANNOTATION = "reclaimer.io/idle-after"  # per-pod override; it may lengthen the window, never shorten it


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True, slots=True)
class Plan:
    """One decide cycle: the decisions, the state to pass to the next cycle, and the circuit breaker's status."""

    decisions: list[Decision]
    state: PolicyState
    breaker: BreakerStatus


def decide(
    candidates: Sequence[Candidate],
    sampler: SamplerSnapshot,
    settings: Settings,
    now: float,
    state: PolicyState,
) -> list[Decision]:
    """One decision per candidate, sorted by key; at most ``max_actions_per_cycle`` of them are ``reclaim``.

    A ``reclaim`` verdict means every rule of docs/safety.md holds for that candidate right now; the executor
    must still ``recheck`` it just before acting. ``plan`` is the same with the next state and the breaker status.
    """
    return plan(candidates, sampler, settings, now, state).decisions


def plan(
    candidates: Sequence[Candidate],
    sampler: SamplerSnapshot,
    settings: Settings,
    now: float,
    state: PolicyState,
) -> Plan:
    """``decide``, plus the ``PolicyState`` the daemon passes to the next cycle and the breaker's status."""
    ordered = sorted(candidates, key=lambda c: (c.key, repr(c)))
    repeated = {k for k, n in Counter(c.key for c in ordered).items() if n > 1}
    token = _VIEWS.set({})  # many candidates share a GPU (and auto evaluates two plans): read each GPU once
    try:
        individual = [
            _unknown(c, None, f"candidate key {c.key} appears more than once (attribution bug?)")
            if c.key in repeated
            else _evaluate(c, sampler, settings, now, warned_at=state.warned_at.get(c.key))
            for c in ordered
        ]
    finally:
        _VIEWS.reset(token)
    decisions = _guard_shared_targets(individual)
    decisions = _apply_cooldown(decisions, state, settings, now)
    decisions = _one_action_per_target(decisions, settings)
    # Every candidate that would be reclaimed now, and since when it has been, continuously (clamped to now).
    since = {
        d.candidate.key: min(now, state.reclaimable_since.get(d.candidate.key, now))
        for d in decisions
        if d.verdict is Verdict.RECLAIM
    }
    # The breaker runs before the rate limit so it sees every would-be reclaim: a cap applied first would hide
    # a mass event (a gateway reporting everything idle) and let it drain max_actions_per_cycle every cycle.
    decisions, breaker, released_at = _apply_circuit_breaker(decisions, len(ordered), settings, now, state, since)
    decisions = _apply_rate_limit(decisions, sampler, settings)
    next_state = replace(
        state,
        reclaimable_since=since,
        breaker_released_at=released_at,
        breaker_since=breaker.since,
        breaker_cause=breaker.cause,
    )
    # The warning clock, the same in dry-run and enforce (invariant 11).
    return Plan(decisions, remember(next_state, decisions, now), breaker)


def remember(state: PolicyState, decisions: Sequence[Decision], now: float) -> PolicyState:
    """The state for the next cycle: each idle episode's warning time (invariant 11), pruned to live candidates.

    A decision carrying ``warned_at`` continues (or starts) its episode. An unknown verdict keeps the episode it had:
    not knowing is not being busy, and the idle arithmetic itself restarts wherever the data had a hole. Anything
    else (busy, below the warning threshold, exempt) ends it, and so does a candidate that is gone.
    """
    warned: dict[str, float] = {}
    for d in decisions:
        key = d.candidate.key
        if d.warned_at is not None:
            warned[key] = d.warned_at
        elif d.verdict is Verdict.UNKNOWN and key in state.warned_at:
            warned[key] = state.warned_at[key]
    return replace(state, warned_at=warned)


def select_policy(candidate: Candidate, settings: Settings, gpu_models: Mapping[str, str]) -> PolicySettings | None:
    """The first policy in ``settings.policies`` whose every non-empty criterion matches, or None.

    A criterion needing a fact the candidate lacks (namespaces but no pod, users but no user) does not match.
    ``gpu_models`` maps GPU uuid -> model name. See ``choose_policy`` for groups and profiles the hub did not tell.
    """
    return choose_policy(candidate, settings, gpu_models)[0]


def choose_policy(
    candidate: Candidate, settings: Settings, gpu_models: Mapping[str, str]
) -> tuple[PolicySettings | None, str | None]:
    """(the first matching policy, None), or (None, why) when which policy applies is unknown.

    A policy matching on ``groups`` or ``profiles`` needs the JupyterHub facts of the candidate's user: when the
    candidate belongs to a user but the hub did not tell those facts (no hub server matched this cycle, the token
    lacks ``read:users:groups``, unreadable ``user_options``) and every other criterion of that policy matches, the
    answer is unknown rather than a later, perhaps shorter, policy. A candidate of no user matches no such policy.
    """
    for policy in settings.policies:
        if _matches(policy, candidate, gpu_models):
            return policy, None
        if _matches(policy, candidate, gpu_models, hub_keys=False):
            why = _hub_facts_unknown(policy, candidate)
            if why is not None:
                return None, why
    return None, None


def _hub_facts_unknown(policy: PolicySettings, c: Candidate) -> str | None:
    """Why ``policy``'s groups / profiles criteria cannot be judged for ``c``, or None."""
    m = policy.match
    users = _users(c)
    if not (m.groups or m.profiles) or not users:
        return None
    s = c.server
    if s is None:
        return (
            f"policy {policy.name} matches on JupyterHub {'groups' if m.groups else 'profiles'}, but no hub "
            f"server of user {users[0]} is known this cycle"
        )
    if m.groups and s.groups is None:
        return (
            f"policy {policy.name} matches on JupyterHub groups, but the hub did not return {s.user}'s groups "
            "(does the token have read:users:groups?)"
        )
    if m.profiles and not s.options_known:
        return (
            f"policy {policy.name} matches on profiles, but the server's user_options are not readable "
            "(profile unknown)"
        )
    return None


def gpu_idle_seconds(
    samples: Sequence[GpuSample],
    threshold: float,
    now: float,
    started_at: float,
    sample_interval: float,
    history: GpuHistory | None = None,
) -> float | None:
    """Seconds the GPU has been continuously below ``threshold`` at the end of the series; None when unknown.

    Unknown: no sample since ``started_at``, the newest sample is stale (older than 3 intervals), down, or has
    no utilisation. The run stops (counting starts after it) at a busy or unknown sample or a gap longer than
    3 intervals, and never reaches before ``started_at``. 0.0 when the newest sample is busy. With the GPU's
    ``history`` (the sampler's), a run that began before the oldest sample still held counts from its real start.
    """
    idle = _idle_run(samples, threshold, now, started_at, sample_interval)[0]
    run = history.runs.get(threshold) if history is not None else None
    if (
        idle is not None
        and run is not None
        and samples
        and history is not None
        and history.through == max(s.timestamp for s in samples)
    ):
        idle = max(idle, now - run[0])
    return idle


def idle_threshold(settings: Settings, policy_name: str | None) -> float:
    """The utilisation below which the named policy counts a GPU idle; the last policy's for an unknown name."""
    for p in settings.policies:
        if p.name == policy_name:
            return p.gpu_idle_below
    return settings.policies[-1].gpu_idle_below


def gpu_idle_by_device(
    sampler: SamplerSnapshot, decisions: Sequence[Decision], settings: Settings, now: float
) -> dict[str, float | None]:
    """Each GPU's idle seconds (``gpu_idle_seconds``) under the lowest threshold of the policies of the candidates
    holding it; a GPU nobody holds under the lowest threshold of all policies."""
    holder_threshold: dict[str, float] = {}
    for d in decisions:
        for u in d.candidate.gpu_uuids:
            holder_threshold[u] = min(holder_threshold.get(u, 1.0), idle_threshold(settings, d.policy))
    default = min(p.gpu_idle_below for p in settings.policies)
    return {
        dev.uuid: gpu_idle_seconds(
            sampler.samples.get(dev.uuid, ()),
            holder_threshold.get(dev.uuid, default),
            now,
            sampler.started_at,
            sampler.sample_interval,
            sampler.history.get(dev.uuid),
        )
        for dev in sampler.devices
    }


def fold_sample(
    history: GpuHistory | None, sample: GpuSample, thresholds: Iterable[float], sample_interval: float
) -> GpuHistory:
    """``history`` with one more sample of its GPU folded in (the sampler calls this for every sample it takes).

    Per idle threshold it carries the start and peak of the current continuous idle run; a busy, unknown or down
    sample, a gap longer than 3 intervals or a clock step back ends the run (counting restarts after it, as in
    ``gpu_idle_seconds``). It also remembers the newest problem, gap and process sighting, so a window longer than
    the ring is judged as the ring would judge it.
    """
    limit = STALE_FACTOR * sample_interval
    ts = sample.timestamp
    runs = dict(history.runs) if history is not None else {}
    problem_at, problem = (history.problem_at, history.problem) if history is not None else (None, "")
    gap_end, gap = (history.gap_end, history.gap) if history is not None else (None, 0.0)
    seen = history.process_seen_at if history is not None else None
    if history is not None and not 0 < ts - history.through <= limit:
        gap_end, gap = ts, ts - history.through
        runs = {}
    bad = _sample_problem(sample, sample.uuid)
    if bad is not None:
        problem_at, problem = ts, bad
    for threshold in thresholds:
        run = runs.get(threshold)
        util = sample.utilization
        if bad is not None or util is None or util >= threshold:
            runs[threshold] = None
        else:
            runs[threshold] = (run[0], max(run[1], util)) if run is not None else (ts, util)
    if sample.processes:
        seen = ts
    return GpuHistory(ts, runs, problem_at, problem, gap_end, gap, seen)


def fold_presence(previous: GpuPresence | None, sample: GpuSample, sample_interval: float) -> GpuPresence:
    """``previous`` with one more sample of its GPU folded in (the sampler calls this for every sample it takes).

    A process counts from the first sample that listed it, not from when it started (an old kernel that just created
    a GPU context is doing something new: invariant 10). An unknown process list, a down GPU or a gap longer than 3
    intervals breaks every presence (whoever is listed next counts from that sample) and is remembered as the GPU's
    newest unreadable moment (invariant 15). The first-seen mapping is replaced, never changed in place, so snapshots
    can share it; while the pids do not change it is the same object.
    """
    ts = sample.timestamp
    unreadable_at = previous.unreadable_at if previous is not None else None
    unreadable = previous.unreadable if previous is not None else ""
    seen: Mapping[int, float] = {}
    if previous is not None:
        if 0 < ts - previous.through <= STALE_FACTOR * sample_interval:
            seen = previous.first_seen
        else:
            gap = ts - previous.through
            unreadable_at = ts
            unreadable = f"had no samples for {_dur(gap)}" if gap > 0 else "clock stepped back"
    if not sample.up or sample.processes is None:
        problem = _sample_problem(sample, sample.uuid) or "process list unknown"
        return GpuPresence(ts, {}, ts, problem)
    procs = sample.processes
    if (
        previous is not None
        and seen is previous.first_seen
        and len(procs) == len(seen)
        and all(p.pid in seen for p in procs)
    ):
        return GpuPresence(ts, seen, unreadable_at, unreadable)
    return GpuPresence(ts, {p.pid: seen.get(p.pid, ts) for p in procs}, unreadable_at, unreadable)


def recheck(
    decision: Decision,
    fresh: KernelActivity | None,
    sampler: SamplerSnapshot,
    settings: Settings,
    now: float,
    *,
    refreshed: Candidate | None = None,
) -> Decision:
    """Re-evaluate a planned reclaim with the gateway's fresh answer and the newest samples, just before acting.

    ``refreshed``: the candidate with its pod read again from the API server, its server asked of the hub again and
    every kernel of its target listed again (stop-server / evict-pod); it must carry the same key.
    Returns ``decision`` itself only when it is still a reclaim with the same policy and action; otherwise a
    non-reclaim decision whose reason starts with ``re-check:``. A non-reclaim decision is returned unchanged.
    """
    if decision.verdict is not Verdict.RECLAIM:
        return decision
    candidate = decision.candidate
    if refreshed is not None:
        if refreshed.key != candidate.key:
            return _unknown(candidate, decision.policy, f"re-check: got {refreshed.key}, not {candidate.key}")
        candidate = refreshed
    if candidate.kernel_id is not None:
        if fresh is None:
            return _unknown(candidate, decision.policy, "re-check: no fresh answer from the gateway")
        candidate = replace(candidate, activity=fresh)
    server = candidate.server
    if (
        actionkinds.spec(decision.action).whole == "target"
        and server is not None
        and (server.listed_at is None or not now - server.listed_at <= settings.decide_interval)
    ):
        # The cycle may have used the hub cache; the server acted on is the one the hub lists right now (inv. 13).
        return _unknown(candidate, decision.policy, f"re-check: server {server.label} was not asked of the hub again")
    # The warning gate was passed by the plan seconds ago; the re-check asks only whether the candidate is still idle.
    again = _evaluate(candidate, sampler, settings, now, warned_at=decision.warned_at, gate=False)
    if again.action is not decision.action and again.fallback is not None and again.fallback.action is decision.action:
        again = again.fallback  # auto planned the milder action (the larger target was blocked): re-check that one
    if again.verdict is Verdict.RECLAIM:
        if again.action is decision.action and again.policy == decision.policy:
            return decision
        return Decision(
            candidate,
            Verdict.KEEP,
            again.action,
            f"re-check: plan changed ({decision.action.value} by policy {decision.policy} -> "
            f"{again.action.value} by policy {again.policy}); deciding again next cycle",
            again.policy,
            again.idle_seconds,
            None,
        )
    return replace(again, reason=f"re-check: {again.reason}")


def recheck_failed(decision: Decision, problem: str) -> Decision:
    """A planned reclaim whose target could not be read again right before acting: unknown, never acted on."""
    return _unknown(decision.candidate, decision.policy, f"re-check: {problem}")


# --------------------------------------------------------------------------- one candidate


@dataclass(frozen=True, slots=True)
class _GpuView:
    """One held GPU as the policy sees it over the candidate's window."""

    label: str  # "GPU 0"
    unknown: str | None = None  # why the GPU cannot count as idle; set -> verdict unknown
    idle_seconds: float = 0.0
    peak: float = 0.0  # highest utilisation during the idle run, or the newest one when busy
    busy: bool = False
    process_seen_at: float | None = None  # newest in-window sample showing any process (matters for bare pods)


def _evaluate(
    c: Candidate,
    sampler: SamplerSnapshot,
    settings: Settings,
    now: float,
    chosen: ActionKind | None = None,
    *,
    warned_at: float | None = None,
    gate: bool = True,
) -> Decision:
    """The verdict for one candidate, before any blast-radius limit. ``chosen``: the action ``auto`` picked.

    ``warned_at``: when this candidate's current idle episode was warned (None: not yet). With ``gate`` a reclaim
    also needs that warning to be at least ``warn_before`` old and from an earlier cycle (invariant 11).
    """
    gpu_models = {d.uuid: d.model for d in sampler.devices}
    policy, policy_unknown = choose_policy(c, settings, gpu_models)
    policy_name = policy.name if policy else None
    exemption = _exemption(c, settings)
    if exemption is not None:
        return Decision(c, Verdict.EXEMPT, ActionKind.NONE, f"exempt: {exemption}", policy_name)
    if policy_unknown is not None:
        return _unknown(c, None, policy_unknown)
    if policy is None:
        return Decision(c, Verdict.KEEP, ActionKind.NONE, "no policy matches")
    if chosen is None and policy.action == ActionKind.AUTO.value:
        return _evaluate_auto(c, sampler, settings, now, warned_at=warned_at, gate=gate)
    policy, override_note = _with_override(policy, c.pod)
    action = chosen or ActionKind(policy.action)
    spec = actionkinds.spec(action)

    problem = (
        _identity_problem(c)
        or (_activity_problem(c, settings, now) if c.kernel_id is not None else None)
        or _process_problem(c)
        or _holding_problem(c)
        or _pod_data_problem(c, settings, now)
    )
    if problem is not None:
        return _unknown(c, policy.name, problem)
    views = {uuid: _gpu_view_once(uuid, sampler, policy, now) for uuid in _held_gpus(c)}
    problem = next((v.unknown for v in views.values() if v.unknown is not None), None)
    if problem is None:
        problem = _taint(c, sampler, policy, now)
    if problem is None and spec.ends:
        problem = _action_unknown(c, spec, settings)
    if problem is not None:
        return _unknown(c, policy.name, problem)

    idle, detail = _idle_and_detail(c, views, policy, now)
    idle, detail = _bounded_by_holding(c, idle, detail, now)
    detail += override_note
    refused = actionkinds.refusal(action, c)
    if refused is not None:  # an action that would release nothing is never planned (invariant 17)
        verdict, why = refused
        if verdict is Verdict.UNKNOWN:
            return _unknown(c, policy.name, why)
        return Decision(c, verdict, action, f"{why}; {detail}", policy.name, idle)
    if spec.whole == "notebook":
        blocker = _notebook_blocker(c, action, policy, settings, now)
        if blocker is not None:
            verdict, why = blocker
            if verdict is Verdict.UNKNOWN:
                return _unknown(c, policy.name, why)
            return Decision(c, verdict, action, f"{why}; {detail}", policy.name, idle)
    if not spec.ends:
        return Decision(c, Verdict.KEEP, action, f"policy {policy.name} observes only; {detail}", policy.name, idle)
    if c.kernel_id is None and spec.needs == "kernel":
        return Decision(
            c,
            Verdict.KEEP,
            action,
            f"{action.value} cannot apply to {_pod_name(c.pod)}: it holds GPUs with no kernel "
            f"(use evict-pod or stop-server); {detail}",
            policy.name,
            idle,
        )
    not_ready = _pod_not_ready(c, spec)
    if not_ready is not None:
        return Decision(c, Verdict.KEEP, action, f"{not_ready}; {detail}", policy.name, idle)
    if spec.whole == "target":
        whole = _whole_target(c, action, policy, settings, now)
        if whole.unknown is not None:
            return _unknown(c, policy.name, whole.unknown)
        if whole.keep is not None:
            return Decision(c, Verdict.KEEP, action, f"{whole.keep}; {detail}", policy.name, idle)
        if whole.idle is not None and whole.idle < idle:  # the rest of the target was active more recently
            idle, detail = whole.idle, f"{whole.note}; {detail}"
    eta = max(0.0, policy.idle_after - idle)
    warning = ""
    if idle >= policy.idle_after - policy.warn_before:
        # Warn, then wait (invariant 11): the action comes no earlier than warn_before after this episode's warning,
        # never in the cycle that warns, even when the idle window itself ran out long ago (e.g. after a restart).
        if warned_at is None or not warned_at < now:
            warned_at, warning = now, " (warning now)"
        else:
            warning = f" (warned at {_clock(warned_at)})"
        if gate:
            eta = max(eta, warned_at + policy.warn_before - now)
        verdict = Verdict.RECLAIM if eta <= 0 and (warned_at < now or not gate) else Verdict.WARN
    else:
        warned_at, verdict = None, Verdict.KEEP
    # A countdown only means something while the candidate is idle; "kernel busy" stays just that.
    reason = f"{detail}; {action.value} in {format_duration(eta)}{warning}" if idle > 0 else detail
    return Decision(c, verdict, action, reason, policy.name, idle, eta, warned_at=warned_at)


def _evaluate_auto(
    c: Candidate, sampler: SamplerSnapshot, settings: Settings, now: float, *, warned_at: float | None, gate: bool
) -> Decision:
    """``action: auto``: the action that releases the GPU allocation where the policy allows it (actionkinds).

    When that action's target (the whole server, the whole pod) is not reclaimable but the kernel alone is, the
    kernel is shut down instead, which frees its GPU memory only; the decision carries that milder plan as its
    ``fallback`` so the blast-radius stage can switch to it when another kernel of the target blocks the larger one.
    """
    action, note = actionkinds.choose_auto(c)
    raw = _evaluate(c, sampler, settings, now, chosen=action, warned_at=warned_at, gate=gate)
    if raw.verdict is Verdict.EXEMPT or raw.policy is None:
        return raw
    # The choice is news only while the candidate is idle: "kernel busy" and unknowns stay just that.
    said = note and (raw.verdict in (Verdict.WARN, Verdict.RECLAIM) or (raw.idle_seconds or 0) > 0)
    primary = replace(raw, requested=ActionKind.AUTO, reason=f"{note}; {raw.reason}" if said else raw.reason)
    if action is actionkinds.AUTO_FALLBACK or c.kernel_id is None:
        return primary
    # The milder plan, reason without its note: _with_fallback says why it is used when it is.
    fallback = replace(
        _evaluate(c, sampler, settings, now, chosen=actionkinds.AUTO_FALLBACK, warned_at=warned_at, gate=gate),
        requested=ActionKind.AUTO,
    )
    if primary.verdict in (Verdict.RECLAIM, Verdict.WARN) or fallback.verdict not in (Verdict.RECLAIM, Verdict.WARN):
        return replace(primary, fallback=fallback)
    return _with_fallback(fallback, f"{action.value}: {raw.reason}")


def _with_fallback(fallback: Decision, why: str) -> Decision:
    """auto's milder plan (shutdown-kernel), saying why the allocation-releasing action was not taken."""
    return replace(fallback, reason=f"{actionkinds.FALLBACK_NOTE} ({why}); {fallback.reason}")


def _unknown(c: Candidate, policy: str | None, reason: str) -> Decision:
    return Decision(c, Verdict.UNKNOWN, ActionKind.NONE, reason, policy)


def _idle_and_detail(
    c: Candidate, views: Mapping[str, _GpuView], policy: PolicySettings, now: float
) -> tuple[float, str]:
    """Idle seconds (min of GPU and kernel idle time) and the human sentence explaining them."""
    gpu_text = ", ".join(
        f"{v.label} busy ({_pct(v.peak)})" if v.busy else f"{v.label} at {_pct(v.peak)} for {_dur(v.idle_seconds)}"
        for v in views.values()
    )
    idle = min(v.idle_seconds for v in views.values())
    for p in sorted(c.processes, key=lambda p: (p.gpu_uuid, p.pid)):
        sm = p.sm_utilization
        if sm is not None and _valid_ratio(sm) and sm >= policy.gpu_idle_below:
            return 0.0, f"process {p.pid} at {_pct(sm)} SM on {views[p.gpu_uuid].label}"
    if c.kernel_id is None:
        seen = [(v.process_seen_at, v.label) for v in views.values() if v.process_seen_at is not None]
        if seen:
            last_seen, label = max(seen)
            return min(idle, max(0.0, now - last_seen)), f"{gpu_text}; a process was on {label} at {_clock(last_seen)}"
        return idle, f"{gpu_text} with no process in {_pod_name(c.pod)}"
    activity = c.activity
    if activity is None or activity.last_activity is None:  # ruled out by _activity_problem; fail closed anyway
        return 0.0, "kernel activity unknown"
    if activity.execution_state == "busy":
        return 0.0, "kernel busy"
    if activity.execution_state != "idle":
        return 0.0, f"kernel {_quote(activity.execution_state or '')} (not idle)"
    last = _utc(activity.last_activity)
    kernel_idle = max(0.0, now - last.timestamp())
    since = last.strftime("%H:%M UTC" if kernel_idle < 86400 else "%Y-%m-%d %H:%M UTC")
    return min(idle, kernel_idle), f"{gpu_text} and kernel idle since {since}"


# --------------------------------------------------------------------------- policy selection and exemptions


def _matches(policy: PolicySettings, c: Candidate, gpu_models: Mapping[str, str], hub_keys: bool = True) -> bool:
    """Whether every non-empty criterion matches (``hub_keys`` False: groups and profiles are left out)."""
    m = policy.match
    pod = c.pod
    if m.namespaces and (pod is None or pod.namespace not in m.namespaces):
        return False
    if m.pod_labels and (pod is None or any(pod.labels.get(k) != v for k, v in m.pod_labels.items())):
        return False
    if m.users and not set(_users(c)) & set(m.users):
        return False
    if m.kernel_names and (c.kernel_name is None or c.kernel_name not in m.kernel_names):
        return False
    gateway = _gateway(c)
    if m.gateways and (gateway is None or gateway not in m.gateways):
        return False
    if m.gpu_models:
        models = [gpu_models[u].lower() for u in _held_gpus(c) if u in gpu_models]
        if not any(pattern.lower() in model for pattern in m.gpu_models for model in models):
            return False
    if hub_keys and m.groups:
        groups = c.server.groups if c.server is not None else None
        if groups is None or not set(groups) & set(m.groups):
            return False
    if hub_keys and m.profiles:
        profile = c.server.profile if c.server is not None else None
        if profile is None or profile not in m.profiles:
            return False
    return True


def _exemption(c: Candidate, settings: Settings) -> str | None:
    """Which exemption applies, in words, or None. Any doubt about an annotation exempts."""
    ex = settings.exemptions
    pod = c.pod
    if pod is not None:
        if ex.annotation in pod.annotations:
            value = pod.annotations[ex.annotation]
            if not (isinstance(value, str) and value.strip().lower() == "false"):
                return f"annotation {ex.annotation}={_quote(value)}"
        if IDLE_AFTER_ANNOTATION in pod.annotations and _override_seconds(pod) is None:
            raw = pod.annotations[IDLE_AFTER_ANNOTATION]
            return f"unparsable override {IDLE_AFTER_ANNOTATION}={_quote(raw)} (use e.g. 2h, 90m)"
        if pod.namespace in ex.namespaces:
            return f"namespace {pod.namespace}"
    for user in _users(c):
        if user in ex.users:
            return f"user {user}"
    if c.kernel_name is not None and c.kernel_name in ex.kernel_names:
        return f"kernel name {c.kernel_name}"
    return None


def _override_seconds(pod: PodInfo) -> float | None:
    """The pod's idle-after override in seconds; None when it is unparsable, not positive or not finite."""
    try:
        seconds = parse_duration(pod.annotations[IDLE_AFTER_ANNOTATION])
    except (ValueError, TypeError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _with_override(policy: PolicySettings, pod: PodInfo | None) -> tuple[PolicySettings, str]:
    """The policy with the pod's override applied (only ever lengthening the window), and a note for the reason."""
    if pod is None or IDLE_AFTER_ANNOTATION not in pod.annotations:
        return policy, ""
    seconds = _override_seconds(pod)
    if seconds is None or seconds <= policy.idle_after:
        return policy, ""
    note = f" (idle-after {_dur(seconds)} from pod annotation)"
    return policy.model_copy(update={"idle_after": seconds}), note


# --------------------------------------------------------------------------- what can be unknown


def _identity_problem(c: Candidate) -> str | None:
    """Why the candidate's parts do not provably belong together (invariant 3), or None."""
    if c.kernel_id is None and c.pod is None:
        return "candidate has neither a kernel id nor a pod"
    if c.kernel_id is None and not c.allocated:
        return f"{_pod_name(c.pod)} has no kernel and no GPU allocation"
    if not _held_gpus(c):
        return "candidate holds no known GPU"
    # Kernel ids are UUIDs, so any configured gateway (or the hub) may vouch for one; the id itself must agree.
    if c.kernel_id is not None and c.activity is not None and c.activity.kernel_id != c.kernel_id:
        return f"gateway answered for kernel {c.activity.kernel_id}, not {c.kernel_id}"
    if c.pod is not None and c.pod.node_name is not None and c.pod.node_name != c.node:
        return f"{_pod_name(c.pod)} runs on node {c.pod.node_name}, not {c.node}"
    for p in sorted(c.processes, key=lambda p: (p.pid, p.gpu_uuid)):
        if p.starttime is None:
            return f"process {p.pid} start time unknown (its identity cannot be bound)"
        if c.kernel_id is not None and p.kernel_id is not None and p.kernel_id != c.kernel_id:
            return f"process {p.pid} belongs to kernel {p.kernel_id}, not {c.kernel_id}"
        if p.pod_uid is not None and c.pod is None:
            return f"pod {p.pod_uid} of process {p.pid} unknown (exemptions cannot be checked)"
        if p.pod_uid is not None and c.pod is not None and p.pod_uid != c.pod.uid:
            return f"process {p.pid} runs in pod {p.pod_uid}, not {c.pod.uid}"
    return None


def pod_data_limit(settings: Settings) -> float:
    """Pod data older than this cannot vouch for anything (invariant 16): a few resyncs (the list runs at most once
    per decide cycle, so never less than a few of those)."""
    return STALE_FACTOR * max(settings.kubernetes.resync_interval, settings.decide_interval)


def _pod_data_problem(c: Candidate, settings: Settings, now: float) -> str | None:
    """Invariant 16: stale pod data cannot vouch for exemptions, the pod's state or its identity."""
    if c.pod is None:
        return None
    if c.pod_listed_at is None or not math.isfinite(c.pod_listed_at):
        return f"when the data of {_pod_name(c.pod)} was listed is unknown (exemptions cannot be vouched for)"
    age = now - c.pod_listed_at
    if age > pod_data_limit(settings):
        return (
            f"data of {_pod_name(c.pod)} is {_dur(age)} old (the pod list keeps failing): an exemption added "
            f"since would not be seen"
        )
    return None


def _holding_problem(c: Candidate) -> str | None:
    """Invariant 10: without knowing since when the candidate holds its GPUs, its idle time has no bound."""
    if c.held_since is not None and math.isfinite(c.held_since):
        return None
    if c.kernel_id is not None:
        return "when the kernel's GPU processes first appeared is unknown (not in the sampler's record)"
    return f"when {_pod_name(c.pod)} was first seen holding its GPU allocation is unknown"


def _bounded_by_holding(c: Candidate, idle: float, detail: str, now: float) -> tuple[float, str]:
    """Invariant 10: idle time never exceeds how long the candidate has held its GPUs (as this daemon saw it)."""
    assert c.held_since is not None
    held = max(0.0, now - c.held_since)
    if held >= idle:
        return idle, detail
    if c.kernel_id is not None:
        what = "its GPU process first seen"
    elif c.pod is not None and c.pod.started_at is not None and c.held_since <= c.pod.started_at:
        what = f"{_pod_name(c.pod)} started"
    else:
        what = f"{_pod_name(c.pod)} first seen holding the GPU"
    return held, f"{detail}; {what} at {_clock(c.held_since)}"


def _taint(c: Candidate, sampler: SamplerSnapshot, policy: PolicySettings, now: float) -> str | None:
    """Invariant 15: what the candidate may be doing that the daemon cannot see, in words, or None.

    An unattributed GPU process in its own pod or container may be its work. A GPU it could have a process on (its
    pod's allocation when pod-resources narrows it down, else every GPU of the node) whose process list could not be
    read inside the window may hide one. (Its own GPUs are judged sample by sample in ``_gpu_view``; unknown
    utilisation alone does not taint another GPU: a readable process list shows the candidate has no process there.)
    """
    what = "this kernel" if c.kernel_id is not None else _pod_name(c.pod)
    for p in c.unattributed:
        where = "pod" if p.pod_uid is not None else "container"
        why = redact_line(p.reason) if p.reason else "not attributed"
        return (
            f"GPU process {p.pid} on {_gpu_label(p.gpu_uuid, sampler)} in the same {where} belongs to no kernel "
            f"({why}): it may be {what}'s work"
        )
    if not sampler.unreadable:
        return None
    held = set(_held_gpus(c))
    could = _could_use(c, held)
    window_start = max(now - policy.idle_after, sampler.started_at)
    worst: tuple[float, str] | None = None
    for uuid, (at, why) in sampler.unreadable.items():
        if uuid in held or at < window_start or (could is not None and uuid not in could):
            continue
        if worst is None or at > worst[0]:
            worst = (at, f"{_gpu_label(uuid, sampler)} {why} at {_clock(at)}")
    if worst is None:
        return None
    scope = "its pod is allocated that GPU" if could is not None else "which GPUs it can use is unknown"
    return f"{worst[1]}: a process of {what} could have been there ({scope})"


def _could_use(c: Candidate, held: set[str]) -> set[str] | None:
    """The GPUs the candidate could have a process on: its pod's allocation when pod-resources lists one that covers
    every GPU it is seen on; None (any GPU of the node) when that cannot be narrowed down."""
    if c.pod is None or not c.allocated:
        return None
    allocation = set(c.allocated_gpus) | (set(c.gpu_uuids) if c.kernel_id is None else set())
    return allocation if allocation and held <= allocation else None


def _pod_not_ready(c: Candidate, spec: actionkinds.ActionSpec) -> str | None:
    """Invariant 10: a pod candidate is judged only while Running with its containers started, and no pod is acted on
    while it is terminating. In words for the reason, or None."""
    pod = c.pod
    if pod is None:
        return None
    if pod.deleting and (c.kernel_id is None or spec.whole == "target"):
        return f"{_pod_name(pod)} is terminating (deletionTimestamp set): it gives its GPUs back by itself"
    if c.kernel_id is not None:
        return None
    if pod.phase != "Running":
        return f"{_pod_name(pod)} is {_quote(pod.phase) if pod.phase else 'in an unknown phase'}, not Running"
    if not pod.containers_running:
        return f"{_pod_name(pod)} has containers that have not started"
    return None


def _process_problem(c: Candidate) -> str | None:
    """A candidate process whose GPU memory is unknown: release could not be verified after acting."""
    for p in sorted(c.processes, key=lambda p: (p.pid, p.gpu_uuid)):
        if p.used_memory_bytes is None:
            return f"process {p.pid} GPU memory unknown (NOT_AVAILABLE)"
    return None


def _activity_problem(c: Candidate, settings: Settings, now: float) -> str | None:
    """What is unknown about a kernel's activity (invariant 1), or None."""
    a = c.activity
    if a is None:
        return "kernel activity unknown (no answer from the gateway)"
    if a.error is not None:
        # No gateway name: none answered alone (not found anywhere, or several answered: conflicting sources).
        return (
            f"gateway {a.gateway} error: {redact_line(a.error)}"
            if a.gateway
            else f"kernel unknown: {redact_line(a.error)}"
        )
    age = now - a.observed_at
    if not math.isfinite(age) or age > STALE_FACTOR * settings.decide_interval:
        return f"kernel activity stale (observed {_dur(age)} ago)"
    skew_limit = settings.limits.max_clock_skew
    if a.clock_skew is not None and not abs(a.clock_skew) <= skew_limit:  # invariant 19 (NaN fails too)
        direction = "ahead of" if a.clock_skew > 0 else "behind"
        return (
            f"gateway {a.gateway} clock is {_dur(abs(a.clock_skew))} {direction} ours (its Date header; "
            f"limits.max_clock_skew {format_duration(skew_limit)}): its last_activity cannot be trusted"
        )
    if a.execution_state is None:
        return "kernel execution_state unknown"
    if a.last_activity is None:
        return "kernel last_activity unknown"
    if not isinstance(a.last_activity, datetime):
        return f"kernel last_activity unparsable ({_quote(a.last_activity)})"
    if a.last_activity.tzinfo is None:
        return "kernel last_activity has no time zone (local time could shorten the idle window)"
    ahead = a.last_activity.timestamp() - now
    if ahead > skew_limit:
        return (
            f"kernel last_activity is {_dur(ahead)} in the future (the gateway writes local time or its clock is off)"
        )
    return None


def _action_unknown(c: Candidate, spec: actionkinds.ActionSpec, settings: Settings) -> str | None:
    """A fact the action needs (``ActionSpec.needs``) and the candidate lacks, or None; an action that ends a whole
    target must find the pod and the server it ends to be one (``_target_mismatch``)."""
    missing = _NEEDS[spec.needs](c, spec.kind.value, settings)
    if missing is None and spec.whole == "target":
        return _target_mismatch(c, settings)
    return missing


def _needs_server(c: Candidate, verb: str, settings: Settings) -> str | None:
    """The exact server the hub lists (never the user's default server as a fallback)."""
    if c.server is not None:
        return None
    if c.server_error is not None:
        return f"{verb} needs the user's server as the hub lists it: {c.server_error}"
    users = _users(c)
    if not users:
        return f"{verb} needs the user's server, but neither the server nor the user is known"
    wanted = _pod_server_name(c.pod, settings)
    named = f"server {wanted!r}" if wanted else "default server"
    return (
        f"{verb} needs the server the hub lists this cycle, but it lists no {named} for user {users[0]} "
        f"(never another server instead)"
    )


def _needs_pod(c: Candidate, verb: str, settings: Settings) -> str | None:
    return f"{verb} needs the kernel's pod, which is unknown" if c.pod is None else None


def _needs_notebook(c: Candidate, verb: str, settings: Settings) -> str | None:
    """A Kubeflow Notebook's pod, and the notebook server's kernels listed."""
    if c.pod is None or actionkinds.kubeflow_notebook(c.pod) is None:
        return f"{verb} needs a Kubeflow Notebook's pod; {_pod_name(c.pod)} is not one"
    if c.notebook is None:
        return f"{verb} needs the notebook server's kernels (configure kubeflow.notebook_url)"
    if c.notebook.kernels is None:
        why = redact_line(c.notebook.error or "")
        return f"notebook {c.notebook.namespace}/{c.notebook.name} kernels unknown ({why})"
    return None


def _needs_nothing(c: Candidate, verb: str, settings: Settings) -> str | None:
    """No fact is missing: a candidate without the kernel a kernel action needs is kept (``_evaluate``), not unknown."""
    return None


# What each ``ActionSpec.needs`` asks of the candidate before the action may be planned.
_NEEDS: dict[str, Callable[[Candidate, str, Settings], str | None]] = {
    "server": _needs_server,
    "pod": _needs_pod,
    "notebook": _needs_notebook,
    "kernel": _needs_nothing,
    "": _needs_nothing,
}


def _target_mismatch(c: Candidate, settings: Settings) -> str | None:
    """The pod and the server a whole-target action ends must be one: the pod names the server found."""
    if c.server is None or c.pod is None:
        return None
    server, pod = c.server, c.pod
    if pod.user is None:
        return (
            f"{_pod_name(pod)} names no JupyterHub user ({settings.kubernetes.user_label}), so it cannot be "
            f"matched to server {server.label}"
        )
    wanted = _pod_server_name(pod, settings)
    if (pod.user, wanted) != (server.user, server.server_name):
        return (
            f"{_pod_name(pod)} runs server {_quote(pod.user + ('/' + wanted if wanted else ''))} "
            f"({settings.kubernetes.server_name_annotation}), not {server.label} as found"
        )
    return None


def _notebook_blocker(
    c: Candidate, action: ActionKind, policy: PolicySettings, settings: Settings, now: float
) -> tuple[Verdict, str] | None:
    """stop-notebook ends every kernel of the notebook server: each must be idle with last_activity older than the
    window, and the listing fresh and naming the candidate's own kernel; else (verdict, why)."""
    nb = c.notebook
    assert nb is not None and nb.kernels is not None
    label = f"notebook {nb.namespace}/{nb.name}"
    age = now - (nb.observed_at if nb.observed_at is not None else -math.inf)
    if not age <= STALE_FACTOR * settings.decide_interval:
        return Verdict.UNKNOWN, f"{label} kernel listing stale"
    listed = {k.kernel_id for k in nb.kernels}
    if c.kernel_id is not None and c.kernel_id not in listed:
        return Verdict.UNKNOWN, f"{label} does not list kernel {c.kernel_id} (not this notebook's kernel?)"
    for k in sorted(nb.kernels, key=lambda k: k.kernel_id):
        if k.error is not None or k.execution_state is None or k.last_activity is None:
            return (
                Verdict.UNKNOWN,
                f"{label}: kernel {k.kernel_id} unknown ({redact_line(k.error or 'missing fields')})",
            )
        if k.execution_state != "idle":
            return Verdict.KEEP, f"{action.value} would also end kernel {k.kernel_id} ({k.execution_state})"
        active = now - _utc(k.last_activity).timestamp()
        if active < policy.idle_after:
            return Verdict.KEEP, f"{action.value} would also end kernel {k.kernel_id} (active {_dur(active)} ago)"
    return None


# The views read in one ``plan`` call, by (GPU, sampler, now, window, threshold): a view depends on nothing else.
_VIEWS: contextvars.ContextVar[dict[tuple[str, int, float, float, float], _GpuView] | None] = contextvars.ContextVar(
    "reclaimer_policy_views", default=None
)


def _gpu_view_once(uuid: str, sampler: SamplerSnapshot, policy: PolicySettings, now: float) -> _GpuView:
    """``_gpu_view``, computed once per GPU and window within one ``plan`` call (the sampler outlives the call)."""
    memo = _VIEWS.get()
    if memo is None:
        return _gpu_view(uuid, sampler, policy, now)
    key = (uuid, id(sampler), now, policy.idle_after, policy.gpu_idle_below)
    view = memo.get(key)
    if view is None:
        view = memo[key] = _gpu_view(uuid, sampler, policy, now)
    return view


def _pod_server_name(pod: PodInfo | None, settings: Settings) -> str:
    """The server name a pod names (KubeSpawner's annotation; absent = the default server "")."""
    return pod.annotations.get(settings.kubernetes.server_name_annotation, "") if pod is not None else ""


@dataclass(frozen=True, slots=True)
class _Whole:
    """The whole target of a stop-server / evict-pod: unknown, bare (keep), or the idle time it allows."""

    unknown: str | None = None
    keep: str | None = None
    idle: float | None = None  # seconds the whole target has been idle; None: no limit beyond the candidate's own
    note: str = ""  # what limits it, for the reason


def _whole_target(c: Candidate, action: ActionKind, policy: PolicySettings, settings: Settings, now: float) -> _Whole:
    """Everything stop-server / evict-pod would end must be idle: every kernel of the target idle with
    last_activity older than the window, and the server's own activity too (invariant 12)."""
    verb = action.value
    if c.kernel_id is None and c.server is None:
        if c.server_error is not None:
            return _Whole(unknown=f"{verb} of {_pod_name(c.pod)} needs its server's activity: {c.server_error}")
        if not policy.reclaim_bare_allocations:
            return _Whole(
                keep=f"{_pod_name(c.pod)} holds GPUs with no process and no kernel or JupyterHub server "
                f"to show it is unused (policy {policy.name} does not set reclaim_bare_allocations)"
            )
        return _Whole()
    source = c.target_source or "the target"
    if c.target_kernels is None:
        return _Whole(
            unknown=f"{verb} would end every kernel of {source}, but they cannot be listed "
            f"({c.target_error or 'no listing'})"
        )
    if c.kernel_id is not None and c.kernel_id not in {k.kernel_id for k in c.target_kernels}:
        return _Whole(
            unknown=f"kernel {c.kernel_id[:8]} is not among the kernels {source} lists "
            f"(what {verb} would end is unknown)"
        )
    limit = STALE_FACTOR * settings.decide_interval
    idle, note = math.inf, ""
    for k in sorted(c.target_kernels, key=lambda k: k.kernel_id):
        who = f"kernel {k.kernel_id[:8]} in {source}"
        if k.error is not None:
            return _Whole(unknown=f"{verb} would also end {who}, whose state is unknown ({redact_line(k.error)})")
        skew = k.clock_skew  # invariant 19 for every kernel the action ends, not only the candidate's own
        if skew is not None and not abs(skew) <= settings.limits.max_clock_skew:
            direction = "ahead of" if skew > 0 else "behind"
            return _Whole(
                unknown=f"{verb} would also end {who}, whose server's clock is {_dur(abs(skew))} "
                f"{direction} ours (limits.max_clock_skew {format_duration(settings.limits.max_clock_skew)})"
            )
        age = now - k.observed_at
        if not math.isfinite(age) or age > limit:
            return _Whole(unknown=f"{verb} would also end {who}, last observed {_dur(age)} ago")
        if k.execution_state is None or not isinstance(k.last_activity, datetime):
            return _Whole(unknown=f"{verb} would also end {who}, whose state or last activity is unknown")
        if k.execution_state != "idle":
            state = "busy" if k.execution_state == "busy" else f"{_quote(k.execution_state)} (not idle)"
            return _Whole(idle=0.0, note=f"{verb} would also end {who}, which is {state}")
        last = _utc(k.last_activity)
        k_idle = max(0.0, now - last.timestamp())
        if k_idle < idle:
            idle, note = k_idle, f"{who} active at {_since(last, k_idle)}"
    server = c.server
    if server is not None:
        # The cycle's listing may come from the hub cache (hub.cache_ttl); the re-check asks the hub again anyway.
        max_age = settings.decide_interval + (settings.hub.cache_ttl if settings.hub is not None else 0.0)
        if server.listed_at is None or not now - server.listed_at <= max_age:
            ago = "never" if server.listed_at is None else f"{_dur(now - server.listed_at)} ago"
            return _Whole(unknown=f"{verb} needs a current hub listing of server {server.label} (listed {ago})")
        if server.ready is False:
            return _Whole(unknown=f"server {server.label} is not ready (starting or stopping)")
        if not isinstance(server.last_activity, datetime):
            return _Whole(unknown=f"the hub reports no last activity for server {server.label}")
        last = _utc(server.last_activity)
        s_idle = max(0.0, now - last.timestamp())
        if s_idle < idle:
            idle, note = s_idle, f"server {server.label} active at {_since(last, s_idle)}"
    return _Whole(idle=None if idle == math.inf else idle, note=note)


def _since(moment: datetime, ago: float) -> str:
    return moment.strftime("%H:%M UTC" if ago < 86400 else "%Y-%m-%d %H:%M UTC")


def _gpu_view(uuid: str, sampler: SamplerSnapshot, policy: PolicySettings, now: float) -> _GpuView:
    """Everything the policy needs about one held GPU over ``[max(now - idle_after, started_at), now]``."""
    label = _gpu_label(uuid, sampler)
    series = sampler.samples.get(uuid) or ()
    if not series:
        known = any(d.uuid == uuid for d in sampler.devices)
        return _GpuView(label, f"{label} has no samples" if known else f"{label} not in the sampler snapshot")
    limit = STALE_FACTOR * sampler.sample_interval
    if sampler.last_sample_at is not None and not now - sampler.last_sample_at <= limit:
        return _GpuView(label, f"sampler stale: last sample {_dur(now - sampler.last_sample_at)} ago")
    ordered = sorted(series, key=lambda s: s.timestamp)
    newest = ordered[-1]
    if not now - newest.timestamp <= limit:
        return _GpuView(label, f"{label} samples stale: last one {_dur(now - newest.timestamp)} ago")
    window_start = max(now - policy.idle_after, sampler.started_at)
    if ordered[0].timestamp - window_start > limit and uuid in sampler.history:  # the window outreaches the ring
        return _gpu_view_beyond_ring(uuid, label, ordered, sampler, policy, now, window_start)
    in_window = [s for s in ordered if s.timestamp >= window_start]
    later: GpuSample | None = None
    process_seen_at: float | None = None
    for s in reversed(in_window):  # newest first: the reason names the most recent problem
        problem = _sample_problem(s, uuid)
        if problem is not None:
            when = "" if s is newest else f" at {_clock(s.timestamp)}"
            return _GpuView(label, f"{label} {problem}{when}")
        if later is not None and later.timestamp - s.timestamp > limit:
            gap = later.timestamp - s.timestamp
            return _GpuView(label, f"{label} has no samples for {_dur(gap)} before {_clock(later.timestamp)}")
        if s.processes and process_seen_at is None:
            process_seen_at = s.timestamp
        later = s
    idle, peak = _idle_run(ordered, policy.gpu_idle_below, now, sampler.started_at, sampler.sample_interval)
    if idle is None:  # every sample predates started_at: nothing to count from
        return _GpuView(label, f"{label} idle time unknown")
    busy = newest.utilization is not None and newest.utilization >= policy.gpu_idle_below
    return _GpuView(label, None, idle, peak, busy, process_seen_at)


def _gpu_view_beyond_ring(
    uuid: str,
    label: str,
    ordered: Sequence[GpuSample],
    sampler: SamplerSnapshot,
    policy: PolicySettings,
    now: float,
    window_start: float,
) -> _GpuView:
    """The view over a window longer than the ring (a per-pod idle-after override), from the GPU's folded history.

    Never a frozen countdown: the idle run is counted from where it really started, however long ago; anything the
    history cannot vouch for is unknown, with the reason.
    """
    history = sampler.history[uuid]
    newest = ordered[-1]
    span = _dur(newest.timestamp - ordered[0].timestamp)
    if history.through != newest.timestamp or policy.gpu_idle_below not in history.runs:
        return _GpuView(
            label,
            f"{label}: idle_after {_dur(policy.idle_after)} is longer than the {span} of samples "
            "kept, and no idle history covers it",
        )
    if history.problem_at is not None and history.problem_at >= window_start:
        return _GpuView(label, f"{label} {history.problem} at {_clock(history.problem_at)}")
    if history.gap_end is not None and history.gap_end >= window_start:
        return _GpuView(label, f"{label} has no samples for {_dur(history.gap)} before {_clock(history.gap_end)}")
    run = history.runs[policy.gpu_idle_below]
    busy = newest.utilization is not None and newest.utilization >= policy.gpu_idle_below
    idle, peak = (max(0.0, now - run[0]), run[1]) if run is not None else (0.0, newest.utilization or 0.0)
    seen = (
        history.process_seen_at
        if history.process_seen_at is not None and history.process_seen_at >= window_start
        else None
    )
    return _GpuView(label, None, idle, peak, busy, seen)


def _sample_problem(s: GpuSample, uuid: str) -> str | None:
    """Why one sample cannot count as idle evidence, or None."""
    if s.uuid != uuid:
        return f"sample filed under the wrong GPU ({s.uuid})"
    if not s.up:
        return f"down ({_error_code(s.errors, '')})"
    if not _valid_ratio(s.utilization):
        if s.utilization is None:
            return f"utilisation unknown ({_error_code(s.errors, 'utilization')})"
        return f"utilisation invalid ({s.utilization!r})"
    if s.memory_used_bytes is None:
        return f"memory unknown ({_error_code(s.errors, 'memory')})"
    if s.processes is None:
        return f"process list unknown ({_error_code(s.errors, 'process')})"
    return None


def _idle_run(
    samples: Sequence[GpuSample], threshold: float, now: float, started_at: float, sample_interval: float
) -> tuple[float | None, float]:
    """(continuous idle seconds at the end of the series or None, peak utilisation during that run)."""
    limit = STALE_FACTOR * sample_interval
    ordered = sorted((s for s in samples if s.timestamp >= started_at), key=lambda s: s.timestamp)
    if not ordered or not now - ordered[-1].timestamp <= limit:
        return None, 0.0
    newest = ordered[-1]
    if not newest.up or not _valid_ratio(newest.utilization):
        return None, 0.0
    assert newest.utilization is not None
    if newest.utilization >= threshold:
        return 0.0, newest.utilization
    run_start, peak = newest.timestamp, newest.utilization
    for earlier, later in zip(reversed(ordered[:-1]), reversed(ordered[1:]), strict=True):
        if later.timestamp - earlier.timestamp > limit or not earlier.up or not _valid_ratio(earlier.utilization):
            break
        assert earlier.utilization is not None
        if earlier.utilization >= threshold:
            break
        run_start, peak = earlier.timestamp, max(peak, earlier.utilization)
    return max(0.0, now - run_start), peak


# --------------------------------------------------------------------------- blast radius


def _guard_shared_targets(decisions: list[Decision]) -> list[Decision]:
    """An action with a whole target (evict-pod, stop-server, stop-notebook: ``ActionSpec.whole``) ends every kernel
    in that pod, server or notebook: all of them must be reclaimable."""
    out = []
    for d in decisions:
        if d.verdict is Verdict.RECLAIM and actionkinds.spec(d.action).whole:
            blocker = next(
                (o for o in decisions if o is not d and o.verdict is not Verdict.RECLAIM and _shares_target(d, o)),
                None,
            )
            if blocker is not None:
                blocked = (
                    f"{d.action.value} would also end {blocker.candidate.key} "
                    f"({blocker.verdict.value}: {blocker.reason})"
                )
                if d.fallback is not None:  # auto: the kernel alone may still go; it frees its GPU memory only
                    d = _with_fallback(d.fallback, blocked)
                else:
                    d = replace(d, verdict=Verdict.KEEP, eta_seconds=None, reason=blocked)
        out.append(d)
    return out


def _shares_target(d: Decision, other: Decision) -> bool:
    """Whether carrying out ``d`` would also end ``other``'s candidate."""
    mine, theirs = d.candidate, other.candidate
    if mine.pod is not None and theirs.pod is not None and mine.pod.uid == theirs.pod.uid:
        return True
    return (
        actionkinds.spec(d.action).ends == "server"
        and _server_key(mine) is not None
        and _server_key(mine) == _server_key(theirs)
    )


def _apply_cooldown(decisions: list[Decision], state: PolicyState, settings: Settings, now: float) -> list[Decision]:
    """A reclaim on a key (or its pod) acted upon less than ``limits.cooldown`` ago becomes a warn."""
    cooldown = settings.limits.cooldown
    out = []
    for d in decisions:
        if d.verdict is Verdict.RECLAIM:
            keys = [d.candidate.key] + ([pod_key(d.candidate.pod.uid)] if d.candidate.pod is not None else [])
            acted = [state.last_action_at[k] for k in keys if k in state.last_action_at]
            if acted and now - max(acted) < cooldown:
                ago = now - max(acted)
                d = replace(
                    d,
                    verdict=Verdict.WARN,
                    eta_seconds=max(0.0, cooldown - ago),
                    reason=f"cooldown: acted {_dur(ago)} ago; {d.reason}",
                )
        out.append(d)
    return out


def _one_action_per_target(decisions: list[Decision], settings: Settings) -> list[Decision]:
    """Two kernels of one pod planning the same evict-pod / stop-server need a single action (the first key's)."""
    first_by_target: dict[tuple[ActionKind, str], Decision] = {}
    out = []
    for d in decisions:
        target = _target(d)
        if d.verdict is Verdict.RECLAIM and target is not None:
            first = first_by_target.setdefault((d.action, target), d)
            if first is not d:
                d = replace(
                    d,
                    verdict=Verdict.WARN,
                    eta_seconds=settings.decide_interval,
                    reason=f"covered by the {d.action.value} planned for {first.candidate.key}; {d.reason}",
                )
        out.append(d)
    return out


def _apply_circuit_breaker(
    decisions: list[Decision],
    total: int,
    settings: Settings,
    now: float,
    state: PolicyState,
    since: Mapping[str, float],
) -> tuple[list[Decision], BreakerStatus, dict[str, float]]:
    """When more than ``max_fraction_per_cycle`` of all candidates (and more than ``breaker_min_reclaims``) would be
    reclaimed, hold them back, but never forever: a candidate that has stayed reclaimable for another full window
    (its policy's ``idle_after``) may go, one per cycle. A mass flip (many turning reclaimable at once, e.g. a
    gateway answering "idle" for everything) therefore never acts in its first cycle, nor for a window after it,
    while a node that is genuinely mostly idle (after a restart reset every idle clock) is reclaimed in bounded
    time at a reduced, visible rate. Returns the decisions, the status and the next ``breaker_released_at``.
    """
    limits = settings.limits
    reclaims = [d for d in decisions if d.verdict is Verdict.RECLAIM]
    n = len(reclaims)
    released_at = {k: v for k, v in state.breaker_released_at.items() if k in since}
    allowed = round(limits.max_fraction_per_cycle * total, 9)  # 0.3 x 10 stays 3, not 3.0000000000000004
    if n <= limits.breaker_min_reclaims or n <= allowed:
        return decisions, BreakerStatus(reclaimable=n, total=total), released_at
    fresh = [d for d in reclaims if d.candidate.key not in state.reclaimable_since]
    new_trip = state.breaker_since is None
    if state.breaker_since is None:
        mass = len(fresh) > limits.breaker_min_reclaims and len(fresh) > allowed
        cause, trip_since = (BREAKER_MASS_FLIP if mass else BREAKER_SUSTAINED), now
    else:
        cause, trip_since = state.breaker_cause or BREAKER_SUSTAINED, state.breaker_since
    ready = {d.candidate.key: since[d.candidate.key] + _window(d, settings) for d in reclaims}
    steady = [d for d in reclaims if ready[d.candidate.key] <= now]
    # The one let through: least recently let through (a failing action does not keep the slot), then the longest
    # reclaimable, then by key.
    chosen = min(
        steady,
        key=lambda d: (released_at.get(d.candidate.key, -math.inf), since[d.candidate.key], d.candidate.key),
        default=None,
    )
    head = (
        f"circuit breaker: {n} of {total} would be reclaimed (max_fraction_per_cycle={limits.max_fraction_per_cycle:g})"
    )
    if len(fresh) > 1 and cause == BREAKER_MASS_FLIP and new_trip:
        head += f", {len(fresh)} of them turned reclaimable at once"
    out = []
    for d in decisions:
        if d.verdict is Verdict.RECLAIM:
            key = d.candidate.key
            if d is chosen:
                d = replace(
                    d,
                    reason=f"{head}; this one goes now (reclaimable since {_clock(since[key])}, "
                    f"one per cycle); {d.reason}",
                )
            elif ready[key] <= now:  # steady (the same test as above)
                d = _demote(d, f"{head}; held: one per cycle, another goes first", settings)
            else:
                wait = ready[key] - now
                d = replace(
                    d,
                    verdict=Verdict.WARN,
                    eta_seconds=max(settings.decide_interval, wait),
                    reason=f"{head}; held: one per cycle once reclaimable for another "
                    f"{_dur(ready[key] - since[key])} (this one from {_clock(ready[key])}); {d.reason}",
                )
        out.append(d)
    if chosen is not None:
        released_at[chosen.candidate.key] = now
    first = min(ready.values())
    status = (
        f"tripped ({cause}) since {_clock(trip_since)}: {n} of {total} would be reclaimed, more than "
        f"max_fraction_per_cycle={limits.max_fraction_per_cycle:g}; "
        + (
            f"letting {chosen.candidate.key} through this cycle (one per cycle)"
            if chosen is not None
            else f"holding all; one per cycle from {_clock(first)} if they stay reclaimable"
        )
    )
    breaker = BreakerStatus(
        tripped=True,
        cause=cause,
        reclaimable=n,
        total=total,
        since=trip_since,
        released=chosen.candidate.key if chosen is not None else None,
        new_trip=new_trip,
        reason=status,
    )
    return out, breaker, released_at


def _window(d: Decision, settings: Settings) -> float:
    """The idle_after of the decision's policy (with the pod's override): how long "another full window" is."""
    chosen = next((p for p in settings.policies if p.name == d.policy), None)
    if chosen is None:
        return max(p.idle_after for p in settings.policies)
    return _with_override(chosen, d.candidate.pod)[0].idle_after


def _apply_rate_limit(decisions: list[Decision], sampler: SamplerSnapshot, settings: Settings) -> list[Decision]:
    """Keep the ``max_actions_per_cycle`` most wasteful reclaims (GPU memory x idle seconds, ties by key)."""
    limit = settings.limits.max_actions_per_cycle
    reclaims = [d for d in decisions if d.verdict is Verdict.RECLAIM]
    if len(reclaims) <= limit:
        return decisions
    ranked = sorted(reclaims, key=lambda d: (-_waste(d, sampler), d.candidate.key))
    kept = {id(d) for d in ranked[:limit]}
    note = f"rate limit: max_actions_per_cycle={limit}"
    return [_demote(d, note, settings) if d.verdict is Verdict.RECLAIM and id(d) not in kept else d for d in decisions]


def _demote(d: Decision, note: str, settings: Settings) -> Decision:
    return replace(d, verdict=Verdict.WARN, eta_seconds=settings.decide_interval, reason=f"{note}; {d.reason}")


def _waste(d: Decision, sampler: SamplerSnapshot) -> float:
    """Held GPU bytes x idle seconds: kernels hold their processes' memory, bare pods their whole GPUs."""
    c = d.candidate
    if c.kernel_id is not None:
        held = sum(p.used_memory_bytes or 0 for p in c.processes)
    else:
        totals = {dev.uuid: dev.memory_total_bytes for dev in sampler.devices}
        held = 0
        for uuid in _held_gpus(c):
            newest = sampler.latest(uuid)
            held += totals.get(uuid) or (newest.memory_total_bytes if newest else None) or 0
    return float(held) * (d.idle_seconds or 0.0)


def _target(d: Decision) -> str | None:
    """What the action ends (``ActionSpec.ends``): the kernel, the pod, the user's server or the Kubeflow Notebook."""
    return _TARGETS[actionkinds.spec(d.action).ends](d.candidate)


def _pod_key(c: Candidate) -> str | None:
    return pod_key(c.pod.uid) if c.pod is not None else None


def _notebook_key(c: Candidate) -> str | None:
    return notebook_key(c.notebook.namespace, c.notebook.name) if c.notebook is not None else None


# The key of each ``ActionSpec.ends``: two plans ending the same one are a single action.
_TARGETS: dict[str, Callable[[Candidate], str | None]] = {
    "kernel": lambda c: c.key,
    "pod": _pod_key,
    "server": lambda c: _server_key(c),
    "notebook": _notebook_key,
    "": lambda c: None,
}


# --------------------------------------------------------------------------- small helpers


def _held_gpus(c: Candidate) -> tuple[str, ...]:
    """Every GPU the candidate holds: its own list plus the GPU of each of its processes."""
    return tuple(sorted(set(c.gpu_uuids) | {p.gpu_uuid for p in c.processes}))


def _users(c: Candidate) -> tuple[str, ...]:
    found = {c.user, c.pod.user if c.pod else None, c.server.user if c.server else None}
    return tuple(sorted(u for u in found if u))


def _gateway(c: Candidate) -> str | None:
    return c.gateway or (c.activity.gateway if c.activity else None)


def _server_key(c: Candidate) -> str | None:
    """The server stop-server would stop: only the one the hub listed (never the user's default as a fallback)."""
    return server_key(c.server.user, c.server.server_name) if c.server is not None else None


def _gpu_label(uuid: str, sampler: SamplerSnapshot) -> str:
    for device in sampler.devices:
        if device.uuid == uuid:
            return f"GPU {device.index}"
    newest = sampler.latest(uuid)
    return f"GPU {newest.index}" if newest is not None else uuid


def _pod_name(pod: PodInfo | None) -> str:
    return f"pod {pod.namespace}/{pod.name}" if pod is not None else "an unknown pod"


def _valid_ratio(value: float | None) -> bool:
    return value is not None and not isinstance(value, bool) and math.isfinite(value) and 0.0 <= value <= 1.0


def _error_code(errors: Sequence[str], about: str) -> str:
    """The NVML return code ("NOT_SUPPORTED") of the error about ``about``, else of the first error."""
    chosen = next((e for e in errors if about and about in e.lower()), errors[0] if errors else None)
    if chosen is None:
        return "no value"
    return redact_line(chosen.rpartition(":")[2] or chosen)


def _utc(moment: datetime) -> datetime:
    """In UTC; a naive datetime is read as UTC, as observe.jupyter_rest.parse_last_activity does (invariant 19)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%H:%M:%S UTC")


def _dur(seconds: float) -> str:
    return format_duration(seconds) if math.isfinite(seconds) else "an unknown time"


def _pct(ratio: float) -> str:
    return f"{round(ratio * 100)}%"


def _quote(value: object) -> str:
    return repr(redact_line(str(value)))
