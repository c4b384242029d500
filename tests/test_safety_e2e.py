"""Invariants 10 onwards end to end: the real daemon against a real Kernel Gateway kernel, real pynvml over the
fake NVML library, the real kubernetes client against the fake API server and a real gRPC kubelet pod-resources.

Each test drives one daemon through a scenario that tries to make it act wrongly, and the positive control that it
still acts when it should. The Kernel Gateway (module-scoped, from tests/test_e2e.py) is shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.app.kernelclient import GatewayRest
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult, CycleSnapshot, Decision
from reclaimer.core.config import Settings, parse_settings
from tests.support.fake_kube import FakeKube
from tests.support.fake_kubelet import FakeKubelet, pod
from tests.support.jupyter_fixtures import JupyterProcess
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid

GIB = 1024**3
IDLE_AFTER = 6.0
WARN_BEFORE = 3.0
NODE = "safety-node"
TOKEN_ENV = "SAFETY_E2E_GATEWAY_TOKEN"


@dataclass
class World:
    kg: JupyterProcess
    rest: GatewayRest
    kernel: str
    pid: int
    fake_nvml: FakeNvml
    kube: FakeKube
    kubelet: FakeKubelet
    cycles: list[tuple[CycleSnapshot, list[ActionResult]]] = field(default_factory=list)

    def decisions(self, key: str) -> list[tuple[float, Decision]]:
        return [(snap.generated_at, d) for snap, _ in self.cycles for d in snap.decisions if d.candidate.key == key]

    def results(self, key: str) -> list[tuple[float, ActionResult]]:
        return [(snap.generated_at, r) for snap, rs in self.cycles for r in rs if r.decision.candidate.key == key]


@pytest.fixture
async def world(kernel_gateway: JupyterProcess, fake_nvml: FakeNvml, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setenv(TOKEN_ENV, kernel_gateway.token)
    rest = GatewayRest(kernel_gateway.url, kernel_gateway.token)
    kid = await rest.start_kernel("python3")
    pid = await rest.pid(kid)
    kube = FakeKube().start()
    kubelet = FakeKubelet(tmp_path / "kubelet.sock").start()
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)], processes=[])
    try:
        yield World(kernel_gateway, rest, kid, pid, fake_nvml, kube, kubelet)
    finally:
        await rest.shutdown(kid)
        kubelet.stop()
        kube.stop()


def settings_for(w: World, tmp_path: Path, *, extra: str = "", gateway_url: str | None = None) -> Settings:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(w.kube.kubeconfig())
    return parse_settings(f"""
mode: enforce
node_name: {NODE}
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{w.fake_nvml.lib_path}"}}
gateways:
  - {{name: kg, url: "{gateway_url or w.kg.url}", kind: kernel-gateway, token_env: {TOKEN_ENV}, timeout: 2s}}
kubernetes: {{enabled: true, kubeconfig: "{kubeconfig}", pod_resources_socket: "{w.kubelet.socket_path}",
              resync_interval: 1s, timeout: 2s}}
policies:
  - {{name: pods, match: {{namespaces: [team-a]}}, idle_after: {IDLE_AFTER}s, warn_before: {WARN_BEFORE}s,
      action: evict-pod, reclaim_bare_allocations: true}}
  - {{name: kernels, idle_after: {IDLE_AFTER}s, warn_before: {WARN_BEFORE}s, action: shutdown-kernel}}
limits: {{max_actions_per_cycle: 5, cooldown: 1m, max_fraction_per_cycle: 1.0}}
{extra}""", "<safety-e2e>")


async def drive(w: World, settings: Settings, until: Callable[[], bool], timeout: float,
                on_cycle: Callable[[CycleSnapshot, list[ActionResult]], None] | None = None) -> Daemon:
    daemon = Daemon(settings, build_adapters(settings))

    def record(snap: CycleSnapshot, results) -> None:
        w.cycles.append((snap, list(results)))
        if on_cycle is not None:
            on_cycle(snap, list(results))

    daemon.on_cycle = record
    task = asyncio.create_task(daemon.run())
    try:
        deadline = time.monotonic() + timeout
        while not until():
            assert not task.done(), "daemon stopped early"
            assert time.monotonic() < deadline, "timed out waiting for the daemon"
            await asyncio.sleep(0.1)
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 10) == 0
    return daemon


def pod_key(kube: FakeKube, name: str) -> str:
    return f"pod:{kube.pods[('team-a', name)]['metadata']['uid']}"


# --------------------------------------------------------------------------- invariants 10 and 11


async def test_invariant_10_and_11_e2e_holding_time_and_warn_then_wait(world: World, tmp_path: Path) -> None:
    """A kernel idle at its gateway for longer than the window, whose GPU process appears only now on a GPU idle for
    the whole window, is warned and shut down no earlier than idle_after after the first sample that showed it, the
    action at least warn_before after a warning given in an earlier cycle. Pods: a Pending one and a terminating one
    holding long-free GPUs are never touched; one whose allocation appears now is evicted only idle_after later."""
    w = world
    pending = w.kube.add_pod("pending-nb", namespace="team-a", node=NODE, phase="Pending")
    w.kube.add_pod("leaving-nb", namespace="team-a", node=NODE, deletion_timestamp="2026-01-01T00:00:00Z")
    fresh = w.kube.add_pod("fresh-nb", namespace="team-a", node=NODE)
    w.kubelet.pods = [pod("pending-nb", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(1)])]}),
                      pod("leaving-nb", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(2)])]})]
    kernel_key, fresh_key = f"kernel:{w.kernel}", f"pod:{fresh['metadata']['uid']}"
    appeared: list[float] = []

    def on_cycle(snap: CycleSnapshot, results: list[ActionResult]) -> None:
        # Once the GPUs have been idle (and the kernel silent) for longer than the window, the kernel's process
        # appears on GPU 0 and the fresh pod's allocation of GPU 3 shows up.
        if not appeared and snap.generated_at - snap.sampler.started_at > IDLE_AFTER + 1:
            appeared.append(time.time())
            w.fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)],
                              processes=[FakeProcess(pid=w.pid, gpu=0, memory=GIB)])
            w.kubelet.pods = [*w.kubelet.pods, pod("fresh-nb", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(3)])]})]
        if any(r.result == "success" and r.decision.candidate.key == kernel_key for r in results):
            w.fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)], processes=[])

    def done() -> bool:
        acted = {r.decision.candidate.key for _, rs in w.cycles for r in rs if r.result == "success"}
        return {kernel_key, fresh_key} <= acted

    await drive(w, settings_for(w, tmp_path), done, timeout=90, on_cycle=on_cycle)
    t_appear = appeared[0]

    for key in (kernel_key, fresh_key):
        (acted_at, result), = [(t, r) for t, r in w.results(key) if r.result == "success"]
        # Invariant 10: not before idle_after since it first held the GPU, whatever the GPU did before.
        assert acted_at >= t_appear + IDLE_AFTER, (key, acted_at - t_appear)
        for t, d in w.decisions(key):
            if d.verdict is Verdict.RECLAIM:
                assert t >= t_appear + IDLE_AFTER
        # Invariant 11: warned in an earlier cycle, at least warn_before before the action.
        warned_at = result.decision.warned_at
        assert warned_at is not None and acted_at - warned_at >= WARN_BEFORE
        assert any(t == warned_at and d.verdict is Verdict.WARN and d.reason.endswith("(warning now)")
                   for t, d in w.decisions(key)), key
    bounded = [d.reason for _, d in w.decisions(kernel_key) if "its GPU process first seen at" in d.reason]
    assert bounded, [d.reason for _, d in w.decisions(kernel_key)]
    assert any("first seen holding the GPU at" in d.reason or "started at" in d.reason
               for _, d in w.decisions(fresh_key))
    # The Pending and the terminating pod: kept, with the reason, never evicted.
    pending_reasons = {d.reason.split(";")[0] for _, d in w.decisions(pod_key(w.kube, "pending-nb"))}
    assert pending_reasons == {"pod team-a/pending-nb is 'Pending', not Running"}, pending_reasons
    leaving = {d.verdict for _, d in w.decisions(pod_key(w.kube, "leaving-nb"))}
    assert leaving == {Verdict.KEEP}
    assert all("is terminating (deletionTimestamp set)" in d.reason
               for _, d in w.decisions(pod_key(w.kube, "leaving-nb")))
    assert [e.path.rsplit("/", 2)[-2] for e in w.kube.evictions] == ["fresh-nb"]
    assert pending["metadata"]["name"] == "pending-nb"


# --------------------------------------------------------------------------- invariant 15


async def test_invariant_15_e2e_one_failing_process_list_on_another_gpu_taints_a_host_kernel(
        world: World, tmp_path: Path) -> None:
    """The kernel's process sits on GPU 0 (idle); only GPU 2's process-list call fails. The kernel runs on the host
    (no pod, so which GPUs it can use is unknown): while the failure is inside the window it is unknown, with the
    reason, and never shut down. Positive control: once the call works again and its last failure has left the
    window, the kernel is warned and shut down."""
    from tests.support.nvml_fixtures import FakeError

    w = world
    gpus = [FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)]
    procs = [FakeProcess(pid=w.pid, gpu=0, memory=GIB)]
    w.fake_nvml.write(gpus=gpus, processes=procs,
                      errors=[FakeError("nvmlDeviceGetComputeRunningProcesses_v3", "UNKNOWN", gpu=2)])
    key = f"kernel:{w.kernel}"
    cleared: list[float] = []

    def on_cycle(snap: CycleSnapshot, results: list[ActionResult]) -> None:
        if not cleared and snap.generated_at - snap.sampler.started_at > IDLE_AFTER + WARN_BEFORE + 2:
            cleared.append(time.time())
            w.fake_nvml.write(gpus=gpus, processes=procs)  # the call on GPU 2 works again
        if any(r.result == "success" and r.decision.candidate.key == key for r in results):
            w.fake_nvml.write(gpus=gpus, processes=[])

    await drive(w, settings_for(w, tmp_path), lambda: any(r.result == "success" for _, r in w.results(key)),
                timeout=90, on_cycle=on_cycle)
    t_clear = cleared[0]
    while_failing = [d for t, d in w.decisions(key) if t < t_clear]
    assert while_failing and {d.verdict for d in while_failing} == {Verdict.UNKNOWN}
    tainted = [d.reason for d in while_failing if d.reason.startswith("GPU 2 process list unknown")]
    assert tainted and "a process of this kernel could have been there (which GPUs it can use is unknown)" in tainted[-1]
    (acted_at, _), = [(t, r) for t, r in w.results(key) if r.result == "success"]
    assert acted_at >= t_clear + IDLE_AFTER  # the last failure had to leave the window first
    assert all(d.verdict is not Verdict.RECLAIM for t, d in w.decisions(key) if t < t_clear + IDLE_AFTER)


# --------------------------------------------------------------------------- invariant 16


async def test_invariant_16_e2e_stale_pod_list_vouches_for_nothing(world: World, tmp_path: Path) -> None:
    """A pod holding a long-free GPU: right after the first pod list, every later list fails. Once the data is older
    than three resyncs the pod is unknown, with the reason, and never evicted however long it stays idle. Positive
    control: when the list works again, it is warned and evicted."""
    from tests.support.fake_kube import server_error

    w = world
    stale = w.kube.add_pod("stale-nb", namespace="team-a", node=NODE)
    w.kubelet.pods = [pod("stale-nb", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(1)])]})]
    key = f"pod:{stale['metadata']['uid']}"
    failing_since: list[float] = []
    restored: list[float] = []

    def on_cycle(snap: CycleSnapshot, results: list[ActionResult]) -> None:
        if not failing_since and any(d.candidate.key == key for d in snap.decisions):
            failing_since.append(time.time())
            w.kube.list_response = server_error()  # every pod list from now on fails
        elif failing_since and not restored and time.time() - failing_since[0] > 3 + IDLE_AFTER + WARN_BEFORE + 2:
            restored.append(time.time())
            w.kube.list_response = None

    await drive(w, settings_for(w, tmp_path), lambda: any(r.result == "success" for _, r in w.results(key)),
                timeout=90, on_cycle=on_cycle)
    limit = 3 * 1.0  # 3 x max(resync 1s, decide 500ms)
    during = [(t, d) for t, d in w.decisions(key) if failing_since[0] + limit + 1.0 < t < restored[0]]
    assert during and {d.verdict for _, d in during} == {Verdict.UNKNOWN}, {d.reason for _, d in during}
    assert all(d.reason.startswith("data of pod team-a/stale-nb is ") and "the pod list keeps failing" in d.reason
               for _, d in during)
    (evicted_at, _), = [(t, r) for t, r in w.results(key) if r.result == "success"]
    assert evicted_at > restored[0]
    assert len(w.kube.evictions) == 1


# --------------------------------------------------------------------------- invariant 6: the cooldown, armed through the daemon


@pytest.mark.parametrize("outcome", [pytest.param("blocked", id="pdb-429"), pytest.param("already-gone", id="404")])
async def test_invariant_6_e2e_blocked_or_gone_arms_the_cooldown(world: World, tmp_path: Path, outcome: str) -> None:
    """An eviction that a PodDisruptionBudget blocks (429) or that finds the pod already gone (404) counts as acted
    upon: the following cycles say 'cooldown' and make no second eviction within the cooldown."""
    from tests.support.fake_kube import not_found, pdb_blocked

    w = world
    target = w.kube.add_pod("cool-nb", namespace="team-a", node=NODE)
    w.kubelet.pods = [pod("cool-nb", "team-a", {"main": [("nvidia.com/gpu", [gpu_uuid(1)])]})]
    w.kube.eviction_response = pdb_blocked() if outcome == "blocked" else not_found("cool-nb")
    key = f"pod:{target['metadata']['uid']}"

    def settled() -> bool:
        acted = [t for t, r in w.results(key) if r.result == outcome]
        return bool(acted) and sum(1 for t, _ in w.decisions(key) if t > acted[0]) >= 6

    await drive(w, settings_for(w, tmp_path), settled, timeout=90)
    (acted_at, _), = [(t, r) for t, r in w.results(key) if r.result == outcome]
    after = [d for t, d in w.decisions(key) if t > acted_at]
    assert after and all(d.verdict is Verdict.WARN and d.reason.startswith("cooldown: acted ") for d in after), \
        [d.reason for d in after]
    assert len(w.kube.evictions) == 1


# --------------------------------------------------------------------------- invariant 19


async def test_invariant_19_e2e_a_gateway_clock_behind_ours_vouches_for_nothing(world: World, tmp_path: Path) -> None:
    """The Kernel Gateway answers through a proxy that stamps its answers 10 minutes behind our clock (so its
    last_activity would look 10 minutes older than it is): the kernel is unknown, with the reason, and never shut
    down. Positive control: once the gateway's clock agrees again, the kernel is warned and shut down."""
    import email.utils

    from aiohttp import web

    from tests.support.recording_proxy import RecordingProxy

    class SkewedProxy(RecordingProxy):
        skew = -600.0

        async def handle(self, request: web.Request) -> web.StreamResponse:
            resp = await super().handle(request)
            resp.headers["Date"] = email.utils.formatdate(time.time() + self.skew, usegmt=True)
            return resp

    w = world
    proxy = SkewedProxy(w.kg.url)
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gpus = [FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)]
    w.fake_nvml.write(gpus=gpus, processes=[FakeProcess(pid=w.pid, gpu=0, memory=GIB)])
    key = f"kernel:{w.kernel}"
    fixed: list[float] = []

    def on_cycle(snap: CycleSnapshot, results: list[ActionResult]) -> None:
        if not fixed and snap.generated_at - snap.sampler.started_at > IDLE_AFTER + WARN_BEFORE + 2:
            fixed.append(time.time())
            proxy.skew = 0.0
        if any(r.result == "success" and r.decision.candidate.key == key for r in results):
            w.fake_nvml.write(gpus=gpus, processes=[])

    try:
        await drive(w, settings_for(w, tmp_path, gateway_url=f"http://127.0.0.1:{port}"),
                    lambda: any(r.result == "success" for _, r in w.results(key)), timeout=90, on_cycle=on_cycle)
    finally:
        await runner.cleanup()
    skewed = [d for t, d in w.decisions(key) if t < fixed[0]]
    assert skewed and {d.verdict for d in skewed} == {Verdict.UNKNOWN}
    assert any(d.reason.startswith("gateway kg clock is 10m behind ours (its Date header") for d in skewed), \
        {d.reason for d in skewed}
    (acted_at, _), = [(t, r) for t, r in w.results(key) if r.result == "success"]
    assert acted_at > fixed[0]


async def test_invariant_19_e2e_a_reused_pid_is_not_the_process_nvml_listed(fake_nvml: FakeNvml,
                                                                             tmp_path: Path) -> None:
    """The real daemon (one cycle, real pynvml over the fake NVML) attributes through a fake /proc: the process now at
    the listed pid started after the sample that listed it, so it is not a kernel's GPU process and no candidate is
    made; the reason is in the report's unattributed list. Positive control: the same process dated before the
    sample is the kernel's."""
    from tests.support.procfs_fixtures import FakeProc, kernel_cmdline

    kid = "0c0ffee0-0000-4000-8000-000000000019"
    proc = FakeProc(tmp_path / "proc")
    proc.host_init()
    proc.add(4321, ppid=1, cmdline=kernel_cmdline(kid), starttime=100_000)  # 1000 s after boot (CLK_TCK 100)
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[FakeProcess(pid=4321, gpu=0, memory=GIB)])

    async def one_cycle(uptime: float) -> CycleSnapshot:
        proc.set_uptime(uptime)
        settings = parse_settings(f"""
node_name: {NODE}
sample_interval: 200ms
decide_interval: 500ms
procfs_root: "{proc.root}"
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: false}}
""", "<pid-reuse>")
        snaps: list[CycleSnapshot] = []
        daemon = Daemon(settings, build_adapters(settings))
        daemon.on_cycle = lambda snap, results: snaps.append(snap)
        assert await daemon.run(once=True, serve=False) == 0
        return snaps[-1]

    reused = await one_cycle(uptime=900.0)  # booted 900 s ago: the process "started" 100 s from now
    assert [c.key for c in reused.decisions] == []
    (p,) = reused.unattributed
    assert p.pid == 4321 and p.reason.startswith("pid 4321 was reused: the process there now started at ")
    same = await one_cycle(uptime=2000.0)  # booted 2000 s ago: it started 1000 s ago, long before the sample
    assert [c.candidate.key for c in same.decisions] == [f"kernel:{kid}"] and same.unattributed == ()
