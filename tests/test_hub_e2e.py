"""stop-server end to end against a real JupyterHub (local spawner, configurable-http-proxy): a kernel in bob's named
server holds an idle GPU; with no gateway configured, the daemon finds the kernel through the hub, and stops the
server after idle_after."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from reclaimer.config import parse_settings
from reclaimer.daemon import Daemon, build_adapters
from reclaimer.demo import free_port
from reclaimer.hub import HubClient
from reclaimer.model import Verdict
from tests.support.jupyter_fixtures import (  # noqa: F401  (session fixtures used by name)
    JupyterProcess,
    jupyterhub,
    kernel_pid,
    spawn_servers,
    start_kernel,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, fake_nvml, fake_nvml_libs, gpu_uuid  # noqa: F401

GIB = 1024**3


async def test_daemon_stops_an_idle_users_server_through_the_hub(
    jupyterhub: JupyterProcess, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub = jupyterhub
    await asyncio.to_thread(spawn_servers, hub, ("bob", "gpu"))
    admin = hub.extra["admin_token"]
    server_url = hub.url + "/user/bob/gpu"
    kid = await start_kernel(server_url, admin)
    pid = await kernel_pid(server_url, admin, kid)  # talking to the kernel also makes it idle
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[FakeProcess(pid=pid, gpu=0, memory=6 * GIB)])
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
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 15)

    (result,) = [r for _, rs in seen for r in rs if r.result == "success"]
    cand = result.decision.candidate
    assert cand.kernel_id == kid and cand.server is not None
    assert (cand.server.user, cand.server.server_name) == ("bob", "gpu") and cand.user == "bob"
    assert result.decision.action.value == "stop-server"
    # Observed through the hub (no gateway is configured), idle, and warned before acting.
    first = next(d for s, _ in seen for d in s.decisions if d.candidate.kernel_id == kid and d.candidate.activity
                 and d.candidate.activity.error is None)
    assert first.candidate.activity.gateway == "jupyterhub" and first.candidate.activity.execution_state == "idle"
    assert Verdict.WARN in [d.verdict for s, _ in seen for d in s.decisions if d.candidate.kernel_id == kid]
    client = HubClient(settings.hub)
    try:
        servers = await client.list_servers()
    finally:
        await client.close()
    assert servers is not None and ("bob", "gpu") not in {(s.user, s.server_name) for s in servers}
