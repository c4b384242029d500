"""Executors: dry-run records only; live acts once, warns first, backs off, never forces, verifies the release.

Evictions go through the real `kubernetes` client to the fake API server; kernel shutdowns through the real
GatewayPool to an aiohttp gateway on loopback that answers as scripted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from reclaimer.act.actions import DryRunExecutor, LiveExecutor, executor_for
from reclaimer.core.config import GatewaySettings
from reclaimer.observe.gateway import GatewayClient, GatewayPool
from reclaimer.core.actions import ActionKind
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult, AttributedProcess, Candidate, Decision, GpuSample, PodInfo, ProcessSample, SamplerSnapshot, ServerRef
from tests.support import policy_fixtures
from tests.support.fake_kube import FakeKube, Reply, forbidden, multiple_pdbs, not_found, pdb_blocked, retry_after, \
    server_error

KID = "0a1b2c3d-0000-4000-8000-000000000001"
GIB = 1024**3


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as api:
        yield api


def pod_decision(api: FakeKube, verdict: Verdict = Verdict.RECLAIM, uid: str | None = None) -> Decision:
    pod_json = api.add_pod("nb-alice", namespace="team-a", node="node-1")
    pod = PodInfo(uid=uid or pod_json["metadata"]["uid"], namespace="team-a", name="nb-alice", node_name="node-1")
    cand = Candidate(key=f"pod:{pod.uid}", node="node-1", pod=pod, gpu_uuids=("GPU-0",), allocated=True)
    return Decision(cand, verdict, ActionKind.EVICT_POD, "GPU 0 at 0% for 30m", policy="p", idle_seconds=1800,
                    eta_seconds=0 if verdict is Verdict.RECLAIM else 120)


def kernel_decision(pid: int = 4242, verdict: Verdict = Verdict.RECLAIM) -> Decision:
    proc = AttributedProcess(pid=pid, starttime=7, gpu_uuid="GPU-0", used_memory_bytes=3 * GIB, sm_utilization=None,
                             kernel_id=KID, kernel_pid=pid)
    cand = Candidate(key=f"kernel:{KID}", node="node-1", kernel_id=KID, gateway="gw", gpu_uuids=("GPU-0",),
                     processes=(proc,))
    return Decision(cand, verdict, ActionKind.SHUTDOWN_KERNEL, "idle", policy="p", idle_seconds=1800, eta_seconds=0)


async def still_reclaim(d: Decision) -> Decision:
    return d


async def warn_then_execute(ex: LiveExecutor, plan: list[Decision], recheck: Any = still_reclaim) -> list[ActionResult]:
    return await policy_fixtures.warn_then_execute(ex, plan, recheck)


# --------------------------------------------------------------------------- dry-run


async def test_invariant_5_dry_run_makes_no_mutating_call_and_no_event(kube: FakeKube) -> None:
    ex = executor_for("dry-run", kube=kube.kube_client())  # adapters are ignored in dry-run by construction
    assert isinstance(ex, DryRunExecutor)
    results = await ex.execute([pod_decision(kube), pod_decision(kube, Verdict.WARN)], recheck=still_reclaim)
    assert [(r.result, r.mode) for r in results] == [("dry-run", "dry-run")]
    assert [r for r in kube.requests if r.method != "GET"] == [] and kube.events == []


# --------------------------------------------------------------------------- eviction paths


@pytest.mark.parametrize(
    "reply, result, events",
    [
        pytest.param(None, "success", [("GPUIdleWarning", "Warning"), ("GPUIdle", "Normal")], id="201"),
        pytest.param(not_found("nb-alice"), "already-gone", [("GPUIdleWarning", "Warning"), ("GPUIdle", "Normal")],
                     id="404"),
        pytest.param(pdb_blocked(), "blocked", [("GPUIdleWarning", "Warning"), ("EvictionBlockedByPDB", "Warning")],
                     id="429-pdb"),
        pytest.param(retry_after(30), "blocked", [("GPUIdleWarning", "Warning")], id="429-retry-after"),
        pytest.param(multiple_pdbs(), "failed", [("GPUIdleWarning", "Warning")], id="500-multiple-pdbs"),
        pytest.param(forbidden("nb-alice"), "failed", [("GPUIdleWarning", "Warning")], id="403"),
    ],
)
async def test_invariant_7_no_force_eviction_paths(kube: FakeKube, reply: Reply | None, result: str, events: list) -> None:
    d = pod_decision(kube)
    kube.eviction_response = reply
    ex = LiveExecutor(kube=kube.kube_client(), clock=Clock())
    (r,) = await warn_then_execute(ex, [d], recheck=still_reclaim)
    assert (r.result, r.mode) == (result, "enforce")
    (ev,) = kube.evictions
    assert ev.body["deleteOptions"]["preconditions"]["uid"] == d.candidate.pod.uid
    assert "gracePeriodSeconds" not in ev.body["deleteOptions"]  # invariant 7: no force
    assert kube.deletes == []  # invariant 7: never a DELETE instead of an eviction
    assert [(e["reason"], e["type"]) for e in kube.events] == events


async def test_invariant_3_identity_binds_eviction_to_the_pod_uid(kube: FakeKube) -> None:
    """A pod replaced under the same name (new uid) is not evicted: 409 from the uid precondition, no action."""
    d = pod_decision(kube, uid="11111111-2222-4333-8444-555555555555")
    ex = LiveExecutor(kube=kube.kube_client(), clock=Clock())
    (r,) = await warn_then_execute(ex, [d], recheck=still_reclaim)
    assert r.result == "failed" and "conflict" in r.detail
    assert ("team-a", "nb-alice") in kube.pods and kube.deletes == []


@pytest.mark.parametrize("reply", [pytest.param(pdb_blocked(), id="pdb"), pytest.param(retry_after(30), id="retry-after")])
async def test_429_backs_off_and_retries_after(kube: FakeKube, reply: Reply) -> None:
    d = pod_decision(kube)
    kube.eviction_response = reply
    clock = Clock()
    ex = LiveExecutor(kube=kube.kube_client(), clock=clock, default_backoff=300)
    await warn_then_execute(ex, [d], recheck=still_reclaim)
    clock.t += 10
    (again,) = await ex.execute([d], recheck=still_reclaim)
    assert again.result == "skipped" and "backing off" in again.detail
    assert len(kube.evictions) == 1
    kube.eviction_response = None
    clock.t += 301
    (later,) = await ex.execute([d], recheck=still_reclaim)
    assert later.result == "success" and len(kube.evictions) == 2


async def test_invariant_7_no_force_failed_eviction_is_retried_never_escalated(kube: FakeKube) -> None:
    d = pod_decision(kube)
    kube.eviction_response = multiple_pdbs()
    clock = Clock()
    ex = LiveExecutor(kube=kube.kube_client(), clock=clock)
    (first,) = await warn_then_execute(ex, [d], recheck=still_reclaim)
    assert first.result == "failed" and len(kube.evictions) == 1 and kube.deletes == []
    kube.eviction_response = None
    clock.t += ex.failure_backoff
    (second,) = await ex.execute([d], recheck=still_reclaim)
    assert second.result == "success" and len(kube.evictions) == 2 and kube.deletes == []


async def test_event_failure_never_changes_the_outcome(kube: FakeKube) -> None:
    d = pod_decision(kube)
    kube.event_response = Reply(500, {"kind": "Status", "code": 500, "message": "boom"})
    (r,) = await warn_then_execute(LiveExecutor(kube=kube.kube_client(), clock=Clock()), [d])
    assert r.result == "success" and kube.events == []


async def test_warning_event_once_per_idle_episode(kube: FakeKube) -> None:
    d = pod_decision(kube, Verdict.WARN)
    ex = LiveExecutor(kube=kube.kube_client(), clock=Clock())
    for _ in range(3):
        assert await ex.execute([d], recheck=still_reclaim) == []
    assert [e["reason"] for e in kube.events] == ["GPUIdleWarning"]
    await ex.execute([replace(d, verdict=Verdict.KEEP)], recheck=still_reclaim)  # back to work: episode over
    await ex.execute([d], recheck=still_reclaim)
    assert [e["reason"] for e in kube.events] == ["GPUIdleWarning", "GPUIdleWarning"]
    assert kube.evictions == []


async def test_recheck_that_no_longer_says_reclaim_skips_the_action(kube: FakeKube) -> None:
    d = pod_decision(kube)

    async def now_busy(dec: Decision) -> Decision:
        return replace(dec, verdict=Verdict.KEEP, reason="kernel busy")

    async def broken(dec: Decision) -> Decision:
        raise TimeoutError("gateway timed out")

    ex = LiveExecutor(kube=kube.kube_client(), clock=Clock())
    (r,) = await warn_then_execute(ex, [d], recheck=now_busy)
    assert r.result == "skipped" and "kernel busy" in r.detail
    (r2,) = await ex.execute([d], recheck=broken)
    assert r2.result == "skipped" and "re-check failed" in r2.detail
    assert kube.evictions == []


# --------------------------------------------------------------------------- kernel shutdown through a gateway


class ScriptedGateway:
    def __init__(self) -> None:
        self.status = 204
        self.deletes = 0

    def app(self) -> web.Application:
        app = web.Application()

        async def get_kernel(request: web.Request) -> web.Response:
            return web.json_response({"id": request.match_info["id"], "name": "python3",
                                      "last_activity": "2026-01-01T00:00:00Z", "execution_state": "idle",
                                      "connections": 0})

        async def delete_kernel(request: web.Request) -> web.Response:
            self.deletes += 1
            return web.Response(status=self.status)

        app.router.add_get("/api/kernels/{id}", get_kernel)
        app.router.add_delete("/api/kernels/{id}", delete_kernel)
        return app


@pytest.mark.parametrize(
    "status, result",
    [pytest.param(204, "success", id="204"), pytest.param(404, "already-gone", id="404-idempotent"),
     pytest.param(503, "failed", id="503"), pytest.param(500, "failed", id="500")],
)
async def test_invariant_8_idempotent_shutdown_paths(aiohttp_server, status: int, result: str) -> None:
    gw = ScriptedGateway()
    gw.status = status
    server = await aiohttp_server(gw.app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    try:
        ex = LiveExecutor(kernels=pool, clock=Clock())
        (r,) = await warn_then_execute(ex, [kernel_decision()], recheck=still_reclaim)
        assert r.result == result and gw.deletes == 1
        if result == "failed":  # retried after the back-off, never escalated to anything else
            (r2,) = await ex.execute([kernel_decision()], recheck=still_reclaim)
            assert r2.result == "skipped" and gw.deletes == 1
            ex.clock.t += ex.failure_backoff
            (r3,) = await ex.execute([kernel_decision()], recheck=still_reclaim)
            assert r3.result == "failed" and gw.deletes == 2
    finally:
        await pool.close()


def _snapshot(t: float, processes: tuple[ProcessSample, ...] | None, up: bool = True) -> SamplerSnapshot:
    s = GpuSample(timestamp=t, index=0, uuid="GPU-0", up=up, utilization=0.0, memory_used_bytes=0,
                  memory_total_bytes=80 * GIB, processes=processes)
    return SamplerSnapshot(devices=(), samples={"GPU-0": (s,)}, started_at=0.0, sample_interval=1.0)


async def test_invariant_8_verified_only_when_the_memory_is_gone(aiohttp_server) -> None:
    server = await aiohttp_server(ScriptedGateway().app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    clock = Clock()
    try:
        ex = LiveExecutor(kernels=pool, clock=clock, verify_within=60)
        (r,) = await warn_then_execute(ex, [kernel_decision(pid=4242)], recheck=still_reclaim)
        assert r.result == "success" and ex.pending == 1
        assert ex.verify(_snapshot(clock.t - 1, ()), clock.t) == []  # a sample from before the action proves nothing
        assert ex.verify(_snapshot(clock.t + 1, None), clock.t + 1) == []  # process list unknown: not verified
        assert ex.verify(_snapshot(clock.t + 2, (ProcessSample(4242, 3 * GIB),)), clock.t + 2) == []  # still there
        (v,) = ex.verify(_snapshot(clock.t + 3, (ProcessSample(99, GIB),)), clock.t + 3)
        assert (v.result, v.reclaimed_bytes) == ("verified", 3 * GIB) and ex.pending == 0
    finally:
        await pool.close()


async def test_unverified_after_the_deadline(aiohttp_server) -> None:
    server = await aiohttp_server(ScriptedGateway().app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    clock = Clock()
    try:
        ex = LiveExecutor(kernels=pool, clock=clock, verify_within=60)
        await warn_then_execute(ex, [kernel_decision(pid=4242)], recheck=still_reclaim)
        stuck = _snapshot(clock.t + 61, (ProcessSample(4242, 3 * GIB),))
        (v,) = ex.verify(stuck, clock.t + 61)
        assert v.result == "unverified" and v.reclaimed_bytes == 0
    finally:
        await pool.close()


async def test_server_error_events_do_not_block_kernel_actions(aiohttp_server, kube: FakeKube) -> None:
    """A kernel in a pod: the action Event fails (500) and the shutdown still counts as done."""
    kube.event_response = server_error()
    server = await aiohttp_server(ScriptedGateway().app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    try:
        d = kernel_decision()
        pod = PodInfo(uid="aaaaaaaa-0000-4000-8000-000000000001", namespace="team-a", name="nb")
        d = replace(d, candidate=replace(d.candidate, pod=pod))
        (r,) = await warn_then_execute(LiveExecutor(kernels=pool, kube=kube.kube_client(), clock=Clock()), [d])
        assert r.result == "success"
    finally:
        await pool.close()


# --------------------------------------------------------------------------- issue 10 item 4: back-off and bounds


async def test_item4_failed_actions_back_off_exponentially_per_target_with_one_event_per_attempt(
    aiohttp_server, kube: FakeKube
) -> None:
    """A gateway that fails every DELETE: attempts (and GatewayError Events) at 0, 60, 180, 420 s..., not every cycle;
    the other target is not held back; the back-off says why and for how long; success clears it."""
    gw = ScriptedGateway()
    gw.status = 500
    server = await aiohttp_server(gw.app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    clock = Clock()
    pod = PodInfo(uid="aaaaaaaa-0000-4000-8000-000000000002", namespace="team-a", name="nb")
    d = kernel_decision()
    d = replace(d, candidate=replace(d.candidate, pod=pod))
    start = clock.t
    try:
        ex = LiveExecutor(kernels=pool, kube=kube.kube_client(), clock=clock, failure_backoff=60,
                          failure_backoff_max=240)
        attempts: list[float] = []
        details: list[str] = []
        await ex.execute([replace(d, verdict=Verdict.WARN)], recheck=still_reclaim)  # invariant 11: warned first
        for _ in range(80):  # 20 minutes of 15 s cycles
            (r,) = await ex.execute([d], recheck=still_reclaim)
            if r.result == "failed":
                attempts.append(clock.t - start)
            else:
                assert r.result == "skipped"
                details.append(r.detail)
            clock.t += 15
        assert attempts == [0, 60, 180, 420, 660, 900, 1140]  # 60, 120, 240, then capped at 240
        assert gw.deletes == len(attempts)
        errors = [e for e in kube.events if e["reason"] == "GatewayError"]
        assert len(errors) == len(attempts) and "next try in 1m" in errors[0]["note"]
        assert details[0].startswith("backing off after 1 failed attempt (gateway gw: HTTP 500)")
        assert details[0].endswith("next try in 45s")
        assert ex.hold(d.candidate.key, clock.t) is not None and "failed attempts" in ex.hold(d.candidate.key, clock.t)
        # The back-off is per target: another kernel on the same gateway is tried at once (once warned).
        other = replace(d, candidate=replace(d.candidate, key="kernel:other"))
        await ex.execute([replace(d, verdict=Verdict.WARN), replace(other, verdict=Verdict.WARN)], recheck=still_reclaim)
        mine, o = await ex.execute([d, other], recheck=still_reclaim)
        assert mine.result == "skipped" and o.result == "failed"
        # Once the gateway works again, the next attempt succeeds and the back-off is gone.
        gw.status = 204
        clock.t += 240
        (ok,) = [r for r in await ex.execute([d], recheck=still_reclaim) if r.decision.candidate.key == d.candidate.key]
        assert ok.result == "success" and ex.hold(d.candidate.key, clock.t) is None
    finally:
        await pool.close()


# --------------------------------------------------------------------------- invariant 11: warn, then wait


def _event_order(kube: FakeKube) -> list[tuple[str, str]]:
    return [(e["reason"], e["action"]) for e in kube.events]


async def test_invariant_11_warning_precedes_shutdown_kernel(aiohttp_server, kube: FakeKube) -> None:
    """A reclaim the executor never warned about is warned now and not acted on; the shutdown comes a cycle later,
    after the warning Event on the kernel's pod."""
    gw = ScriptedGateway()
    server = await aiohttp_server(gw.app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    try:
        d = kernel_decision()
        pod = PodInfo(uid="aaaaaaaa-0000-4000-8000-000000000002", namespace="team-a", name="nb-bob")
        d = replace(d, candidate=replace(d.candidate, pod=pod))
        ex = LiveExecutor(kernels=pool, kube=kube.kube_client(), clock=Clock())
        (first,) = await ex.execute([d], recheck=still_reclaim)
        assert (first.result, first.detail) == ("skipped", "warned now; acting no earlier than a later cycle")
        assert gw.deletes == 0 and _event_order(kube) == [("GPUIdleWarning", "Warn")]
        (second,) = await ex.execute([d], recheck=still_reclaim)
        assert second.result == "success" and gw.deletes == 1
        assert _event_order(kube) == [("GPUIdleWarning", "Warn"), ("GPUIdle", "ShutdownKernel")]
    finally:
        await pool.close()


async def test_item4_dry_run_records_stay_bounded_by_the_live_candidates(kube: FakeKube) -> None:
    ex = DryRunExecutor()
    for cycle in range(500):  # 500 cycles, each with 3 fresh kernels that would be reclaimed
        plan = [replace(kernel_decision(), candidate=replace(kernel_decision().candidate, key=f"kernel:{cycle}-{i}"))
                for i in range(3)]
        await ex.execute(plan)
        assert len(ex.records) <= 3
    assert ex.recorded_total == 1500 and set(ex.records) == {"kernel:499-0", "kernel:499-1", "kernel:499-2"}


async def test_item4_live_executor_state_stays_bounded_by_the_live_candidates(aiohttp_server, kube: FakeKube) -> None:
    """Thousands of targets come and go, each warned, each failing once: warned set and back-offs follow the plan."""
    gw = ScriptedGateway()
    gw.status = 500
    server = await aiohttp_server(gw.app())
    pool = GatewayPool([GatewayClient(GatewaySettings(name="gw", url=str(server.make_url("")), timeout=2))])
    clock = Clock()
    try:
        ex = LiveExecutor(kernels=pool, clock=clock, failure_backoff=30, failure_backoff_max=60)
        biggest = 0
        for cycle in range(300):
            # Each target is warned in one cycle and acted on (failing) in the next (invariant 11).
            plan = [replace(kernel_decision(), candidate=replace(kernel_decision().candidate, key=f"kernel:{c}-{i}"),
                            verdict=Verdict.RECLAIM if c < cycle else Verdict.WARN)
                    for c in (cycle - 1, cycle) for i in range(2)]
            plan.append(replace(plan[0], verdict=Verdict.WARN,
                                candidate=replace(plan[0].candidate, key=f"kernel:warn-{cycle}")))
            await ex.execute(plan, recheck=still_reclaim)
            sizes = ex.tracked()
            biggest = max(biggest, sizes["warned"], sizes["backoff"])
            clock.t += 15
        # Live: 5 per cycle; back-offs also outlive their candidate while they run (60 s = 4 cycles x 2).
        assert ex.tracked()["warned"] <= 5 and biggest <= 5 + 2 * 5 and gw.deletes >= 2 * 299
    finally:
        await pool.close()


async def test_invariant_11_warning_precedes_stop_server(aiohttp_server, kube: FakeKube,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for stop-server, against the fake JupyterHub: no DELETE of the server before the warning went out."""
    from reclaimer.core.config import HubSettings
    from reclaimer.observe.hub import HubClient
    from reclaimer.core.model import ServerRef
    from tests.support.fake_hub import FakeHub

    hub = FakeHub(token="hub-token-for-warn-test")
    hub.add_server("alice")
    server = await aiohttp_server(hub.app())
    monkeypatch.setenv("RECLAIMER_TEST_WARN_HUB_TOKEN", hub.token)
    client = HubClient(HubSettings(url=str(server.make_url("")).rstrip("/"), token_env="RECLAIMER_TEST_WARN_HUB_TOKEN",
                                   timeout=2))
    try:
        d = pod_decision(kube)
        d = replace(d, action=ActionKind.STOP_SERVER,
                    candidate=replace(d.candidate, user="alice", server=ServerRef("alice", "")))
        ex = LiveExecutor(servers=client, kube=kube.kube_client(), clock=Clock())
        (first,) = await ex.execute([d], recheck=still_reclaim)
        assert first.result == "skipped"
        assert [r.method for r in hub.requests if r.method == "DELETE"] == []
        assert _event_order(kube) == [("GPUIdleWarning", "Warn")]
        (second,) = await ex.execute([d], recheck=still_reclaim)
        assert second.result == "success" and "alice" not in {u for u, s in hub.users.items() if s}
        assert [r.method for r in hub.requests if r.method == "DELETE"] == ["DELETE"]
        assert _event_order(kube) == [("GPUIdleWarning", "Warn"), ("GPUIdle", "StopServer")]
    finally:
        await client.close()


async def test_invariant_11_an_unknown_cycle_keeps_the_episode_a_busy_one_ends_it(kube: FakeKube) -> None:
    d = pod_decision(kube)
    ex = LiveExecutor(kube=kube.kube_client(), clock=Clock())
    await ex.execute([replace(d, verdict=Verdict.WARN)], recheck=still_reclaim)
    await ex.execute([replace(d, verdict=Verdict.UNKNOWN, action=ActionKind.NONE)], recheck=still_reclaim)
    (acted,) = await ex.execute([d], recheck=still_reclaim)
    assert acted.result == "success"
    await ex.execute([replace(d, verdict=Verdict.KEEP, warned_at=None)], recheck=still_reclaim)  # back to work
    (again,) = await ex.execute([d], recheck=still_reclaim)
    assert again.result == "skipped" and "warned now" in again.detail
    assert [e["reason"] for e in kube.events] == ["GPUIdleWarning", "GPUIdle", "GPUIdleWarning"]


class RecordingHub:
    """A ServerStopper that records what it was asked to stop."""

    def __init__(self) -> None:
        self.stopped: list[tuple[str, str]] = []

    async def stop_server(self, user: str, server_name: str = "") -> tuple[str, str]:
        self.stopped.append((user, server_name))
        return "success", f"stopped {user}/{server_name}"

    async def shutdown_server_kernel(self, server: object, kernel_id: str) -> tuple[str, str]:
        raise AssertionError("not expected")


@pytest.mark.parametrize(
    "server, stopped, result",
    [
        pytest.param(None, [], "skipped", id="no-listed-server-never-the-default"),
        pytest.param(ServerRef("alice", "gpu", listed_at=1.0), [("alice", "gpu")], "success", id="the-listed-server"),
    ],
)
async def test_invariant_13_executor_stops_only_the_listed_server(
    server: ServerRef | None, stopped: list[tuple[str, str]], result: str
) -> None:
    hub = RecordingHub()
    d = kernel_decision()
    d = replace(d, action=ActionKind.STOP_SERVER, candidate=replace(d.candidate, user="alice", server=server))
    ex = LiveExecutor(servers=hub, clock=Clock())
    (warned,) = await ex.execute([d], recheck=still_reclaim)  # warn, then act (invariant 11)
    assert warned.result == "skipped" and hub.stopped == []
    (r,) = await ex.execute([d], recheck=still_reclaim)
    assert (r.result, hub.stopped) == (result, stopped)
    if server is None:
        assert r.detail == "no JupyterHub server listed for this candidate"
