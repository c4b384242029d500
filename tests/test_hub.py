"""reclaimer.observe.hub against a real JupyterHub (with configurable-http-proxy and real single-user servers) and, for
faults a real hub cannot show, a fake hub that follows the real REST semantics."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
import structlog

from reclaimer.core.config import HubSettings
from reclaimer.observe.jupyter_rest import LIST_BODY_LIMIT
from reclaimer.observe.tokens import TokenError
from reclaimer.core.sources import HUB_GATEWAY
from reclaimer.observe.hub import PAGINATION_ACCEPT, HubClient, loopback_origin, safe_origin, safe_server_path
from reclaimer.core.model import ServerRef
from tests.support.fake_gateway import hang, html, json_body, raw, redirect, status
from tests.support.fake_hub import FakeHub
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    spawn_servers,
    start_kernel,
    wake_kernel,
)

UTC = timezone.utc


def hub_settings(url: str, token_env: str, timeout: float = 10.0, **kw: Any) -> HubSettings:
    return HubSettings(url=url, token_env=token_env, timeout=timeout, **kw)


Make = Callable[..., Awaitable[tuple[FakeHub, HubClient, str]]]


@pytest.fixture
async def make_hub(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Make]:
    """Start fake hubs on loopback, each with a client reading its token from the environment."""
    made: list[FakeHub] = []
    clients: list[HubClient] = []

    async def make(timeout: float = 2.0, page_limit: int | None = None,
                   **fake_kw: Any) -> tuple[FakeHub, HubClient, str]:
        hub = FakeHub(token=f"hub-{secrets.token_hex(8)}", **fake_kw)
        made.append(hub)
        server = await aiohttp_server(hub.app())
        origin = str(server.make_url("")).rstrip("/")
        env = f"RECLAIMER_TEST_HUB_TOKEN_{len(made)}"
        monkeypatch.setenv(env, hub.token)
        client = HubClient(hub_settings(origin + hub.prefix, env, timeout), page_limit=page_limit)
        clients.append(client)
        return hub, client, origin

    yield make
    for hub in made:
        hub.stop_hanging()
    for client in clients:
        await client.close()


def _keys(servers: list[ServerRef] | None) -> set[tuple[str, str]]:
    assert servers is not None
    return {(s.user, s.server_name) for s in servers}


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    "url, base, expected",
    [
        pytest.param("/user/alice/", "", "/user/alice/", id="default-server"),
        pytest.param("/user/alice/gpu/", "", "/user/alice/gpu/", id="named-server"),
        pytest.param("/user/alice", "", "/user/alice/", id="adds-slash"),
        pytest.param("/user/al%40ice/", "", "/user/al%40ice/", id="quoted-name"),
        pytest.param("/jhub/user/alice/", "/jhub", "/jhub/user/alice/", id="under-base-path"),
        pytest.param("/user/alice/", "/jhub", None, id="outside-base-path"),
        pytest.param("/jhubx/user/alice/", "/jhub", None, id="base-path-prefix-trick"),
        pytest.param("//evil.example/user/a/", "", None, id="scheme-relative"),
        pytest.param("http://evil.example/user/a/", "", None, id="absolute"),
        pytest.param("/user/../hub/api/", "", None, id="dot-dot"),
        pytest.param("/user/a/%2e%2e/hub/", "", None, id="encoded-dot-dot"),
        pytest.param("/user/a/./", "", None, id="dot"),
        pytest.param("/user/a?next=x", "", None, id="query"),
        pytest.param("/user/a#x", "", None, id="fragment"),
        pytest.param("/user/a\\b/", "", None, id="backslash"),
        pytest.param("/user/a%5cb/", "", None, id="encoded-backslash"),
        pytest.param("/user/a%0d%0a/", "", None, id="encoded-newline"),
        pytest.param("/user/a b/", "", None, id="space"),
        pytest.param("", "", None, id="empty"),
        pytest.param(None, "", None, id="none"),
    ],
)
def test_safe_server_path(url: Any, base: str, expected: str | None) -> None:
    assert safe_server_path(url, base) == expected


def test_missing_token_env_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECLAIMER_TEST_NO_HUB_TOKEN", raising=False)
    with pytest.raises(TokenError, match="hub: environment variable RECLAIMER_TEST_NO_HUB_TOKEN is not set"):
        HubClient(hub_settings("http://127.0.0.1:1", "RECLAIMER_TEST_NO_HUB_TOKEN"))


# --------------------------------------------------------------------------- listing servers (fake hub)


async def test_pagination_is_followed_with_header_token(make_hub: Make) -> None:
    hub, client, _ = await make_hub(page_limit=1)
    hub.add_server("alice")
    hub.add_server("alice", "gpu", ready=False, last_activity=None)
    hub.add_server("bob")
    hub.users["carol"] = {}  # no server running: not listed
    hub.add_server("dave")
    with structlog.testing.capture_logs() as logs:
        servers = await client.list_servers()
    assert _keys(servers) == {("alice", ""), ("alice", "gpu"), ("bob", ""), ("dave", "")}
    by_key = {(s.user, s.server_name): s for s in servers or []}
    assert by_key[("alice", "")].url == "/user/alice/" and by_key[("alice", "")].ready is True
    assert by_key[("alice", "")].last_activity == datetime(2026, 11, 23, 19, 13, 42, 773735, UTC)
    assert by_key[("alice", "gpu")].ready is False and by_key[("alice", "gpu")].last_activity is None
    assert [r.query for r in hub.requests] == [f"state=active&offset={o}&limit=1" for o in (0, 1, 2)]
    assert all(r.headers["Accept"] == PAGINATION_ACCEPT for r in hub.requests)
    assert all(r.headers["Authorization"] == f"token {hub.token}" for r in hub.requests)
    assert client.up is True and hub.token not in repr(logs) and hub.token not in repr(client)


async def test_old_plain_list_answer(make_hub: Make) -> None:
    hub, client, _ = await make_hub(paginate=False)
    hub.add_server("alice")
    hub.add_server("bob", "gpu")
    assert _keys(await client.list_servers()) == {("alice", ""), ("bob", "gpu")}
    assert len(hub.requests) == 1


async def test_no_servers_is_an_empty_list_not_unknown(make_hub: Make) -> None:
    hub, client, _ = await make_hub()
    hub.users["carol"] = {}
    assert await client.list_servers() == []


async def test_next_url_is_never_followed(make_hub: Make) -> None:
    other, _, other_origin = await make_hub()
    hub, client, _ = await make_hub(page_limit=1, next_url_host=other_origin)
    hub.add_server("alice")
    hub.add_server("bob")
    assert _keys(await client.list_servers()) == {("alice", ""), ("bob", "")}
    assert other.requests == [] and len(hub.requests) == 2


async def test_pagination_that_does_not_advance_is_unknown(make_hub: Make) -> None:
    hub, client, _ = await make_hub(page_limit=1, stuck_pagination=True)
    hub.add_server("alice")
    hub.add_server("bob")
    assert await client.list_servers() is None
    assert len(hub.requests) == 1 and client.up is False


def _user(name: str = "alice", **fields: Any) -> dict[str, Any]:
    base = {"name": name, "servers": {"": {"url": f"/user/{name}/", "ready": True, "last_activity": None}}}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    "fault, expected",
    [
        pytest.param(status(500), "HTTP 500", id="http-500"),
        pytest.param(status(503), "HTTP 503", id="http-503"),
        pytest.param(status(403), "HTTP 403", id="http-403-scopes"),
        pytest.param(html(), "HTML", id="html-login-page"),
        pytest.param(raw(b'{"items": [{"name": "al'), "not valid JSON", id="truncated"),
        pytest.param(json_body({"users": []}), "expected a user list", id="object-without-items"),
        pytest.param(json_body({"items": {"alice": {}}}), "expected a user list", id="items-not-a-list"),
        pytest.param(json_body(["alice"]), "expected a user object", id="list-of-strings"),
        pytest.param(json_body([_user(servers=None)]), "read:servers", id="user-without-servers"),
        pytest.param(json_body([_user(name="")]), "'name'", id="user-without-name"),
        pytest.param(json_body([_user(servers={"": "running"})]), "not an object", id="server-not-object"),
        pytest.param(json_body([_user(servers={"": {"url": 7}})]), "'url'", id="server-url-number"),
        pytest.param(raw(b" " * (LIST_BODY_LIMIT + 1) + b"[]"), "over", id="oversize"),
        pytest.param(redirect("/hub/login"), "redirect refused", id="redirect"),
    ],
)
async def test_bad_user_listings_are_unknown(make_hub: Make, fault: Any, expected: str) -> None:
    hub, client, _ = await make_hub()
    hub.add_server("alice")
    hub.fault = fault
    with structlog.testing.capture_logs() as logs:
        assert await client.list_servers() is None
    assert client.up is False
    assert any(expected in str(e.get("error")) for e in logs), logs


async def test_hub_timeout_is_unknown(make_hub: Make) -> None:
    hub, client, origin = await make_hub(timeout=0.3)
    hub.add_server("alice")
    hub.fault = hang(hub.release)
    assert await client.list_servers() is None
    assert await client.server_kernels(ServerRef("alice", url="/user/alice/", origin=origin)) is None


# --------------------------------------------------------------------------- stopping servers (fake hub)


@pytest.mark.parametrize(
    "user, name, path",
    [
        pytest.param("alice", "", "/hub/api/users/alice/server", id="default"),
        pytest.param("alice", "gpu", "/hub/api/users/alice/servers/gpu", id="named"),
        pytest.param("a b@c.org", "x/y", "/hub/api/users/a%20b%40c.org/servers/x%2Fy", id="quoted"),
        pytest.param("alice", "../../admin", "/hub/api/users/alice/servers/..%2F..%2Fadmin", id="traversal-quoted"),
    ],
)
async def test_stop_server_paths(make_hub: Make, user: str, name: str, path: str) -> None:
    hub, client, _ = await make_hub()
    hub.delete_answer = (204, None)
    assert (await client.stop_server(user, name))[0] == "success"
    assert [(r.method, r.path) for r in hub.requests] == [("DELETE", path)]
    assert hub.requests[0].headers["Authorization"] == f"token {hub.token}"


@pytest.mark.parametrize(
    "answer, result, detail",
    [
        pytest.param((204, None), "success", "server stopped", id="204"),
        pytest.param((202, None), "success", "pending", id="202-pending"),
        pytest.param((404, {"status": 404, "message": None}), "already-gone", "no such server", id="404"),
        pytest.param((400, {"status": 400, "message": "alice's server is not running"}), "already-gone",
                     "not running", id="400-not-running"),
        pytest.param((400, {"status": 400, "message": "alice/ is pending spawn"}), "failed", "pending spawn",
                     id="400-other"),
        pytest.param((403, {"status": 403, "message": "Action is not authorized"}), "failed", "HTTP 403",
                     id="403"),
        pytest.param((500, None), "failed", "HTTP 500", id="500"),
        pytest.param((302, None), "failed", "redirect refused", id="redirect"),
    ],
)
async def test_stop_server_answers(make_hub: Make, answer: tuple[int, Any], result: str, detail: str) -> None:
    hub, client, _ = await make_hub()
    hub.add_server("alice")
    hub.delete_answer = answer
    got = await client.stop_server("alice")
    assert got[0] == result and detail in got[1]


@pytest.mark.parametrize(
    "user, name",
    [
        pytest.param("", "", id="empty-user"),
        pytest.param("alice\nX-Evil: 1", "", id="newline-in-user"),
        pytest.param("alice", "gpu\x00", id="nul-in-name"),
        pytest.param("a" * 300, "", id="too-long"),
        pytest.param(None, "", id="not-a-string"),
    ],
)
async def test_stop_server_bad_names_make_no_request(make_hub: Make, user: Any, name: str) -> None:
    hub, client, _ = await make_hub()
    result, detail = await client.stop_server(user, name)
    assert result == "failed" and "no request made" in detail and hub.requests == []


async def test_stop_server_fake_semantics(make_hub: Make) -> None:
    hub, client, _ = await make_hub()
    hub.add_server("alice")
    hub.add_server("alice", "gpu")
    assert (await client.stop_server("alice", "gpu"))[0] == "success"
    assert (await client.stop_server("alice", "gpu"))[0] == "already-gone"
    assert (await client.stop_server("nobody"))[0] == "already-gone"
    assert _keys(await client.list_servers()) == {("alice", "")}


# --------------------------------------------------------------------------- kernels in a server, directly (fake hub)


async def test_server_kernels_directly_with_a_token_for_that_server_only(make_hub: Make) -> None:
    hub, client, origin = await make_hub()
    hub.add_server("alice", "gpu")
    kid = hub.add_kernel("alice", "gpu", state="busy")
    server = ServerRef("alice", "gpu", url="/user/alice/gpu/", origin=origin)
    got = await client.server_kernels(server)
    assert got is not None and [(k.kernel_id, k.execution_state, k.gateway) for k in got] == [
        (kid, "busy", HUB_GATEWAY)]
    mint, listing = hub.requests
    assert (mint.method, mint.path) == ("POST", "/hub/api/users/alice/tokens")
    assert mint.headers["Authorization"] == f"token {hub.token}"
    (token, held), = hub.minted.items()
    assert held["scopes"] == ["access:servers!server=alice/gpu"] and held["expires_in"] == 3600
    assert held["note"].startswith("Server at /user/alice/gpu/")  # the hub does not count its use as alice's activity
    assert (listing.method, listing.path, listing.query) == ("GET", "/user/alice/gpu/api/kernels", "no_track_activity=1")
    assert listing.headers["Authorization"] == f"token {token}"
    # The token is reused until most of its life is gone: no mint per request.
    assert await client.server_kernels(server) is not None
    assert [r.method for r in hub.requests] == ["POST", "GET", "GET"]
    assert all(hub.token not in str(r.headers) for r in hub.requests if "/hub/api/" not in r.path)


async def test_server_tokens_are_renewed_revoked_and_bounded(make_hub: Make) -> None:
    now = [1000.0]
    hub, client, origin = await make_hub()
    client._clock = lambda: now[0]
    hub.add_server("alice")
    hub.add_server("bob")
    alice = ServerRef("alice", url="/user/alice/", origin=origin)
    assert await client.server_kernels(alice) == []
    (first_id,) = [m["id"] for m in hub.minted.values()]
    now[0] += 3600 * 0.8  # less than a quarter of its life left: replaced, and the old one revoked
    assert await client.server_kernels(alice) == []
    assert hub.revoked == [first_id] and len(hub.minted) == 1
    # A server gone from the hub's listing has its token revoked.
    del hub.users["alice"]
    assert _keys(await client.list_servers()) == {("bob", "")}
    assert hub.minted == {} and len(hub.revoked) == 2
    # At shutdown every token still held is revoked.
    assert await client.server_kernels(ServerRef("bob", url="/user/bob/", origin=origin)) == []
    await client.close()
    assert hub.minted == {} and client.tokens_minted == 3 and client.tokens_revoked == 3


async def test_a_token_wider_than_one_server_is_revoked_and_never_sent(make_hub: Make) -> None:
    hub, client, origin = await make_hub()
    hub.add_server("alice")
    hub.mint_answer = (201, {"token": "wide-token", "id": "a1", "scopes": ["access:servers"]})
    with structlog.testing.capture_logs() as logs:
        assert await client.server_kernels(ServerRef("alice", url="/user/alice/", origin=origin)) is None
    assert [(r.method, r.path) for r in hub.requests] == [("POST", "/hub/api/users/alice/tokens"),
                                                          ("DELETE", "/hub/api/users/alice/tokens/a1")]
    assert any("other than asked" in e["event"] for e in logs) and "wide-token" not in repr(logs)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param((403, {"status": 403, "message": "no permissions to generate tokens"}), id="no-tokens-scope"),
        pytest.param((400, {"status": 400, "message": "token expires_in: 3600 must not exceed 600"}), id="too-long"),
        pytest.param((201, {"token": "t", "id": "../x"}), id="bad-id"),
        pytest.param((201, ["not", "a", "model"]), id="not-an-object"),
    ],
)
async def test_no_server_token_means_unknown_and_no_server_request(make_hub: Make, answer: tuple[int, Any]) -> None:
    hub, client, origin = await make_hub()
    hub.add_server("alice")
    hub.mint_answer = answer
    assert await client.server_kernels(ServerRef("alice", url="/user/alice/", origin=origin)) is None
    assert all("/hub/api/" in r.path for r in hub.requests)


async def test_a_refused_server_token_is_replaced_next_time(make_hub: Make) -> None:
    hub, client, origin = await make_hub()
    hub.add_server("alice")
    server = ServerRef("alice", url="/user/alice/", origin=origin)
    assert await client.server_kernels(server) == []
    hub.minted.clear()  # the user revoked it
    assert await client.server_kernels(server) is None
    assert await client.server_kernels(server) == []
    assert [r.method for r in hub.requests] == ["POST", "GET", "GET", "POST", "GET"]


async def test_shutdown_server_kernel_directly(make_hub: Make) -> None:
    hub, client, origin = await make_hub()
    hub.add_server("alice", "gpu")
    kid = hub.add_kernel("alice", "gpu")
    server = ServerRef("alice", "gpu", url="/user/alice/gpu/", origin=origin)
    assert (await client.shutdown_server_kernel(server, kid))[0] == "success"
    assert (await client.shutdown_server_kernel(server, kid))[0] == "already-gone"
    deletes = [r for r in hub.requests if r.method == "DELETE"]
    assert [(r.path, r.query) for r in deletes] == [(f"/user/alice/gpu/api/kernels/{kid}", "no_track_activity=1")] * 2
    hub.fault = status(502)
    result, detail = await client.shutdown_server_kernel(server, kid)
    assert result == "failed" and "HTTP 502" in detail


@pytest.mark.parametrize(
    "url, origin, kernel_id",
    [
        pytest.param("//evil.example/user/alice/", None, "0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90", id="unsafe-url"),
        pytest.param("/user/alice/", None, "../../hub/api/users", id="bad-kernel-id"),
        pytest.param("/user/alice/", "http://evil.example:80", "0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90",
                     id="origin-not-an-ip"),
        pytest.param("/user/alice/", None, "0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90", id="no-direct-address"),
    ],
)
async def test_shutdown_server_kernel_refuses_bad_input(make_hub: Make, url: str, origin: str | None,
                                                        kernel_id: str) -> None:
    hub, client, fake_origin = await make_hub()
    result, detail = await client.shutdown_server_kernel(ServerRef("alice", url=url, origin=origin), kernel_id)
    assert result == "failed" and "no request made" in detail and hub.requests == []


@pytest.mark.parametrize(
    "origin, expected",
    [
        pytest.param("http://127.0.0.1:8888", "http://127.0.0.1:8888", id="loopback"),
        pytest.param("http://10.1.2.3:8888", "http://10.1.2.3:8888", id="pod-ip"),
        pytest.param("http://[fd00::1]:8888", "http://[fd00::1]:8888", id="ipv6"),
        pytest.param("http://hub.example:8888", None, id="hostname"),
        pytest.param("https://10.1.2.3:8888", None, id="https"),
        pytest.param("http://10.1.2.3", None, id="no-port"),
        pytest.param("http://10.1.2.3:8888/user/", None, id="path"),
        pytest.param("http://u:p@10.1.2.3:8888", None, id="userinfo"),
        pytest.param("http://0.0.0.0:8888", None, id="unspecified"),
        pytest.param(None, None, id="none"),
    ],
)
def test_safe_origin(origin: Any, expected: str | None) -> None:
    assert safe_origin(origin) == expected


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(None, id="no-url"),
        pytest.param("//evil.example/user/alice/", id="scheme-relative"),
        pytest.param("http://evil.example/user/alice/", id="absolute"),
        pytest.param("/user/../hub/api/users/", id="traversal"),
    ],
)
async def test_server_kernels_refuses_unsafe_urls(make_hub: Make, url: str | None) -> None:
    hub, client, origin = await make_hub()
    assert await client.server_kernels(ServerRef("alice", url=url, origin=origin)) is None
    assert hub.requests == []


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(status(403), id="403"),
        pytest.param(html(code=503), id="server-down-page"),
        pytest.param(json_body({"kernels": []}), id="object"),
        pytest.param(json_body([{"id": "x"}]), id="bad-id"),
        pytest.param(redirect("/hub/login"), id="redirect"),
    ],
)
async def test_server_kernels_faults_are_unknown(make_hub: Make, fault: Any) -> None:
    hub, client, origin = await make_hub()
    hub.add_server("alice")
    server = ServerRef("alice", url="/user/alice/", origin=origin)
    assert await client.server_token(server) is not None
    hub.fault = fault
    assert await client.server_kernels(server) is None


def test_the_hub_token_goes_to_the_hub_api_only() -> None:
    import asyncio

    client = HubClient(HubSettings(url="http://127.0.0.1:1", timeout=1.0))
    with pytest.raises(ValueError, match="/hub/api/ only"):
        asyncio.run(client._api("GET", "/user/alice/api/kernels", limit=1))


async def test_hub_under_a_base_path(make_hub: Make) -> None:
    hub, client, origin = await make_hub(prefix="/jhub")
    hub.add_server("alice")
    kid = hub.add_kernel("alice")
    servers = await client.list_servers()
    assert servers is not None and servers[0].url == "/jhub/user/alice/"
    kernels = await client.server_kernels(replace(servers[0], origin=origin))
    assert kernels is not None and kernels[0].kernel_id == kid
    assert await client.server_kernels(ServerRef("alice", url="/user/alice/", origin=origin)) is None  # outside
    assert (await client.stop_server("alice"))[0] == "success"
    assert [r.path for r in hub.requests] == ["/jhub/hub/api/users", "/jhub/hub/api/users/alice/tokens",
                                              "/jhub/user/alice/api/kernels", "/jhub/hub/api/users/alice/server"]


# --------------------------------------------------------------------------- a real JupyterHub


@pytest.fixture(scope="module")
def hub_with_servers(jupyterhub: JupyterProcess) -> JupyterProcess:
    """The session hub with default servers running for alice and bob (one user per API page), and alice's named
    server "scratch" for the stop test (spawned together: the hub starts them in parallel)."""
    spawn_servers(jupyterhub, ("alice", ""), ("bob", ""), ("alice", "scratch"))
    return jupyterhub


@pytest.fixture
async def real_hub(hub_with_servers: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HubClient]:
    monkeypatch.setenv("RECLAIMER_TEST_REAL_HUB_TOKEN", hub_with_servers.token)
    client = HubClient(hub_settings(hub_with_servers.url, "RECLAIMER_TEST_REAL_HUB_TOKEN"))
    yield client
    await client.close()


def _direct(servers: list[ServerRef] | None, user: str, name: str = "") -> ServerRef:
    """The listed server with its direct address (its process's loopback port, as the daemon finds it)."""
    server = next(s for s in servers or [] if (s.user, s.server_name) == (user, name))
    assert server.pid is not None, "the reclaimer's hub token has admin:server_state, so the pid is listed"
    origin = loopback_origin("/proc", server.pid)
    assert origin is not None and origin.startswith("http://127.0.0.1:")
    return replace(server, origin=origin)


async def test_real_hub_lists_servers_across_pages(real_hub: HubClient) -> None:
    servers = await real_hub.list_servers()
    assert {("alice", ""), ("bob", "")} <= _keys(servers)  # the hub pages one user at a time here
    alice = next(s for s in servers or [] if (s.user, s.server_name) == ("alice", ""))
    assert alice.url == "/user/alice/" and alice.ready is True and alice.pid is not None
    assert alice.last_activity is not None and alice.last_activity.tzinfo is not None
    assert real_hub.up is True


async def test_real_hub_server_kernels_directly(real_hub: HubClient, hub_with_servers: JupyterProcess) -> None:
    server_url = hub_with_servers.url + "/user/alice"
    admin = hub_with_servers.extra["admin_token"]
    kid = await start_kernel(server_url, admin)
    await wake_kernel(server_url, admin, kid)
    alice = _direct(await real_hub.list_servers(), "alice")
    kernels = await real_hub.server_kernels(alice)
    assert kernels is not None
    mine = next(k for k in kernels if k.kernel_id == kid)
    assert mine.error is None and mine.execution_state == "idle" and mine.gateway == HUB_GATEWAY
    assert mine.last_activity is not None
    assert (await real_hub.shutdown_server_kernel(alice, kid))[0] == "success"
    assert (await real_hub.shutdown_server_kernel(alice, kid))[0] == "already-gone"
    assert kid not in {k.kernel_id for k in await real_hub.server_kernels(alice) or []}


async def test_real_hub_stop_server_lifecycle(real_hub: HubClient, hub_with_servers: JupyterProcess) -> None:
    scratch = _direct(await real_hub.list_servers(), "alice", "scratch")
    assert scratch.url == "/user/alice/scratch/"
    assert await real_hub.server_kernels(scratch) == []

    result, detail = await real_hub.stop_server("alice", "scratch")
    assert result == "success", detail
    after = await real_hub.list_servers()
    assert ("alice", "scratch") not in _keys(after) and ("alice", "") in _keys(after)
    assert await real_hub.server_kernels(scratch) is None  # gone: unknown, never "no kernels"
    assert (await real_hub.stop_server("alice", "no-such-server"))[0] == "already-gone"
    assert (await real_hub.stop_server("nobody-" + secrets.token_hex(4)))[0] == "already-gone"


async def test_invariant_13_real_hub_user_servers_asked_now(real_hub: HubClient) -> None:
    """The re-check before stop-server asks the hub for the one user's servers (GET /hub/api/users/{name})."""
    before = time.time()
    servers = await real_hub.user_servers("alice")
    assert servers is not None and ("alice", "") in _keys(servers)
    alice = next(s for s in servers if s.server_name == "")
    assert alice.url == "/user/alice/" and alice.ready is True and alice.last_activity is not None
    assert alice.listed_at is not None and alice.listed_at >= before
    listed = await real_hub.list_servers()
    assert all(s.listed_at is not None and s.listed_at >= before for s in listed or [])
    assert await real_hub.user_servers("nobody-" + secrets.token_hex(4)) == []  # no such user: no server
    assert await real_hub.user_servers("x" * 300) is None  # refused before any request


async def test_real_hub_wrong_token(hub_with_servers: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECLAIMER_TEST_WRONG_HUB_TOKEN", "wrong-" + secrets.token_hex(8))
    client = HubClient(hub_settings(hub_with_servers.url, "RECLAIMER_TEST_WRONG_HUB_TOKEN"))
    try:
        assert await client.list_servers() is None
        assert await client.server_kernels(ServerRef("alice", url="/user/alice/", origin="http://127.0.0.1:1")) is None
        assert (await client.stop_server("alice"))[0] == "failed"
        assert await client.user_servers("alice") is None  # unknown, never "no servers"
    finally:
        await client.close()
    assert client.up is False


# --------------------------------------------------------------------------- issue 10 item 4: the hub is not listed every cycle


async def test_item4_hub_listing_is_asked_only_when_needed_and_cached(make_hub: Make) -> None:
    from reclaimer.core.config import parse_settings
    from reclaimer.app.daemon import Adapters, Daemon
    from reclaimer.observe.gpusim import SimulatedBackend

    hub, client, origin = await make_hub()
    hub.add_server("alice")
    now = [1000.0]
    settings = parse_settings(f"hub: {{url: '{origin}', token_env: X, cache_ttl: 60s}}\ndecide_interval: 15s\n"
                              "kubernetes: {enabled: false}\n")
    daemon = Daemon(settings, Adapters(backend=SimulatedBackend({"gpus": [{"uuid": "GPU-1", "model": "X", "memory_total": 1 << 30}]}), hub=client), clock=lambda: now[0])
    listings = lambda: sum(r.path == "/hub/api/users" for r in hub.requests)  # noqa: E731

    # No candidate needs the hub: no request at all, however many cycles.
    for _ in range(3):
        await daemon.cycle()
        now[0] += 15
    assert hub.requests == []
    assert await daemon.pipeline.hub.servers(False) == [] and listings() == 0

    assert _keys(await daemon.pipeline.hub.servers(True)) == {("alice", "")} and listings() == 1
    now[0] += 30
    assert _keys(await daemon.pipeline.hub.servers(True, frozenset({("alice", "")}))) == {("alice", "")}
    assert listings() == 1  # fresh enough, and it has what is needed
    # A server a candidate names that the listing lacks: re-listed, but not more than once per decide interval.
    hub.add_server("bob")
    now[0] += 5
    await daemon.pipeline.hub.servers(True, frozenset({("bob", "")}))
    assert listings() == 2
    now[0] += 5
    assert ("bob", "") in _keys(await daemon.pipeline.hub.servers(True, frozenset({("bob", "")}))) and listings() == 2
    # Older than cache_ttl: asked again.
    now[0] += 61
    await daemon.pipeline.hub.servers(True)
    assert listings() == 3
    # A failed listing keeps nothing: unknown now, asked again next time.
    hub.fault = status(500)
    now[0] += 61
    assert await daemon.pipeline.hub.servers(True) is None and listings() == 4  # None: unknown, never "no servers" (inv. 13)
    hub.fault = None
    assert _keys(await daemon.pipeline.hub.servers(True)) == {("alice", ""), ("bob", "")} and listings() == 5


# --------------------------------------------------------------------------- where a kernel's server is


def test_locate_servers_in_pods_uses_the_pod_ip_and_notebook_port() -> None:
    from reclaimer.observe.hub import locate_servers
    from reclaimer.core.model import AttributedProcess, Candidate, PodInfo

    server = ServerRef("alice", "gpu", url="/user/alice/gpu/")

    def cand(kid: str, pod: PodInfo | None, srv: ServerRef | None) -> Candidate:
        proc = AttributedProcess(pid=4242, starttime=1, gpu_uuid="GPU-1", used_memory_bytes=1, sm_utilization=0.0,
                                 kernel_id=kid, kernel_pid=4242)
        return Candidate(key=f"kernel:{kid}", node="n", kernel_id=kid, pod=pod, server=srv, processes=(proc,))

    named = PodInfo(uid="u1", namespace="jhub", name="jupyter-alice--gpu", ip="10.1.2.3",
                    ports=(("notebook-port", 8890),))
    unnamed_port = PodInfo(uid="u2", namespace="jhub", name="p2", ip="fd00::7")
    no_ip = PodInfo(uid="u3", namespace="jhub", name="p3")
    k1, k2, k3, k4 = (f"0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b9{i}" for i in range(4))
    out = locate_servers([cand(k1, named, server), cand(k2, unnamed_port, server), cand(k3, no_ip, server),
                          cand(k4, named, None)], [server], "/proc", default_port=8888)
    assert out[k1].origin == "http://10.1.2.3:8890" and (out[k1].user, out[k1].server_name) == ("alice", "gpu")
    assert out[k2].origin == "http://[fd00::7]:8888"
    assert k3 not in out and k4 not in out  # no address, or no server the pod's labels name: unknown


def test_locate_servers_on_a_host_needs_the_server_pid_among_the_kernels_ancestors() -> None:
    import os

    from reclaimer.observe.hub import locate_servers
    from reclaimer.core.model import AttributedProcess, Candidate

    kid = "0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90"
    me = os.getpid()
    proc = AttributedProcess(pid=me, starttime=1, gpu_uuid="GPU-1", used_memory_bytes=1, sm_utilization=0.0,
                             kernel_id=kid, kernel_pid=me)
    c = Candidate(key=f"kernel:{kid}", node="n", kernel_id=kid, processes=(proc,))
    stranger = ServerRef("bob", url="/user/bob/", pid=1)  # init is nobody's kernel ancestor here
    assert locate_servers([c], [stranger], "/proc") == {}
    # Our parent (pytest's launcher) plays the server: it is an ancestor, but listens on no loopback port.
    parent = ServerRef("alice", url="/user/alice/", pid=os.getppid())
    assert locate_servers([c], [parent], "/proc") == {}


# --------------------------------------------------------------------------- issue 10 item 6: the hub token rotates


async def test_item6_hub_token_file_is_reread_and_a_refusal_is_reported(
    aiohttp_server: Any, tmp_path: Any
) -> None:
    hub = FakeHub(token="hub-1")
    hub.add_server("alice")
    server = await aiohttp_server(hub.app())
    token_file = tmp_path / "hub-token"
    token_file.write_text("hub-1\n")
    client = HubClient(HubSettings(url=str(server.make_url("")).rstrip("/"), token_file=str(token_file), timeout=2.0))
    try:
        assert await client.list_servers() is not None and client.credential.rejected is None
        # The hub's token was rotated, the file not yet: one re-read, then the credential is marked refused.
        hub.token = "hub-2"
        with structlog.testing.capture_logs() as logs:
            assert await client.list_servers() is None
        assert client.credential.rejected is not None and "re-reading the file did not help" in client.credential.rejected
        assert any(e["event"].startswith("credential refused") for e in logs)
        assert "hub-1" not in repr(logs) and "hub-2" not in repr(logs)
        # The file is updated (a new inode, as a Secret update): picked up before the next request, accepted again.
        tmp = tmp_path / "hub-token.new"
        tmp.write_text("hub-2\n")
        tmp.replace(token_file)
        assert await client.list_servers() is not None and client.credential.rejected is None
        assert hub.requests[-1].headers["Authorization"] == "token hub-2"
        # A 403 for a missing scope is not a refused credential.
        hub.delete_answer = (403, {"status": 403, "message": "Action is not authorized with current scopes"})
        assert (await client.stop_server("alice"))[0] == "failed" and client.credential.rejected is None
    finally:
        await client.close()


async def test_invariant_13_daemon_never_stops_another_server_and_a_failed_listing_is_unknown(
    make_hub: Make, tmp_path: Any
) -> None:
    """Through the daemon's cycle: alice's pod (KubeSpawner annotations: server "gpu") holds an idle GPU, policy
    stop-server. While the hub's listing fails, and then while the hub lists only alice's default server, the verdict
    is unknown with the reason, and no server is stopped (the old code fell back to DELETE .../users/alice/server)."""
    from reclaimer.core.config import parse_settings
    from reclaimer.app.daemon import Adapters, Daemon
    from reclaimer.observe.gpusim import SimulatedBackend
    from reclaimer.observe.kube import PodCache
    from reclaimer.core.model import PodGpuAllocation
    from reclaimer.core.verdicts import Verdict
    from reclaimer.observe.sampler import Sampler
    from tests.support.fake_kube import FakeKube

    hub, client, origin = await make_hub()
    hub.fault = status(500)
    clock = [time.time()]
    settings = parse_settings(f"""
mode: enforce
node_name: n1
sample_interval: 1s
decide_interval: 15s
gpu: {{backend: simulated}}
hub: {{url: "{origin}", token_env: X, cache_ttl: 1s}}
policies: [{{name: servers, idle_after: 60s, warn_before: 30s, action: stop-server}}]
""")
    backend = SimulatedBackend({"gpus": [{"uuid": "GPU-1", "model": "NVIDIA H100", "memory_total": 1 << 30}]})
    sampler = Sampler(backend, interval=1.0, window_seconds=settings.longest_window, clock=lambda: clock[0])
    sampler.start(thread=False)
    with FakeKube() as api:
        api.add_pod("jupyter-alice--gpu", namespace="hub", node="n1",
                    annotations={"hub.jupyter.org/username": "alice", "hub.jupyter.org/servername": "gpu"})
        pods = PodCache(api.kube_client(settings.kubernetes, node_name="n1"), "n1", settings.kubernetes,
                        clock=lambda: clock[0])
        allocation = [PodGpuAllocation("hub", "jupyter-alice--gpu", "notebook", ("GPU-1",))]
        daemon = Daemon(settings, Adapters(backend=backend, hub=client, kube=api.kube_client(node_name="n1"),
                                           pods=pods, pod_resources=lambda: allocation),
                        clock=lambda: clock[0], sampler=sampler)
        reasons: list[str] = []
        try:
            for cycle in range(12):  # 3 minutes: the hub fails for the first 1.5, then lists alice's default only
                if cycle == 6:
                    hub.fault = None
                    hub.add_server("alice")  # the default server "", not "gpu"
                for _ in range(15):
                    clock[0] += 1.0
                    sampler.tick()
                snap, _ = await daemon.cycle()
                (d,) = snap.decisions
                assert d.verdict is Verdict.UNKNOWN, d.reason
                reasons.append(d.reason)
        finally:
            await daemon.close()
    assert reasons[5] == ("stop-server needs the user's server as the hub lists it: the hub's server list is unknown "
                          "this cycle (the hub did not answer every page usably)")
    assert reasons[-1] == ("stop-server needs the server the hub lists this cycle, but it lists no server 'gpu' for "
                           "user alice (never another server instead)")
    assert [r.method for r in hub.requests if r.method == "DELETE"] == []
