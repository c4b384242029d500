"""End to end: the daemon against a real Kernel Gateway with real kernels, real pynvml over the fake NVML library,
the real kubernetes client against the fake API server, and a real gRPC kubelet pod-resources server.

Kernels (real ipykernel processes):  idle      idle kernel on an idle GPU          -> shut down after idle_after
                                     training  long silent cell, GPU idle          -> never touched (kernel busy)
                                     reserved  exempt kernelspec                   -> reported exempt
                                     gpubusy   idle kernel whose GPU is busy       -> never touched (GPU busy)
Pod (fake API + kubelet):            a pod holding GPU 4 with no process at all  -> evicted (policy evict-pod)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import RESERVED_KERNEL, free_port
from reclaimer.app.kernelclient import GatewayRest
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult, CycleSnapshot
from reclaimer.core.config import Settings, parse_settings
from tests.support.fake_kube import FakeKube
from tests.support.fake_kubelet import FakeKubelet, pod
from tests.support.jupyter_fixtures import JupyterProcess
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.support.recording_proxy import RecordingProxy

pytestmark = pytest.mark.e2e  # the whole node end to end: a real Kernel Gateway and the daemon in real time

GIB = 1024**3
IDLE_AFTER = 6.0
NODE = "e2e-node"
TOKEN_ENV = "E2E_GATEWAY_TOKEN"


@dataclass
class Node:
    kg: JupyterProcess
    rest: GatewayRest
    proxy: RecordingProxy
    proxy_url: str
    kernels: dict[str, str]  # role -> kernel id
    pids: dict[str, int]
    last_activity: dict[str, datetime]
    fake_nvml: FakeNvml
    kube: FakeKube
    kubelet: FakeKubelet
    pod_uid: str
    cycles: list[tuple[CycleSnapshot, list[ActionResult]]] = field(default_factory=list)

    def gpu_state(self, without: frozenset[str] = frozenset()) -> dict:
        roles = [r for r in ("idle", "training", "reserved", "gpubusy") if r not in without]
        gpu_of = {"idle": 0, "training": 1, "reserved": 2, "gpubusy": 3}
        gpus = [FakeGpu(uuid=gpu_uuid(i), util=90 if i == 3 else 0) for i in range(5)]
        procs = [FakeProcess(pid=self.pids[r], gpu=gpu_of[r], memory=(gpu_of[r] + 1) * GIB) for r in roles]
        return {"gpus": gpus, "processes": procs}

    def results_for(self, role: str) -> list[ActionResult]:
        kid = self.kernels.get(role)
        return [r for _, rs in self.cycles for r in rs
                if (r.decision.candidate.kernel_id == kid if kid else r.decision.candidate.pod is not None)]


@pytest.fixture
async def node(kernel_gateway: JupyterProcess, fake_nvml: FakeNvml, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Node]:
    monkeypatch.setenv(TOKEN_ENV, kernel_gateway.token)
    rest = GatewayRest(kernel_gateway.url, kernel_gateway.token)
    roles = {"idle": "python3", "training": "python3", "reserved": RESERVED_KERNEL, "gpubusy": "python3"}
    ids = dict(zip(roles, await asyncio.gather(*(rest.start_kernel(n) for n in roles.values())), strict=True))
    pids = dict(zip(ids, await asyncio.gather(*(rest.pid(k) for k in ids.values())), strict=True))
    await rest.execute(ids["training"], "import time\ntime.sleep(600)", wait=False)
    await rest.wait_state(ids["training"], "busy")
    from reclaimer.observe.jupyter_rest import parse_last_activity

    last = {r: parse_last_activity((await rest.kernel(k))["last_activity"]) for r, k in ids.items()}
    proxy = RecordingProxy(kernel_gateway.url)
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kube = FakeKube().start()
    pod_json = kube.add_pod("idle-alloc", namespace="team-a", node=NODE)
    kubelet = FakeKubelet(tmp_path / "kubelet.sock").start()
    kubelet.pods = [pod("idle-alloc", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(4)])]})]
    n = Node(kernel_gateway, rest, proxy, f"http://127.0.0.1:{port}", ids, pids, last, fake_nvml, kube, kubelet,
             pod_json["metadata"]["uid"])
    fake_nvml.write(**n.gpu_state())
    try:
        yield n
    finally:
        for kid in ids.values():
            await rest.shutdown(kid)
        await runner.cleanup()
        kubelet.stop()
        kube.stop()


def settings_for(n: Node, mode: str, tmp_path: Path) -> Settings:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(n.kube.kubeconfig())
    return parse_settings(f"""
mode: {mode}
node_name: {NODE}
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{n.fake_nvml.lib_path}"}}
gateways:
  - {{name: kg, url: "{n.proxy_url}", kind: kernel-gateway, token_env: {TOKEN_ENV}, timeout: 2s}}
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{n.kubelet.socket_path}",
              resync_interval: 1s, timeout: 2s}}
policies:
  - {{name: pods, match: {{namespaces: [team-a]}}, idle_after: {IDLE_AFTER}s, warn_before: 3s, action: evict-pod,
      reclaim_bare_allocations: true}}
  - {{name: kernels, idle_after: {IDLE_AFTER}s, warn_before: 3s, action: shutdown-kernel}}
exemptions: {{kernel_names: [{RESERVED_KERNEL}]}}
limits: {{max_actions_per_cycle: 5, cooldown: 1m, max_fraction_per_cycle: 0.5}}
""", "<e2e>")


async def run_until(daemon: Daemon, done, timeout: float) -> None:
    task = asyncio.create_task(daemon.run())
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert not task.done(), "daemon stopped early"
            assert time.monotonic() < deadline, "timed out waiting for the daemon"
            await asyncio.sleep(0.1)
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 10) == 0


def verdicts(n: Node, role: str) -> list[Verdict]:
    kid = n.kernels[role]
    return [d.verdict for snap, _ in n.cycles for d in snap.decisions if d.candidate.kernel_id == kid]


async def test_enforce_reclaims_only_the_idle_kernel_and_the_idle_pod(node: Node, tmp_path: Path) -> None:
    n = node
    settings = settings_for(n, "enforce", tmp_path)
    daemon = Daemon(settings, build_adapters(settings))

    def on_cycle(snap: CycleSnapshot, results) -> None:
        n.cycles.append((snap, list(results)))
        if any(r.result == "success" and r.decision.candidate.kernel_id == n.kernels["idle"] for r in results):
            n.fake_nvml.write(**n.gpu_state(without=frozenset({"idle"})))  # the driver frees the dead kernel's memory

    daemon.on_cycle = on_cycle

    def done() -> bool:
        got = {(r.decision.candidate.key, r.result) for _, rs in n.cycles for r in rs}
        return (f"kernel:{n.kernels['idle']}", "verified") in got and (f"pod:{n.pod_uid}", "released") in got

    await run_until(daemon, done, timeout=60)

    # The idle kernel: warned first, shut down once, never before idle_after had passed on both signals.
    acted = [(snap, r) for snap, rs in n.cycles for r in rs
             if r.decision.candidate.kernel_id == n.kernels["idle"] and r.result == "success"]
    assert len(acted) == 1
    snap, result = acted[0]
    assert result.decision.action.value == "shutdown-kernel"
    assert snap.generated_at - n.last_activity["idle"].timestamp() >= IDLE_AFTER
    assert snap.generated_at - snap.sampler.started_at >= IDLE_AFTER
    first_act = n.cycles.index(next(c for c in n.cycles if c[0] is snap))
    assert Verdict.WARN in [d.verdict for s, _ in n.cycles[:first_act] for d in s.decisions
                            if d.candidate.kernel_id == n.kernels["idle"]]
    with pytest.raises(Exception, match="HTTP 404"):
        await n.rest.kernel(n.kernels["idle"])
    verified = [r for r in n.results_for("idle") if r.result == "verified"]
    assert verified and verified[0].reclaimed_bytes == 1 * GIB
    exposition = daemon.metrics.render()[0].decode()
    assert "reclaimer_reclaimed_gpu_memory_bytes_total 1.073741824e+09" in exposition
    assert 'reclaimer_actions_total{action="shutdown-kernel",mode="enforce",result="success"} 1.0' in exposition
    assert 'reclaimer_gateway_request_duration_seconds_count{gateway="kg"}' in exposition
    assert 'reclaimer_gateway_request_duration_seconds_count{gateway="kg"} 0.0' not in exposition
    # Invariant 17: two releases, counted apart. The kernel's memory (its pod-less process: no allocation) and the
    # pod's GPU allocation, seen released when the pod was gone; each kind of waste has its own counter.
    assert "reclaimer_released_gpus_total 1.0" in exposition
    assert 'reclaimer_actions_total{action="evict-pod",mode="enforce",result="released"} 1.0' in exposition
    assert 'reclaimer_actions_total{action="shutdown-kernel",mode="enforce",result="released"} 0.0' in exposition
    assert 'reclaimer_gpu_allocation_held_idle_seconds_total{namespace="team-a"}' in exposition
    assert 'reclaimer_gpu_held_idle_seconds_total{namespace="-"}' in exposition  # the idle kernel's memory
    assert 'reclaimer_gpu_held_idle_seconds_total{namespace="team-a"}' not in exposition  # the pod held no memory
    pod_decisions = [d for s, _ in n.cycles for d in s.decisions if d.candidate.pod is not None]
    assert pod_decisions and all(d.candidate.allocated for d in pod_decisions)

    # Busy kernel, busy GPU, exempt kernel: alive, never acted upon, with the verdicts on-call would expect.
    for role in ("training", "reserved", "gpubusy"):
        assert n.results_for(role) == []
        assert (await n.rest.kernel(n.kernels[role]))["id"] == n.kernels[role]
    # Never warned or reclaimed; "unknown" is allowed (a gateway answer slower than the cycle's timeout on a loaded
    # machine), and is itself never acted on.
    for role, expected in (("training", Verdict.KEEP), ("gpubusy", Verdict.KEEP), ("reserved", Verdict.EXEMPT)):
        seen = verdicts(n, role)
        assert expected in seen and set(seen) <= {expected, Verdict.UNKNOWN}, (role, seen)
    reasons = {d.candidate.kernel_id: d.reason for snap, _ in n.cycles for d in snap.decisions
               if d.verdict is not Verdict.UNKNOWN}  # the latest known verdict's reason per kernel
    assert reasons[n.kernels["training"]].startswith("kernel busy")
    assert "GPU 3 busy" in reasons[n.kernels["gpubusy"]]

    # The only mutating gateway call was the one shutdown.
    assert n.proxy.mutating() == [("DELETE", f"/api/kernels/{n.kernels['idle']}?no_track_activity=1")]
    # The pod: warned by Event, then evicted with its uid precondition, never deleted, then an action Event.
    (ev,) = n.kube.evictions
    assert ev.body["deleteOptions"]["preconditions"]["uid"] == n.pod_uid
    # The re-check read the pod itself again right before evicting it (invariant 12).
    reads = [i for i, r in enumerate(n.kube.requests) if r.method == "GET" and r.path.endswith("/pods/idle-alloc")]
    assert reads and reads[0] < n.kube.requests.index(ev)
    assert "gracePeriodSeconds" not in ev.body["deleteOptions"]
    assert n.kube.deletes == []
    reasons_actions = [(e["reason"], e["action"]) for e in n.kube.events]
    assert reasons_actions[0] == ("GPUIdleWarning", "Warn")
    assert ("GPUIdle", "EvictPod") in reasons_actions
    assert all(e["reportingController"] == "reclaimer.io/gpu-reclaimer" for e in n.kube.events)
    # Invariant 9: the gateway token reaches no Event, report or metric.
    from reclaimer.export.report import build_report, render_json

    assert n.kg.token not in json.dumps(n.kube.events)
    assert n.kg.token not in render_json(build_report(daemon.snapshot())) and n.kg.token not in exposition


async def test_dry_run_changes_nothing_and_creates_no_event(node: Node, tmp_path: Path) -> None:
    n = node
    settings = settings_for(n, "dry-run", tmp_path)
    daemon = Daemon(settings, build_adapters(settings))
    daemon.on_cycle = lambda snap, results: n.cycles.append((snap, list(results)))

    def done() -> bool:
        if not n.cycles:
            return False
        snap = n.cycles[-1][0]
        reclaim = {d.candidate.key for d in snap.decisions if d.verdict is Verdict.RECLAIM}
        return {f"kernel:{n.kernels['idle']}", f"pod:{n.pod_uid}"} <= reclaim

    await run_until(daemon, done, timeout=60)
    # The verdict says what enforce would do now; nothing was done.
    dry = [r for _, rs in n.cycles for r in rs]
    assert dry and {r.result for r in dry} == {"dry-run"} and {r.mode for r in dry} == {"dry-run"}
    assert n.proxy.mutating() == []
    assert [r for r in n.kube.requests if r.method != "GET"] == []
    assert n.kube.events == []
    for kid in n.kernels.values():
        assert (await n.rest.kernel(kid))["id"] == kid
    # The running daemon's /report says the same, in the contract's schema.
    report = daemon.snapshot()
    assert report is not None and report.mode == "dry-run"


async def test_report_from_a_running_daemon_and_metrics(node: Node, tmp_path: Path) -> None:
    """`reclaimer report --from URL` reads the daemon's /report; /metrics carries per-kernel series and the countdown."""
    n = node
    settings = settings_for(n, "dry-run", tmp_path)
    daemon = Daemon(settings, build_adapters(settings))
    daemon.on_cycle = lambda snap, results: n.cycles.append((snap, list(results)))
    task = asyncio.create_task(daemon.run())

    def settled() -> bool:  # a cycle in which every kernel was observed (none unknown)
        decisions = n.cycles[-1][0].decisions if n.cycles else ()
        observed = {d.candidate.kernel_id for d in decisions if d.verdict is not Verdict.UNKNOWN}
        return set(n.kernels.values()) <= observed

    try:
        deadline = time.monotonic() + 30
        while not settled():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{settings.listen}/report") as r:
                assert r.status == 200
                body = await r.json()
            async with s.get(f"http://{settings.listen}/metrics") as r:
                metrics = await r.text()
            async with s.get(f"http://{settings.listen}/readyz") as r:
                assert r.status == 200
        kernels = {k["kernel_id"]: k for k in body["kernels"]}
        assert kernels[n.kernels["training"]]["execution_state"] == "busy"
        assert kernels[n.kernels["reserved"]]["verdict"] == "exempt"
        assert 'reclaimer_kernel_info{' in metrics and n.kernels["idle"] in metrics
        from reclaimer.export.report import report_from_json
        from reclaimer.export.table import render_table

        table = render_table(report_from_json(body))
        assert n.kernels["idle"][:8] in table
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)


async def test_invariant_18_breaker_cannot_latch_after_a_gateway_outage(
    kernel_gateway: JupyterProcess, fake_nvml: FakeNvml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 of 4 GPU kernels are idle while the gateway is down (every kernel unknown). When it comes back, all three
    turn reclaimable in one cycle: a mass flip. The breaker holds them for another full window, then lets them go
    one per cycle; it never latches. The busy kernel is never touched."""
    monkeypatch.setenv(TOKEN_ENV, kernel_gateway.token)
    rest = GatewayRest(kernel_gateway.url, kernel_gateway.token)
    ids = list(await asyncio.gather(*(rest.start_kernel("python3") for _ in range(4))))
    pids = list(await asyncio.gather(*(rest.pid(k) for k in ids)))  # talking to a kernel makes it idle
    await rest.execute(ids[3], "import time\ntime.sleep(600)", wait=False)
    await rest.wait_state(ids[3], "busy")
    proxy = RecordingProxy(kernel_gateway.url, failing=True)
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gone: set[int] = set()

    def gpu_state() -> dict:
        return {"gpus": [FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)],
                "processes": [FakeProcess(pid=pids[i], gpu=i, memory=GIB) for i in range(4) if i not in gone]}

    fake_nvml.write(**gpu_state())
    settings = parse_settings(f"""
mode: enforce
node_name: {NODE}
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
gateways: [{{name: kg, url: "http://127.0.0.1:{port}", kind: kernel-gateway, token_env: {TOKEN_ENV}, timeout: 2s}}]
kubernetes: {{enabled: false}}
policies: [{{name: kernels, idle_after: {IDLE_AFTER}s, warn_before: 3s, action: shutdown-kernel}}]
limits: {{max_actions_per_cycle: 5, cooldown: 1m, max_fraction_per_cycle: 0.5, breaker_min_reclaims: 2}}
""", "<e2e-breaker>")
    daemon = Daemon(settings, build_adapters(settings))
    cycles: list[tuple[CycleSnapshot, list[ActionResult]]] = []

    def on_cycle(snap: CycleSnapshot, results) -> None:
        cycles.append((snap, list(results)))
        for r in results:
            if r.result == "success":
                gone.add(ids.index(r.decision.candidate.kernel_id))  # the driver frees the dead kernel's memory
                fake_nvml.write(**gpu_state())
        # The outage ends once the GPUs have been idle for longer than the window (idle clocks all full).
        if proxy.failing and snap.generated_at - snap.sampler.started_at > IDLE_AFTER + 1:
            proxy.failing = False

    daemon.on_cycle = on_cycle
    try:
        await run_until(daemon, lambda: gone == {0, 1, 2}, timeout=90)
        exposition = daemon.metrics.render()[0].decode()
        busy_state = (await rest.kernel(ids[3]))["execution_state"]
    finally:
        for kid in ids:
            await rest.shutdown(kid)
        await runner.cleanup()

    idle_keys = {f"kernel:{k}" for k in ids[:3]}
    # During the outage every kernel is unknown, never warned or reclaimed.
    outage = [s for s, _ in cycles if any(d.candidate.key in idle_keys and d.verdict is Verdict.UNKNOWN
                                         and "gateway kg error" in d.reason for d in s.decisions)]
    assert outage
    # The gateway comes back: all three turn reclaimable in one cycle, the breaker trips (mass flip), nothing acts.
    trip = next(i for i, (s, _) in enumerate(cycles) if s.breaker.tripped)
    snap, results = cycles[trip]
    assert (snap.breaker.cause, snap.breaker.new_trip, snap.breaker.reclaimable) == ("mass-flip", True, 3)
    assert results == []
    held = [d for d in snap.decisions if d.candidate.key in idle_keys]
    assert all(d.verdict is Verdict.WARN and "3 of them turned reclaimable at once" in d.reason for d in held)
    # Held for another full window, then one per cycle; the last two go together (no longer "most" of the node).
    acted = [(s.generated_at, r.decision.candidate.key, r.decision.reason) for s, rs in cycles for r in rs
             if r.result == "success"]
    assert {k for _, k, _ in acted} == idle_keys and len(acted) == 3
    assert acted[0][0] - snap.breaker.since >= IDLE_AFTER
    assert "this one goes now" in acted[0][2] and acted[1][0] > acted[0][0]
    # The busy kernel: alive, never acted upon; the only mutating calls were the three shutdowns.
    assert busy_state == "busy"
    assert sorted(proxy.mutating()) == sorted(("DELETE", f"/api/kernels/{k}?no_track_activity=1") for k in ids[:3])
    # /metrics: one trip, by a mass flip; the breaker is no longer tripped once the idle kernels are gone.
    assert 'reclaimer_breaker_trips_total{cause="mass-flip"} 1.0' in exposition
    assert 'reclaimer_breaker_trips_total{cause="sustained"} 0.0' in exposition
    assert "reclaimer_breaker_tripped 0.0" in exposition


async def test_invariant_12_recheck_reads_the_pod_again_an_exemption_after_the_warning_wins(
    fake_nvml: FakeNvml, tmp_path: Path
) -> None:
    """A pod holds GPU 0 with no process (its policy opts in to bare allocations). The pod list is cached for an
    hour, so the plan keeps saying evict-pod; the user annotates the pod exempt after the warning. The re-check right
    before acting GETs the pod from the API server: the exemption wins, nothing is evicted."""
    kube = FakeKube().start()
    kubelet = FakeKubelet(tmp_path / "kubelet.sock").start()
    try:
        uid = kube.add_pod("late-exempt", namespace="team-a", node=NODE)["metadata"]["uid"]
        kubelet.pods = [pod("late-exempt", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(0)])]})]
        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[])
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(kube.kubeconfig())
        settings = parse_settings(f"""
mode: enforce
node_name: {NODE}
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{kubelet.socket_path}",
              resync_interval: 1h, timeout: 2s}}
policies:
  - {{name: pods, idle_after: 3s, warn_before: 2s, action: evict-pod, reclaim_bare_allocations: true}}
""", "<e2e-reread>")
        daemon = Daemon(settings, build_adapters(settings))
        cycles: list[tuple[CycleSnapshot, list[ActionResult]]] = []
        path = "/api/v1/namespaces/team-a/pods/late-exempt"

        def on_cycle(snap: CycleSnapshot, results) -> None:
            cycles.append((snap, list(results)))
            warned = any(e["reason"] == "GPUIdleWarning" for e in kube.events)
            if warned and not kube.pods[("team-a", "late-exempt")]["metadata"]["annotations"]:
                kube.pods[("team-a", "late-exempt")]["metadata"]["annotations"]["reclaimer.io/exempt"] = "true"

        daemon.on_cycle = on_cycle
        skipped = lambda: [r for _, rs in cycles for r in rs if r.result == "skipped"]  # noqa: E731
        await run_until(daemon, lambda: len(skipped()) >= 2, timeout=60)
    finally:
        kubelet.stop()
        kube.stop()

    # The cached pod never showed the annotation: the plan said evict-pod; the re-check's GET saw it and held.
    assert all(d.verdict is not Verdict.EXEMPT for s, _ in cycles for d in s.decisions)
    assert all(r.detail == "re-check: exempt: annotation reclaimer.io/exempt='true'" for r in skipped()), skipped()
    assert all(r.decision.candidate.key == f"pod:{uid}" for r in skipped())
    assert kube.evictions == [] and kube.deletes == []
    assert len(kube.requests_to("GET", f"^{path}$")) >= 2
    assert [(e["reason"], e["action"]) for e in kube.events] == [("GPUIdleWarning", "Warn")]
