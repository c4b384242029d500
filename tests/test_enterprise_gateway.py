"""Jupyter Enterprise Gateway for real (3.x, its own virtualenv, local kernels): per-kernel GETs, listing refused by
default and allowed with EG_LIST_KERNELS, shutdown, EG's own idle culler running alongside ours, token auth; and
invariant 14 end to end: a Jupyter Server with --gateway-url and the EG behind it both answer for one kernel id."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from reclaimer.core.config import GatewaySettings, parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.observe.gateway import CONFLICTING_GATEWAYS, GatewayClient, GatewayPool
from reclaimer.core.verdicts import Verdict
from tests.support.jupyter_fixtures import (
    EG_USER,
    JupyterProcess,
    JupyterTestError,
    auth,
    kernel_pid,
    run_code,
    shutdown_kernel,
    start_enterprise_gateway,
    start_jupyter_server_with_gateway,
    start_kernel,
    wait_for_state,
    wake_kernel,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid

pytestmark = pytest.mark.e2e  # every test here starts real servers or processes

GIB = 1024**3


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll an async or plain predicate until it returns something truthy (deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.1)


def _client(handle: JupyterProcess, name: str, monkeypatch: pytest.MonkeyPatch, token: str | None = None) -> GatewayClient:
    env = f"RECLAIMER_TEST_EG_{name.upper().replace('-', '_')}"
    monkeypatch.setenv(env, handle.token if token is None else token)
    return GatewayClient(GatewaySettings(name=name, url=handle.url, kind="enterprise-gateway", timeout=10.0,
                                         token_env=env))


async def _eg_kernel(eg: JupyterProcess) -> str:
    kid = await start_kernel(eg.url, eg.token, env=eg.extra["kernel_env"])
    await wake_kernel(eg.url, eg.token, kid)
    return kid


async def _run_until_reported_busy(eg: JupyterProcess, kid: str) -> None:
    """Start a long cell and wait until Enterprise Gateway's kernel model says "busy".

    EG 3.3 runs on jupyter_server 1.x, which sets ``execution_state`` from every IOPub status message, including
    those answering the kernel_info_request it sends on the *control* channel when a websocket connects (the
    "nudge"). ipykernel answers control requests on its own thread, so under load that answer's "idle" can land
    after the cell's "busy" and the model says "idle" while the cell runs (jupyter_server 2.x only counts the
    message types it tracks). A second cell sent while the first runs reports "busy" when it starts, long after
    its connection's nudge was answered, so one retry is enough; the assertions below are about our client.
    """
    await run_code(eg.url, eg.token, kid, "import time; time.sleep(15)", wait=False)
    try:
        await wait_for_state(eg.url, eg.token, kid, "busy", timeout=10)
        return
    except JupyterTestError:
        pass
    await run_code(eg.url, eg.token, kid, "import time; time.sleep(60)", wait=False, timeout=60)
    await wait_for_state(eg.url, eg.token, kid, "busy")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _raw(method: str, url: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    headers = auth(token) if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None) if r.status != 204 else None


# --------------------------------------------------------------------------- the gateway client against a real EG


async def test_eg_refuses_kernels_for_root_unless_the_request_names_a_user(enterprise_gateway: JupyterProcess) -> None:
    eg = enterprise_gateway
    status, body = await _raw("POST", eg.url + "/api/kernels", eg.token, {"name": "python3"})
    assert status == 403 and "KERNEL_USERNAME" in body["reason"]
    kid = await start_kernel(eg.url, eg.token, env={"KERNEL_USERNAME": EG_USER})  # positive control
    await shutdown_kernel(eg.url, eg.token, kid)


async def test_eg_per_kernel_get_and_pool_discovery_with_listing_refused(enterprise_gateway: JupyterProcess,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    eg = enterprise_gateway
    kid = await _eg_kernel(eg)
    pid = await kernel_pid(eg.url, eg.token, kid)
    await wait_for_state(eg.url, eg.token, kid, "idle")
    client = _client(eg, "eg", monkeypatch)
    pool = GatewayPool([client])
    try:
        listing = await client.listing()
        got = (await pool.observe([kid]))[kid]
        await _run_until_reported_busy(eg, kid)
        busy = (await pool.observe([kid]))[kid]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    finally:
        await pool.close()
        await shutdown_kernel(eg.url, eg.token, kid)
    # EG's default: listing refused (unknown, not "no kernels"); discovery still finds the kernel per id.
    assert listing.kernels is None and listing.forbidden and "HTTP 403" in str(listing.error)
    assert got.error is None and got.gateway == "eg" and got.execution_state == "idle" and got.kernel_name == "python3"
    assert got.last_activity is not None and abs((datetime.now(timezone.utc) - got.last_activity).total_seconds()) < 600
    assert busy.error is None and busy.execution_state == "busy"
    assert pool.gateway_up() == {"eg": True}
    # Local kernels name their connection file: attributed through the command line as any other kernel.
    assert any(f"kernel-{kid}.json".encode() in part for part in cmdline)


async def test_eg_lists_kernels_only_with_eg_list_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eg = await asyncio.to_thread(start_enterprise_gateway, tmp_path / "eg-listing", secrets.token_hex(16),
                                 list_kernels=True)
    client = _client(eg, "eg-listing", monkeypatch)
    try:
        kid = await start_kernel(eg.url, eg.token, env=eg.extra["kernel_env"])
        listing = await client.listing()
        await shutdown_kernel(eg.url, eg.token, kid)
    finally:
        await client.close()
        await asyncio.to_thread(eg.stop)
    assert listing.error is None and listing.kernels is not None and kid in {a.kernel_id for a in listing.kernels}


@pytest.mark.parametrize("token", [pytest.param("wrong", id="wrong-token"), pytest.param("", id="no-token")])
async def test_eg_token_auth(enterprise_gateway: JupyterProcess, monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    eg = enterprise_gateway
    kid = await start_kernel(eg.url, eg.token, env=eg.extra["kernel_env"])
    if token:
        client = _client(eg, "eg-auth", monkeypatch, token=token)
    else:
        client = GatewayClient(GatewaySettings(name="eg-auth", url=eg.url, kind="enterprise-gateway"))
    try:
        got = await client.get_kernel(kid)
        result, detail = await client.shutdown_kernel(kid)
        still = await _raw("GET", f"{eg.url}/api/kernels/{kid}", eg.token)
    finally:
        await client.close()
        await shutdown_kernel(eg.url, eg.token, kid)
    assert got.error == "HTTP 401" and got.execution_state is None  # unknown, never idle
    assert result == "failed" and "HTTP 401" in detail and still[0] == 200


async def test_eg_shutdown_through_the_pool_ends_the_kernel_process(enterprise_gateway: JupyterProcess,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    eg = enterprise_gateway
    kid = await _eg_kernel(eg)
    pid = await kernel_pid(eg.url, eg.token, kid)
    pool = GatewayPool([_client(eg, "eg", monkeypatch)])
    try:
        assert (await pool.observe([kid]))[kid].error is None
        result, detail = await pool.shutdown(kid)
        gone = (await pool.observe([kid]))[kid]
    finally:
        await pool.close()
    assert (result, detail) == ("success", "kernel shut down through gateway eg")
    assert gone.error is not None and gone.execution_state is None
    await until(lambda: not _alive(pid), 30, "the kernel process to exit")
    assert (await _raw("GET", f"{eg.url}/api/kernels/{kid}", eg.token))[0] == 404


async def test_eg_culling_alongside_ours_is_already_gone_never_a_double_action(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EG's own cull_idle_timeout and our policy race for the same idle kernel: whichever is first ends it, and ours
    then reports already-gone (idempotent) and, re-observing, unknown (never idle)."""
    eg = await asyncio.to_thread(start_enterprise_gateway, tmp_path / "eg-cull", secrets.token_hex(16),
                                 cull_idle_timeout=3)
    pool = GatewayPool([_client(eg, "eg-cull", monkeypatch)])
    try:
        kid = await _eg_kernel(eg)
        seen = (await pool.observe([kid]))[kid]
        assert seen.error is None and seen.execution_state == "idle" and pool.client_for(kid) is not None
        await until(lambda: _status(eg, kid, 404), 60, "EG to cull the idle kernel")
        result, detail = await pool.shutdown(kid)  # the home was cached before EG culled it
        after = (await pool.observe([kid]))[kid]
    finally:
        await pool.close()
        await asyncio.to_thread(eg.stop)
    assert result == "already-gone" and "no longer has the kernel" in detail
    assert after.error is not None and after.execution_state is None


async def _status(eg: JupyterProcess, kid: str, want: int) -> bool:
    return (await _raw("GET", f"{eg.url}/api/kernels/{kid}", eg.token))[0] == want


# --------------------------------------------------------------------------- the daemon against a real EG


def _settings(fake: FakeNvml, gateways: str, idle_after: str = "3s") -> Any:
    return parse_settings(f"""
mode: enforce
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake.lib_path}"}}
kubernetes: {{enabled: false}}
gateways:
{gateways}
policies: [{{name: eg, idle_after: {idle_after}, warn_before: 1s, action: shutdown-kernel}}]
limits: {{max_fraction_per_cycle: 1.0}}
""")


async def _run_until(daemon: Daemon, seen: list[Any], done: Callable[[], bool], timeout: float) -> None:
    daemon.on_cycle = lambda snap, results: seen.append((snap, list(results)))
    task = asyncio.create_task(daemon.run(serve=False))
    try:
        deadline = time.monotonic() + timeout
        while not done():
            last = [d.reason for s, _ in seen[-1:] for d in s.decisions]
            assert time.monotonic() < deadline and not task.done(), last
            await asyncio.sleep(0.1)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)


async def test_invariant_14_jupyter_server_and_its_enterprise_gateway_both_answering_is_unknown_e2e(
    enterprise_gateway: JupyterProcess, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Jupyter Server started with --gateway-url runs its kernels on the EG behind it; configured with both, the
    daemon hears two sources for one kernel id: that kernel is unknown with the reason and never touched, while a
    kernel only the EG serves (positive control) is warned, shut down through the EG and verified released."""
    eg = enterprise_gateway
    js = await asyncio.to_thread(start_jupyter_server_with_gateway, tmp_path / "js-gw", secrets.token_hex(16), eg)
    try:
        both = await start_kernel(js.url, js.token)  # proxied: it is an EG kernel, and the Jupyter Server knows it
        await wake_kernel(eg.url, eg.token, both)  # the Jupyter Server's own model may lag (two sources disagree)
        alone = await _eg_kernel(eg)
        assert (await _raw("GET", f"{js.url}/api/kernels/{both}", js.token))[0] == 200
        assert (await _raw("GET", f"{eg.url}/api/kernels/{both}", eg.token))[0] == 200
        assert (await _raw("GET", f"{js.url}/api/kernels/{alone}", js.token))[0] == 404
        pid_both, pid_alone = await kernel_pid(eg.url, eg.token, both), await kernel_pid(eg.url, eg.token, alone)
        await wait_for_state(eg.url, eg.token, both, "idle")
        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0), FakeGpu(uuid=gpu_uuid(1), util=0)],
                        processes=[FakeProcess(pid=pid_both, gpu=0, memory=5 * GIB),
                                   FakeProcess(pid=pid_alone, gpu=1, memory=3 * GIB)])
        monkeypatch.setenv("INV14_JS_TOKEN", js.token)
        monkeypatch.setenv("INV14_EG_TOKEN", eg.token)
        settings = _settings(fake_nvml, f"""  - {{name: js, url: "{js.url}", kind: jupyter-server, token_env: INV14_JS_TOKEN}}
  - {{name: eg, url: "{eg.url}", kind: enterprise-gateway, token_env: INV14_EG_TOKEN}}""")
        daemon = Daemon(settings, build_adapters(settings))
        seen: list[Any] = []

        def alone_done() -> bool:
            return any(r.decision.candidate.kernel_id == alone and r.result == "success" for _, rs in seen for r in rs)

        await _run_until(daemon, seen, alone_done, 90)

        decided = [d for s, _ in seen for d in s.decisions if d.candidate.kernel_id == both]
        assert decided and all(d.verdict is Verdict.UNKNOWN for d in decided), {d.verdict for d in decided}
        assert any(f"{CONFLICTING_GATEWAYS}: js, eg" in d.reason for d in decided), decided[-1].reason
        assert not any(r.decision.candidate.kernel_id == both for _, rs in seen for r in rs)
        assert (await _raw("GET", f"{eg.url}/api/kernels/{both}", eg.token))[0] == 200 and _alive(pid_both)
        # The positive control went through the EG alone, and its process is gone.
        (done,) = [r for _, rs in seen for r in rs if r.decision.candidate.kernel_id == alone and r.result == "success"]
        assert done.decision.candidate.gateway == "eg" and "gateway eg" in done.detail
        await until(lambda: not _alive(pid_alone), 30, "the reclaimed kernel's process to exit")
    finally:
        await shutdown_kernel(js.url, js.token, both)
        await asyncio.to_thread(js.stop)
