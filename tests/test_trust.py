"""Issue 10 items 1 and 2 against real parts: a real JupyterHub (configurable-http-proxy, single-user servers that
write down every request header they get), a real Jupyter Server and a real Kernel Gateway.

Item 1: no credential crosses to a party that could misuse it. Whatever a user's server sees of the daemon's
requests opens that server only: it is tried against the other user's server and against the hub API.
Item 2: watching is not using. Hundreds of the daemon's requests leave every activity clock where it was: the
server's ``/api/status`` ``last_activity`` and the hub's ``last_activity`` for the user and the server. Each test has
its positive control (an ordinary request does move the clock), so it can fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from reclaimer.core.config import GatewaySettings, HubSettings
from reclaimer.observe.gateway import GatewayClient, GatewayPool
from reclaimer.observe.jupyter_rest import parse_last_activity
from reclaimer.observe.hub import HubClient, loopback_origin
from reclaimer.core.model import ServerRef
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    header_log,
    spawn_servers,
    start_kernel,
    wake_kernel,
)

pytestmark = pytest.mark.e2e  # every test here starts real servers or processes

POLLS = 300  # "hundreds of the daemon's requests"
WINDOW = 3.0  # seconds after the polling during which the hub (1 s activity intervals here) could still move


async def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": f"token {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, allow_redirects=False) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            return resp.status, body


@pytest.fixture(scope="module")
def hub(jupyterhub: JupyterProcess) -> JupyterProcess:
    spawn_servers(jupyterhub, ("alice", ""), ("bob", ""))
    return jupyterhub


@pytest.fixture
async def client(hub: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HubClient]:
    monkeypatch.setenv("RECLAIMER_TEST_TRUST_HUB_TOKEN", hub.token)
    c = HubClient(HubSettings(url=hub.url, token_env="RECLAIMER_TEST_TRUST_HUB_TOKEN", timeout=10.0))
    yield c
    await c.close()


async def _direct(client: HubClient, user: str) -> ServerRef:
    servers = await client.list_servers()
    server = next(s for s in servers or [] if (s.user, s.server_name) == (user, ""))
    assert server.pid is not None
    origin = loopback_origin("/proc", server.pid)
    assert origin is not None
    return replace(server, origin=origin)


# --------------------------------------------------------------------------- item 1


async def test_item1_a_users_server_sees_nothing_that_opens_another_server_or_the_hub(
    hub: JupyterProcess, client: HubClient
) -> None:
    admin = hub.extra["admin_token"]
    alice = await _direct(client, "alice")
    bob = await _direct(client, "bob")
    kid = await start_kernel(alice.origin + "/user/alice", admin)
    await wake_kernel(alice.origin + "/user/alice", admin, kid)
    before = len(header_log(hub))
    kernels = await client.server_kernels(alice)
    assert kernels is not None and kid in {k.kernel_id for k in kernels}
    assert (await client.shutdown_server_kernel(alice, kid))[0] == "success"

    seen = header_log(hub)[before:]
    mine = [r for r in seen if r["server"] == "/user/alice/" and r["headers"].get("Authorization")]
    assert mine, "alice's server recorded the daemon's requests"
    # The hub token never reaches a user's server, in any header of any request any server ever got.
    assert all(hub.token not in str(r["headers"]) for r in header_log(hub))
    captured = {r["headers"]["Authorization"].split(" ", 1)[1] for r in mine} - {admin}
    assert captured, "the daemon's own credential is among what alice's server saw"
    assert all("no_track_activity=1" in r["uri"] for r in mine if r["headers"]["Authorization"].endswith(
        tuple(captured)))

    for credential in captured:
        # Positive control: it is a real credential, and it opens what alice already had: her own server.
        assert (await _get(alice.origin + "/user/alice/api/kernels?no_track_activity=1", credential))[0] == 200
        # Another user's server, directly and through the proxy.
        assert (await _get(bob.origin + "/user/bob/api/kernels", credential))[0] in (403, 404)
        assert (await _get(hub.url + "/user/bob/api/kernels", credential))[0] in (302, 403, 404)
        # The hub API beyond alice's own identity: list users, read bob, mint tokens, stop or start servers,
        # the proxy's routing table, the services.
        for method, path in [
            ("GET", "/hub/api/users"), ("GET", "/hub/api/users/bob"), ("POST", "/hub/api/users/alice/tokens"),
            ("POST", "/hub/api/users/bob/tokens"), ("DELETE", "/hub/api/users/alice/server"),
            ("DELETE", "/hub/api/users/bob/server"), ("POST", "/hub/api/users/bob/server"),
            ("GET", "/hub/api/proxy"), ("GET", "/hub/api/services"), ("GET", "/hub/api/users/alice/tokens"),
        ]:
            code, _ = await _get(hub.url + path, credential, method)
            assert code in (403, 404), f"{method} {path} answered {code} to the token alice's server saw"
    # Negative control: the hub token would have opened those (so the 403s above are the token's, not the test's).
    assert (await _get(hub.url + "/hub/api/users", hub.token))[0] == 200

    # Revoked at shutdown: the hub no longer knows what alice's server saw (her server caches a token's identity for
    # up to 5 minutes, HubAuth.cache_max_age, and then refuses it too).
    for credential in captured:
        assert (await _get(hub.url + "/hub/api/user", credential))[0] == 200
    await client.close()
    for credential in captured:
        assert (await _get(hub.url + "/hub/api/user", credential))[0] == 403


# --------------------------------------------------------------------------- item 2


async def _status(origin: str, token: str) -> str:
    code, body = await _get(origin + "/api/status", token)
    assert code == 200, body
    return str(body["last_activity"])


async def _hub_activity(hub: JupyterProcess, user: str) -> tuple[str, str]:
    """(the user's last_activity, the default server's last_activity) as the hub has them."""
    code, model = await _get(hub.url + f"/hub/api/users/{user}", hub.extra["admin_token"])
    assert code == 200, model
    return str(model["last_activity"]), str(model["servers"][""]["last_activity"])


async def _until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)  # polling interval; the deadline decides


async def test_item2_watching_a_hub_users_server_moves_no_activity_clock(
    hub: JupyterProcess, client: HubClient
) -> None:
    admin = hub.extra["admin_token"]
    alice = await _direct(client, "alice")
    bob = await _direct(client, "bob")
    assert alice.origin is not None and bob.origin is not None
    kid = await start_kernel(alice.origin + "/user/alice", admin)
    await wake_kernel(alice.origin + "/user/alice", admin, kid)
    # Settle: the hub has absorbed alice's set-up activity (her server reports every second here).
    settled = await _status(alice.origin + "/user/alice", admin)

    async def absorbed() -> bool:
        reported = parse_last_activity((await _hub_activity(hub, "alice"))[1])
        return reported is not None and reported >= parse_last_activity(settled)

    await _until(absorbed, "the hub to absorb alice's set-up activity")
    # One more report period, so a report already in flight lands before the baseline.
    bob_before = await _hub_activity(hub, "bob")
    await _get(bob.origin + "/user/bob/api/kernels", admin)  # tracked: bob's server reports it

    async def bob_reported() -> bool:
        return (await _hub_activity(hub, "bob"))[1] != bob_before[1]

    await _until(bob_reported, "bob's control activity to reach the hub")
    baseline_status = await _status(alice.origin + "/user/alice", admin)
    baseline_hub = await _hub_activity(hub, "alice")

    for _ in range(POLLS):
        kernels = await client.server_kernels(alice)
        assert kernels is not None and kid in {k.kernel_id for k in kernels}
    done = time.monotonic()

    # Positive controls on bob (so the window is long enough to see a change): a request through the proxy and a
    # tracked request to his server both reach the hub.
    bob_before = await _hub_activity(hub, "bob")
    assert (await _get(hub.url + "/user/bob/api/kernels", admin))[0] == 200

    async def bob_moved_and_window_over() -> bool:
        return (await _hub_activity(hub, "bob")) != bob_before and time.monotonic() - done >= WINDOW

    await _until(bob_moved_and_window_over, "the proxy's activity for bob to reach the hub")
    assert await _status(alice.origin + "/user/alice", admin) == baseline_status
    assert await _hub_activity(hub, "alice") == baseline_hub
    await client.shutdown_server_kernel(alice, kid)


@pytest.mark.parametrize("which", ["jupyter_server", "kernel_gateway", "enterprise_gateway"])
async def test_item2_watching_a_gateway_moves_no_activity_clock(which: str, request: pytest.FixtureRequest,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gw: JupyterProcess = request.getfixturevalue(which)
    kid = await start_kernel(gw.url, gw.token, env=gw.extra.get("kernel_env"))
    await wake_kernel(gw.url, gw.token, kid)
    monkeypatch.setenv("RECLAIMER_TEST_TRUST_GW_TOKEN", gw.token)
    client = GatewayClient(GatewaySettings(name="gw", url=gw.url, token_env="RECLAIMER_TEST_TRUST_GW_TOKEN"))
    pool = GatewayPool([client])
    status_code, _ = await _get(gw.url + "/api/status", gw.token)
    has_status = status_code == 200  # Kernel and Enterprise Gateway have no /api/status: the kernel's clock is checked
    assert has_status == (which == "jupyter_server")

    async def clocks() -> tuple[str | None, str]:
        status = await _status(gw.url, gw.token) if has_status else None
        code, model = await _get(gw.url + f"/api/kernels/{kid}?no_track_activity=1", gw.token)
        assert code == 200
        return status, str(model["last_activity"])

    try:
        before = await clocks()
        for _ in range(POLLS // 3):
            assert (await pool.observe([kid]))[kid].error is None  # per-kernel GET
            listing = await client.listing()  # Enterprise Gateway refuses listings by default (403): asked anyway
            assert listing.kernels is not None or listing.forbidden
            assert await client.probe()  # GET /api
        assert await clocks() == before
        if has_status:
            # Positive control: the same listing without no_track_activity is counted as activity.
            assert (await _get(gw.url + "/api/kernels", gw.token))[0] == 200
            assert (await clocks())[0] != before[0]
    finally:
        await client.close()
        from tests.support.jupyter_fixtures import shutdown_kernel

        await shutdown_kernel(gw.url, gw.token, kid)
