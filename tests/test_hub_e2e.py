"""stop-server end to end against a real JupyterHub (local spawner, configurable-http-proxy).

Two named servers, each with a kernel holding an idle GPU and a second kernel holding none:
  bob/gpu    the second kernel is idle too, the server's own activity old  -> stopped after idle_after
  alice/two  the second kernel is running a cell                            -> never stopped (invariant 12)
With no gateway configured, the daemon finds the kernels through the hub, lists every kernel of each server, and
stops only the server whose whole target is idle.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from reclaimer.core.config import parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.observe.hub import HubClient
from reclaimer.core.verdicts import Verdict
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    hub_request,
    kernel_pid,
    run_code,
    spawn_servers,
    start_kernel,
    wait_for_state,
    wake_kernel,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid

GIB = 1024**3


async def test_invariant_12_daemon_stops_only_the_server_whose_every_kernel_is_idle(
    jupyterhub: JupyterProcess, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub = jupyterhub
    await asyncio.to_thread(spawn_servers, hub, ("bob", "gpu"), ("alice", "two"))
    admin = hub.extra["admin_token"]
    bob_url, alice_url = hub.url + "/user/bob/gpu", hub.url + "/user/alice/two"
    bob_gpu, bob_cpu, alice_gpu, alice_cpu = await asyncio.gather(
        start_kernel(bob_url, admin), start_kernel(bob_url, admin), start_kernel(alice_url, admin),
        start_kernel(alice_url, admin))
    # Talking to a kernel also makes it idle; alice's second kernel then runs a long cell (a training loop).
    bob_pid, alice_pid, *_ = await asyncio.gather(
        kernel_pid(bob_url, admin, bob_gpu), kernel_pid(alice_url, admin, alice_gpu),
        wake_kernel(bob_url, admin, bob_cpu), wake_kernel(alice_url, admin, alice_cpu))
    await run_code(alice_url, admin, alice_cpu, "import time; time.sleep(600)", wait=False)
    await wait_for_state(alice_url, admin, alice_cpu, "busy")
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0), FakeGpu(uuid=gpu_uuid(1), util=0)],
                    processes=[FakeProcess(pid=bob_pid, gpu=0, memory=6 * GIB),
                               FakeProcess(pid=alice_pid, gpu=1, memory=6 * GIB)])
    monkeypatch.setenv("HUB_E2E_TOKEN", hub.token)
    settings = parse_settings(f"""
mode: enforce
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: false}}
hub: {{url: "{hub.url}", token_env: HUB_E2E_TOKEN, timeout: 3s}}
policies: [{{name: servers, idle_after: 3s, warn_before: 1s, action: stop-server}}]
""")
    daemon = Daemon(settings, build_adapters(settings))
    seen: list = []
    daemon.on_cycle = lambda snap, results: seen.append((snap, list(results)))
    task = asyncio.create_task(daemon.run(serve=False))
    try:
        deadline = time.monotonic() + 60
        while not any(r.result == "success" for _, rs in seen for r in rs):
            assert time.monotonic() < deadline and not task.done(), [d.reason for s, _ in seen[-1:] for d in s.decisions]
            await asyncio.sleep(0.1)
        # alice's server stays, with the reason, for a few more cycles after bob's was stopped.
        stopped_at = len(seen)
        while len(seen) < stopped_at + 4:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.1)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 15)

    (result,) = [r for _, rs in seen for r in rs if r.result == "success"]
    cand = result.decision.candidate
    assert cand.kernel_id == bob_gpu and cand.server is not None
    assert (cand.server.user, cand.server.server_name) == ("bob", "gpu") and cand.user == "bob"
    assert result.decision.action.value == "stop-server"
    # The decision covered the whole server: both of bob's kernels, idle, listed through the hub.
    assert {k.kernel_id for k in cand.target_kernels or ()} == {bob_gpu, bob_cpu}
    assert cand.target_source == "server bob/gpu"
    # Observed through the hub (no gateway is configured), idle, and warned before acting.
    first = next(d for s, _ in seen for d in s.decisions if d.candidate.kernel_id == bob_gpu and d.candidate.activity
                 and d.candidate.activity.error is None)
    assert first.candidate.activity.gateway == "jupyterhub" and first.candidate.activity.execution_state == "idle"
    assert Verdict.WARN in [d.verdict for s, _ in seen for d in s.decisions if d.candidate.kernel_id == bob_gpu]

    # alice's GPU kernel is idle on an idle GPU, but stopping her server would end the running cell: never acted on.
    alice = [d for s, _ in seen for d in s.decisions if d.candidate.kernel_id == alice_gpu]
    assert alice and Verdict.RECLAIM not in {d.verdict for d in alice}
    blocked = f"stop-server would also end kernel {alice_cpu[:8]} in server alice/two, which is busy"
    assert any(d.verdict is Verdict.KEEP and d.reason.startswith(blocked) for d in alice), [d.reason for d in alice]
    client = HubClient(settings.hub)
    try:
        servers = await client.list_servers()
    finally:
        await client.close()
    listed = {(s.user, s.server_name) for s in servers or []}
    assert servers is not None and ("bob", "gpu") not in listed and ("alice", "two") in listed
    assert (await wait_for_state(alice_url, admin, alice_cpu, "busy"))["id"] == alice_cpu
    await asyncio.to_thread(hub_request, hub, "DELETE", "/hub/api/users/alice/servers/two")
