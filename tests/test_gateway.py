"""reclaimer.observe.gateway against a fault-injecting fake gateway and against real Kernel Gateway / Jupyter Server."""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from reclaimer.core.config import GatewaySettings
from reclaimer.core.kernelids import is_kernel_id
from reclaimer.observe.gateway import (
    CONFLICTING_GATEWAYS,
    NOT_KNOWN_ANYWHERE,
    GatewayClient,
    GatewayPool,
    claimed_by_a_gateway,
)
from reclaimer.observe.jupyter_rest import (
    KERNEL_BODY_LIMIT,
    LIST_BODY_LIMIT,
    MAX_CONCURRENCY,
    parse_last_activity,
)
from reclaimer.observe.tokens import TokenError
from tests.support.e2e import e2e_fixture
from tests.support.fake_gateway import (
    FakeGateway,
    chunked,
    cut_short,
    hang,
    html,
    json_body,
    kernel_model,
    raw,
    redirect,
    status,
)
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    interrupt_kernel,
    kernel_pid,
    run_code,
    shutdown_kernel,
    start_kernel,
    wait_for_state,
    wake_kernel,
)

UTC = timezone.utc
KID = "0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90"


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true (deadline), yielding to the loop between polls."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


def settings_for(url: str, name: str = "fake", timeout: float = 2.0, **kw: Any) -> GatewaySettings:
    return GatewaySettings(name=name, url=url, timeout=timeout, **kw)


Make = Callable[..., Awaitable[tuple[FakeGateway, GatewayClient]]]


@pytest.fixture
async def make_gateway(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Make]:
    """Start fake gateways on loopback, each with a client reading its token from the environment."""
    made: list[FakeGateway] = []
    clients: list[GatewayClient] = []

    async def make(name: str = "fake", timeout: float = 2.0, session_factory: Any = None,
                   **fake_kw: Any) -> tuple[FakeGateway, GatewayClient]:
        gw = FakeGateway(token=f"tok-{name}-{secrets.token_hex(8)}", **fake_kw)
        made.append(gw)
        server = await aiohttp_server(gw.app())
        env = f"RECLAIMER_TEST_TOKEN_{name.upper().replace('-', '_')}"
        monkeypatch.setenv(env, gw.token)
        client = GatewayClient(settings_for(str(server.make_url("")), name, timeout, token_env=env),
                               session_factory=session_factory)
        clients.append(client)
        return gw, client

    yield make
    for gw in made:
        gw.stop_hanging()
    for client in clients:
        await client.close()


# --------------------------------------------------------------------------- pure parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("2026-11-23T19:13:42.773735Z", datetime(2026, 11, 23, 19, 13, 42, 773735, UTC), id="micros-z"),
        pytest.param("2026-11-23T19:13:42Z", datetime(2026, 11, 23, 19, 13, 42, tzinfo=UTC), id="no-fraction"),
        pytest.param("2026-11-23T19:13:42.123456789Z", datetime(2026, 11, 23, 19, 13, 42, 123456, UTC), id="nanos"),
        pytest.param("2026-11-23T19:13:42.5Z", datetime(2026, 11, 23, 19, 13, 42, 500000, UTC), id="one-digit"),
        pytest.param("2026-11-23T19:13:42+00:00", datetime(2026, 11, 23, 19, 13, 42, tzinfo=UTC), id="plus-zero"),
        pytest.param("2026-11-23T14:13:42-05:00", datetime(2026, 11, 23, 19, 13, 42, tzinfo=UTC), id="minus-five"),
        pytest.param("2026-11-24T00:43:42.1+0530", datetime(2026, 11, 23, 19, 13, 42, 100000, UTC), id="compact"),
        pytest.param("2026-11-23T19:13:42.25", datetime(2026, 11, 23, 19, 13, 42, 250000, UTC), id="naive-is-utc"),
        pytest.param("2026-11-23 19:13:42z", datetime(2026, 11, 23, 19, 13, 42, tzinfo=UTC), id="space-lower-z"),
        pytest.param("2026-01-01T00:30:00+01:00", datetime(2025, 12, 31, 23, 30, tzinfo=UTC), id="crosses-year"),
        pytest.param("", None, id="empty"),
        pytest.param("yesterday", None, id="words"),
        pytest.param("2026-11-23", None, id="date-only"),
        pytest.param("2026-13-01T00:00:00Z", None, id="month-13"),
        pytest.param("2026-02-30T00:00:00Z", None, id="feb-30"),
        pytest.param("2026-11-23T25:00:00Z", None, id="hour-25"),
        pytest.param("2026-11-23T19:13:42+24:00", None, id="offset-24h"),
        pytest.param("2026-11-23T19:13:42.1234567890Z", None, id="ten-digit-fraction"),
        pytest.param("0001-01-01T00:00:00+01:00", None, id="overflows"),
        pytest.param("2026-11-23T19:13:42Z trailing", None, id="trailing-text"),
        pytest.param(1732389222, None, id="epoch-number"),
        pytest.param(None, None, id="null"),
    ],
)
def test_parse_last_activity(text: Any, expected: datetime | None) -> None:
    got = parse_last_activity(text)
    assert got == expected
    if got is not None:
        assert got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value, ok",
    [
        pytest.param(KID, True, id="canonical"),
        pytest.param(KID.upper(), False, id="uppercase"),
        pytest.param(KID.replace("-", ""), False, id="no-dashes"),
        pytest.param("{" + KID + "}", False, id="braces"),
        pytest.param("../../etc/passwd", False, id="dot-dot"),
        pytest.param(KID + "/../x", False, id="uuid-then-traversal"),
        pytest.param(KID + "\n", False, id="trailing-newline"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="none"),
    ],
)
def test_is_kernel_id(value: Any, ok: bool) -> None:
    assert is_kernel_id(value) is ok


# --------------------------------------------------------------------------- tokens


def test_token_from_missing_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECLAIMER_TEST_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(TokenError, match="RECLAIMER_TEST_NO_SUCH_TOKEN is not set"):
        GatewayClient(settings_for("http://127.0.0.1:1", token_env="RECLAIMER_TEST_NO_SUCH_TOKEN"))


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param("", "is empty", id="empty"),
        pytest.param("  \n", "is empty", id="whitespace"),
        pytest.param("abc\r\nX-Evil: 1", "cannot go in an HTTP header", id="header-injection"),
    ],
)
def test_bad_token_file_is_refused_without_echoing_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(TokenError, match=message) as info:
        GatewayClient(settings_for("http://127.0.0.1:1", token_file=str(path)))
    assert str(path) in str(info.value)
    if content.strip():
        assert content.strip() not in str(info.value)


def test_unreadable_token_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=r"token file .*missing.* cannot be read"):
        GatewayClient(settings_for("http://127.0.0.1:1", token_file=str(tmp_path / "missing")))


async def test_token_file_is_sent_as_header_only(aiohttp_server: Any, tmp_path: Path) -> None:
    gw = FakeGateway(token="file-token-" + secrets.token_hex(8))
    kid = gw.add_kernel()
    server = await aiohttp_server(gw.app())
    (tmp_path / "token").write_text(gw.token + "\n")
    client = GatewayClient(settings_for(str(server.make_url("")), token_file=str(tmp_path / "token")))
    try:
        with structlog.testing.capture_logs() as logs:
            got = await client.get_kernel(kid)
            gw.fault = status(500)
            await client.get_kernel(kid)
    finally:
        await client.close()
    assert got.error is None and got.execution_state == "idle"
    first = gw.requests[0]
    assert first.headers["Authorization"] == f"token {gw.token}"
    assert first.query == "no_track_activity=1" and gw.token not in first.path + first.query
    assert gw.token not in repr(client) and gw.token not in repr(logs)
    assert any(e.get("gateway") == "fake" and e["log_level"] == "warning" for e in logs)


# --------------------------------------------------------------------------- one kernel, every failure


async def test_get_kernel_parses_the_model(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    kid = gw.add_kernel(state="busy", last_activity="2026-11-23T19:13:42.773735Z", connections=2, name="gpu-py")
    assert client.up is None
    got = await client.get_kernel(kid)
    assert got.error is None
    assert (got.kernel_id, got.gateway, got.kernel_name, got.execution_state, got.connections) == (
        kid, "fake", "gpu-py", "busy", 2)
    assert got.last_activity == datetime(2026, 11, 23, 19, 13, 42, 773735, UTC)
    assert client.up is True
    assert gw.requests[0].path == f"/api/kernels/{kid}" and gw.requests[0].method == "GET"


async def test_404_is_not_found_not_idle(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    lookup = await client.lookup_kernel(KID)
    assert lookup.not_found and not lookup.found
    assert lookup.activity.error == "not found" and lookup.activity.execution_state is None
    assert client.up is True


def _model_fault(**changes: Any) -> Callable[[str], Any]:
    def build(kid: str) -> Any:
        model = kernel_model(kid)
        for key, value in changes.items():
            if value is _DROP:
                model.pop(key)
            else:
                model[key] = value
        return json_body(model)

    return build


_DROP = object()
OTHER_KID = "11111111-2222-4333-8444-555555555555"


@pytest.mark.parametrize(
    "make_fault, expected",
    [
        pytest.param(lambda kid: status(500), "HTTP 500", id="http-500"),
        pytest.param(lambda kid: status(502), "HTTP 502", id="http-502"),
        pytest.param(lambda kid: status(503), "HTTP 503", id="http-503"),
        pytest.param(lambda kid: status(401), "HTTP 401", id="http-401"),
        pytest.param(lambda kid: status(403), "HTTP 403", id="http-403"),
        pytest.param(lambda kid: html(), "HTML page", id="html-body"),
        pytest.param(lambda kid: html(code=500), "HTTP 500", id="html-error-page"),
        pytest.param(lambda kid: raw(b'{"id": "' + kid.encode()), "not valid JSON", id="truncated-json"),
        pytest.param(lambda kid: raw(b"\xff\xfe{}"), "not valid JSON", id="not-utf8"),
        pytest.param(lambda kid: raw(b"[" * 100_000 + b"]" * 100_000), "not valid JSON", id="deep-nesting"),
        pytest.param(lambda kid: cut_short(), "truncated", id="connection-cut-mid-body"),
        pytest.param(lambda kid: json_body([kernel_model(kid)]), "expected a kernel object, got list",
                     id="list-instead-of-object"),
        pytest.param(lambda kid: json_body("idle"), "expected a kernel object", id="string-body"),
        pytest.param(lambda kid: raw(b""), "expected a kernel object, got null", id="empty-body"),
        pytest.param(_model_fault(execution_state=5), "execution_state", id="state-number"),
        pytest.param(_model_fault(execution_state=""), "execution_state", id="state-empty"),
        pytest.param(_model_fault(execution_state="i" * 500), "execution_state", id="state-huge"),
        pytest.param(_model_fault(execution_state=_DROP), "'execution_state' missing", id="state-missing"),
        pytest.param(_model_fault(connections="3"), "connections", id="connections-string"),
        pytest.param(_model_fault(connections=True), "connections", id="connections-bool"),
        pytest.param(_model_fault(connections=-1), "connections", id="connections-negative"),
        pytest.param(_model_fault(name=7), "'name'", id="name-number"),
        pytest.param(_model_fault(last_activity=_DROP), "'last_activity' missing", id="last-activity-missing"),
        pytest.param(_model_fault(last_activity=None), "'last_activity' missing", id="last-activity-null"),
        pytest.param(_model_fault(last_activity="last tuesday"), "not a timestamp", id="last-activity-garbage"),
        pytest.param(_model_fault(last_activity=1732389222), "not a timestamp", id="last-activity-number"),
        pytest.param(_model_fault(id=OTHER_KID), "another kernel", id="id-mismatch"),
        pytest.param(_model_fault(id=_DROP), "canonical 'id'", id="id-missing"),
        pytest.param(_model_fault(id=7), "canonical 'id'", id="id-number"),
        pytest.param(lambda kid: raw(b" " * (KERNEL_BODY_LIMIT + 1) + b"{}"), "over", id="oversize-declared"),
        pytest.param(lambda kid: chunked(KERNEL_BODY_LIMIT * 4), "over", id="oversize-chunked"),
        pytest.param(lambda kid: redirect(f"/api/kernels/{OTHER_KID}"), "redirect refused", id="redirect-same-host"),
    ],
)
async def test_every_bad_answer_is_unknown_never_idle(make_gateway: Make, make_fault: Callable[[str], Any],
                                                      expected: str) -> None:
    gw, client = await make_gateway()
    kid = gw.add_kernel(state="idle")
    gw.fault = make_fault(kid)
    lookup = await client.lookup_kernel(kid)
    assert lookup.activity.error is not None and expected in lookup.activity.error
    assert lookup.activity.kernel_id == kid and not lookup.not_found
    if "another kernel" in expected or "HTTP" in expected or "JSON" in expected or "over" in expected:
        assert lookup.activity.execution_state is None and lookup.activity.last_activity is None
    assert client.up is False


async def test_timeout_is_unknown(make_gateway: Make) -> None:
    gw, client = await make_gateway(timeout=0.3)
    kid = gw.add_kernel()
    gw.fault = hang(gw.release)
    got = await client.get_kernel(kid)
    assert got.error == "timed out after 0.3s" and got.execution_state is None
    assert client.up is False and not gw.release.is_set()  # the server was still holding the request


async def test_connection_refused_is_unknown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = GatewayClient(settings_for(f"http://127.0.0.1:{port}", timeout=2.0))
    try:
        got = await client.get_kernel(KID)
        listing = await client.list_kernels()
    finally:
        await client.close()
    assert got.error == "connection refused" and listing is None and client.up is False


async def test_redirect_to_another_host_never_gets_the_token(make_gateway: Make) -> None:
    gw, client = await make_gateway(name="main")
    other, other_client = await make_gateway(name="other")
    kid = gw.add_kernel()
    other.add_kernel(kid)
    other_url = other_client.settings.url
    gw.fault = redirect(f"{other_url}/api/kernels/{kid}")
    got = await client.get_kernel(kid)
    listing_fault = redirect(f"{other_url}/api/kernels", code=307)
    gw.fault = listing_fault
    listed = await client.list_kernels()
    assert got.error == "redirect refused (HTTP 302)" and listed is None
    assert other.requests == []  # neither the request nor the token ever reached the other host


@pytest.mark.parametrize(
    "bad_id",
    [
        pytest.param("../../api/users", id="dot-dot"),
        pytest.param(KID + "/../../x", id="uuid-then-traversal"),
        pytest.param("%2e%2e%2f", id="encoded-traversal"),
        pytest.param(KID.upper(), id="uppercase"),
        pytest.param("not-a-uuid", id="words"),
        pytest.param(KID + "?token=x", id="query"),
        pytest.param("", id="empty"),
    ],
)
async def test_bad_kernel_ids_never_reach_the_server(make_gateway: Make, bad_id: str) -> None:
    gw, client = await make_gateway()
    pool = GatewayPool([client])
    got = await client.get_kernel(bad_id)
    result, detail = await client.shutdown_kernel(bad_id)
    observed = await pool.observe([bad_id])
    pool_result = await pool.shutdown(bad_id)
    assert got.error is not None and "not a canonical kernel id" in got.error
    assert result == "failed" and "no request made" in detail
    assert observed[bad_id].error is not None and pool_result[0] == "failed"
    assert gw.requests == []


async def test_on_request_is_called_per_request(make_gateway: Make) -> None:
    gw, client = await make_gateway(name="hooked")
    calls: list[tuple[str, float]] = []
    client.on_request = lambda name, seconds: calls.append((name, seconds))
    kid = gw.add_kernel()
    await client.get_kernel(kid)
    await client.list_kernels()
    gw.fault = status(500)
    await client.get_kernel(kid)
    assert [name for name, _ in calls] == ["hooked"] * 3 and all(s >= 0 for _, s in calls)


async def test_a_failing_hook_does_not_fail_the_request(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    client.on_request = lambda name, seconds: 1 / 0
    kid = gw.add_kernel()
    assert (await client.get_kernel(kid)).error is None


async def test_concurrency_per_gateway_is_bounded(make_gateway: Make) -> None:
    started = 0
    trace = aiohttp.TraceConfig()

    async def on_start(*_: Any) -> None:
        nonlocal started
        started += 1

    trace.on_request_start.append(on_start)
    gw, client = await make_gateway(timeout=30.0, session_factory=lambda: aiohttp.ClientSession(trace_configs=[trace]))
    kids = [gw.add_kernel() for _ in range(3 * MAX_CONCURRENCY)]
    gw.fault = hang(gw.release)
    tasks = [asyncio.create_task(client.get_kernel(k)) for k in kids]
    await until(lambda: gw.in_flight == MAX_CONCURRENCY, what="first batch in flight")
    # Every task has run its first step by now; without a bound all of them would have started a request.
    assert started == MAX_CONCURRENCY
    gw.stop_hanging()
    results = await asyncio.gather(*tasks)
    assert all(r.error is None for r in results)
    assert gw.max_in_flight == MAX_CONCURRENCY and started == len(kids)


# --------------------------------------------------------------------------- listings


@pytest.mark.parametrize(
    "fault, expected_ids",
    [
        pytest.param(None, "all", id="ok"),
        pytest.param(json_body([]), [], id="empty-list-is-no-kernels"),
        pytest.param(status(403), None, id="403-listing-off-is-unknown"),
        pytest.param(status(500), None, id="http-500"),
        pytest.param(json_body({"kernels": []}), None, id="object-instead-of-list"),
        pytest.param(json_body(["a", "b"]), None, id="list-of-strings"),
        pytest.param(json_body([None]), None, id="list-of-null"),
        pytest.param(json_body([{"id": "../x", "execution_state": "idle"}]), None, id="item-with-bad-id"),
        pytest.param(json_body([kernel_model(KID), kernel_model(KID)]), None, id="duplicate-ids"),
        pytest.param(html(), None, id="html"),
        pytest.param(raw(b'[{"id": "'), None, id="truncated"),
        pytest.param(raw(b" " * (LIST_BODY_LIMIT + 1) + b"[]"), None, id="oversize"),
        pytest.param(redirect("/login"), None, id="redirect"),
    ],
)
async def test_list_kernels(make_gateway: Make, fault: Any, expected_ids: Any) -> None:
    gw, client = await make_gateway()
    kids = {gw.add_kernel(), gw.add_kernel(state="busy")}
    gw.fault = fault
    listed = await client.list_kernels()
    if expected_ids is None:
        assert listed is None
    elif expected_ids == "all":
        assert listed is not None and {a.kernel_id for a in listed} == kids
        assert all(a.error is None and a.gateway == "fake" for a in listed)
    else:
        assert listed == expected_ids


async def test_a_listed_kernel_with_a_bad_field_is_unknown_alone(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    good = gw.add_kernel()
    bad = gw.add_kernel(last_activity="soon")
    listed = {a.kernel_id: a for a in await client.list_kernels() or []}
    assert listed[good].error is None
    assert listed[bad].error is not None and "last_activity" in listed[bad].error


async def test_listing_refused_leaves_gateway_up(make_gateway: Make) -> None:
    gw, client = await make_gateway(list_kernels=False)
    assert await client.list_kernels() is None
    assert client.up is True


# --------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize(
    "fault, result, detail",
    [
        pytest.param(None, "success", "shut down", id="204"),
        pytest.param(status(404), "already-gone", "no longer has", id="404"),
        pytest.param(status(500, {"message": "kernel wedged"}), "failed", "HTTP 500: kernel wedged", id="500"),
        pytest.param(status(403), "failed", "HTTP 403", id="403"),
        pytest.param(redirect("/login"), "failed", "redirect refused", id="redirect"),
    ],
)
async def test_shutdown_kernel(make_gateway: Make, fault: Any, result: str, detail: str) -> None:
    gw, client = await make_gateway()
    kid = gw.add_kernel()
    gw.fault = fault
    got = await client.shutdown_kernel(kid)
    assert got[0] == result and detail in got[1]
    assert gw.count("DELETE", f"/api/kernels/{kid}") == 1
    if result == "success":
        assert kid not in gw.kernels


async def test_shutdown_timeout_is_failed(make_gateway: Make) -> None:
    gw, client = await make_gateway(timeout=0.1)
    kid = gw.add_kernel()
    gw.fault = hang(gw.release)
    result, detail = await client.shutdown_kernel(kid)
    assert result == "failed" and "timed out" in detail


# --------------------------------------------------------------------------- the pool


async def test_pool_discovers_with_per_kernel_gets_then_asks_only_the_home(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    on_a = [a.add_kernel(), a.add_kernel(state="busy")]
    on_b = [b.add_kernel()]
    pool = GatewayPool([ca, cb])
    first = await pool.observe(on_a + on_b)
    assert {k: v.gateway for k, v in first.items()} == {on_a[0]: "a", on_a[1]: "a", on_b[0]: "b"}
    assert all(v.error is None for v in first.values()) and first[on_a[1]].execution_state == "busy"
    # Discovery asks every gateway for each new id (404 = not here) and never lists: its cost is independent of K.
    assert (a.count("GET", "/api/kernels"), b.count("GET", "/api/kernels")) == (0, 0)
    assert sorted(r.path for r in a.requests) == sorted(f"/api/kernels/{k}" for k in on_a + on_b)
    assert sorted(r.path for r in b.requests) == sorted(f"/api/kernels/{k}" for k in on_a + on_b)

    start_a, start_b = len(a.requests), len(b.requests)
    second = await pool.observe(on_a + on_b)
    assert all(v.error is None for v in second.values())
    assert sorted(r.path for r in a.requests[start_a:]) == sorted(f"/api/kernels/{k}" for k in on_a)
    assert [r.path for r in b.requests[start_b:]] == [f"/api/kernels/{on_b[0]}"]
    assert pool.client_for(on_b[0]) is cb and pool.gateway_up() == {"a": True, "b": True}


async def test_pool_discovery_works_where_listing_is_refused(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a", list_kernels=False)
    b, cb = await make_gateway(name="b", list_kernels=False)
    ka, kb = a.add_kernel(), b.add_kernel()
    for _ in range(50):  # other kernels on the gateways cost discovery nothing
        a.add_kernel()
    pool = GatewayPool([ca, cb])
    first = await pool.observe([ka, kb])
    assert (first[ka].gateway, first[kb].gateway) == ("a", "b")
    assert first[ka].error is None and first[kb].error is None
    assert a.count("GET", "/api/kernels") == b.count("GET", "/api/kernels") == 0
    assert a.count("GET", f"/api/kernels/{kb}") == 1 and b.count("GET", f"/api/kernels/{ka}") == 1  # said 404

    before = len(a.requests)
    await pool.observe([ka])
    assert [r.path for r in a.requests[before:]] == [f"/api/kernels/{ka}"]


async def test_pool_kernel_nobody_knows(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b", list_kernels=False)
    got = (await GatewayPool([ca, cb]).observe([KID]))[KID]
    assert got.error == NOT_KNOWN_ANYWHERE and got.gateway == "" and got.execution_state is None


async def test_pool_failure_during_discovery_is_unknown_not_absent(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    a.fault = status(503)
    got = (await GatewayPool([ca, cb]).observe([KID]))[KID]
    assert got.error is not None and got.error != NOT_KNOWN_ANYWHERE
    assert "HTTP 503" in got.error and got.gateway == "a"


async def test_one_hanging_gateway_does_not_hold_up_the_other(make_gateway: Make) -> None:
    slow, c_slow = await make_gateway(name="slow", timeout=1.5)
    fast, c_fast = await make_gateway(name="fast", timeout=5.0)
    k_slow, k_fast = slow.add_kernel(), fast.add_kernel()
    pool = GatewayPool([c_slow, c_fast])
    assert (await pool.observe([k_slow, k_fast]))[k_fast].error is None  # discovered while both answer
    slow_finished = asyncio.Event()
    c_slow.on_request = lambda name, seconds: slow_finished.set()
    served_while_slow_pending: list[bool] = []

    async def note_order(request: Any) -> None:
        served_while_slow_pending.append(not slow_finished.is_set())
        return None

    slow.fault = hang(slow.release)
    fast.fault = note_order
    before_slow = len(slow.requests)
    first = await pool.observe([k_slow, k_fast])
    assert first[k_fast].error is None and first[k_fast].gateway == "fast"
    assert first[k_slow].error is not None and "timed out" in first[k_slow].error
    assert served_while_slow_pending == [True]  # fast was asked while slow still hung: concurrently

    second = await pool.observe([k_fast])  # known: only fast is asked
    assert second[k_fast].error is None and len(slow.requests) == before_slow + 1
    assert pool.gateway_up() == {"slow": False, "fast": True}


async def test_pool_bounds_a_gateway_by_its_own_timeout(make_gateway: Make) -> None:
    gw, client = await make_gateway(name="slow", timeout=0.3, list_kernels=False)
    kids = [gw.add_kernel() for _ in range(3 * MAX_CONCURRENCY)]
    gw.fault = hang(gw.release)
    got = await GatewayPool([client]).observe(kids)
    # The first batch of GETs times out; the 16 kernels queued behind it are not asked (no timeout after timeout).
    assert all(a.error is not None for a in got.values())
    assert len(gw.requests) == MAX_CONCURRENCY  # one batch


async def test_pool_forgets_a_kernel_its_gateway_lost(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    kid = gw.add_kernel()
    pool = GatewayPool([client])
    assert (await pool.observe([kid]))[kid].error is None
    del gw.kernels[kid]
    lost = (await pool.observe([kid]))[kid]
    assert lost.error is not None and "no longer knows" in lost.error and pool.client_for(kid) is None
    again = (await pool.observe([kid]))[kid]
    assert again.error == NOT_KNOWN_ANYWHERE
    assert gw.count("GET", "/api/kernels") == 0 and gw.count("GET", f"/api/kernels/{kid}") == 3


async def test_pool_dedupes_ids(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    kid = gw.add_kernel()
    pool = GatewayPool([client])
    await pool.observe([kid])
    got = await pool.observe([kid, kid, kid])
    assert list(got) == [kid] and gw.count("GET", f"/api/kernels/{kid}") == 2  # discovery, then once


async def test_pool_shutdown_routes_to_the_kernels_gateway(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    kid = b.add_kernel()
    pool = GatewayPool([ca, cb])
    assert await pool.shutdown(kid) == ("success", "kernel shut down through gateway b")  # discovered first
    assert a.count("DELETE", f"/api/kernels/{kid}") == 0 and b.count("DELETE", f"/api/kernels/{kid}") == 1
    assert pool.client_for(kid) is None
    result, detail = await pool.shutdown(kid)  # no gateway serves it now: cannot tell gone from never ours
    assert result == "failed" and NOT_KNOWN_ANYWHERE in detail
    assert b.count("DELETE", f"/api/kernels/{kid}") == 1


async def test_pool_shutdown_of_a_known_kernel_that_vanished_is_already_gone(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    kid = gw.add_kernel()
    pool = GatewayPool([client])
    assert (await pool.observe([kid]))[kid].error is None
    del gw.kernels[kid]  # the user shut it down between observation and action
    assert (await pool.shutdown(kid))[0] == "already-gone"


async def test_pool_shutdown_when_a_gateway_is_unreachable_is_failed(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    a.fault = status(502)
    result, detail = await GatewayPool([ca]).shutdown(KID)
    assert result == "failed" and "HTTP 502" in detail and a.count("DELETE", f"/api/kernels/{KID}") == 0


async def test_pool_rejects_duplicate_names(make_gateway: Make) -> None:
    _, c1 = await make_gateway(name="same")
    with pytest.raises(ValueError, match="unique"):
        GatewayPool([c1, c1])


# --------------------------------------------------------------------------- invariant 14: conflicting sources


async def test_invariant_14_two_gateways_answering_for_one_kernel_is_unknown(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    a.add_kernel(KID, state="idle")
    b.add_kernel(KID, state="idle")  # e.g. a Jupyter Server with --gateway-url and the gateway behind it
    pool = GatewayPool([ca, cb])
    for cycle in (1, 2):
        got = (await pool.observe([KID]))[KID]
        assert got.error == f"{CONFLICTING_GATEWAYS}: a, b" and got.gateway == ""
        assert got.execution_state is None and got.last_activity is None  # unknown, never idle
        assert pool.client_for(KID) is None  # no home from a conflict: both are asked again next cycle
        assert a.count("GET", f"/api/kernels/{KID}") == b.count("GET", f"/api/kernels/{KID}") == cycle
    result, detail = await pool.shutdown(KID)
    assert result == "failed" and CONFLICTING_GATEWAYS in detail
    assert a.count("DELETE", f"/api/kernels/{KID}") == b.count("DELETE", f"/api/kernels/{KID}") == 0


async def test_invariant_14_conflict_after_discovery_is_seen_by_the_confirming_recheck(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    a.add_kernel(KID)
    pool = GatewayPool([ca, cb])
    assert (await pool.observe([KID]))[KID].error is None and pool.client_for(KID) is ca
    b.add_kernel(KID)  # a second source appears after discovery
    assert (await pool.observe([KID]))[KID].error is None  # steady state asks the home only
    confirmed = (await pool.observe([KID], confirm=True))[KID]  # the re-check before acting asks everyone
    assert confirmed.error == f"{CONFLICTING_GATEWAYS}: a, b" and pool.client_for(KID) is None
    assert CONFLICTING_GATEWAYS in str((await pool.observe([KID]))[KID].error)  # the cached home is gone


async def test_invariant_14_a_gateway_that_cannot_answer_leaves_the_kernel_unknown(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    a.add_kernel(KID)
    b.fault = status(503)  # b might serve the kernel too: a conflict cannot be ruled out
    pool = GatewayPool([ca, cb])
    got = (await pool.observe([KID]))[KID]
    assert got.error is not None and "cannot rule out a second gateway" in got.error and "b: HTTP 503" in got.error
    assert pool.client_for(KID) is None
    b.fault = None  # positive control: once b says 404, a is the kernel's home
    got = (await pool.observe([KID]))[KID]
    assert got.error is None and got.gateway == "a" and pool.client_for(KID) is ca
    assert (await pool.observe([KID], confirm=True))[KID].error is None and pool.client_for(KID) is ca
    assert (await pool.shutdown(KID))[0] == "success" and a.count("DELETE", f"/api/kernels/{KID}") == 1


async def test_invariant_14_a_claimed_kernel_is_never_settled_by_a_third_source(make_gateway: Make) -> None:
    """The hub and Kubeflow fallbacks look up only kernels no configured gateway claimed (claimed_by_a_gateway)."""
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    both, alone, partial, nobody = KID, a.add_kernel(), a.add_kernel(), "5d2f1a7c-3b8e-4c9d-a0f1-2e3d4c5b6a78"
    a.add_kernel(both)
    b.add_kernel(both)
    got = await GatewayPool([ca, cb]).observe([both, alone, nobody])
    assert [claimed_by_a_gateway(got[k]) for k in (both, alone, nobody)] == [True, True, False]
    assert claimed_by_a_gateway(None) is False
    b.fault = status(503)
    half = (await GatewayPool([ca, cb]).observe([partial]))[partial]
    assert half.error is not None and claimed_by_a_gateway(half)  # a might share it with b: still claimed


# --------------------------------------------------------------------------- kernels no gateway knows: backoff


class FakeClock:
    """The pool's injected clock, moved only by the test."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def backed_off(seconds: int) -> str:
    return f"{NOT_KNOWN_ANYWHERE} (next check in {seconds}s)"


def paths_since(gw: FakeGateway, start: int) -> list[str]:
    return [r.path for r in gw.requests[start:]]


async def test_pool_backs_off_a_kernel_no_gateway_knows(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    known = a.add_kernel()
    clock = FakeClock()
    pool = GatewayPool([ca, cb], clock=clock, absent_retry=60, absent_retry_max=200)
    first = await pool.observe([known, KID])
    assert first[known].error is None and first[KID].error == NOT_KNOWN_ANYWHERE
    both = sorted([f"/api/kernels/{known}", f"/api/kernels/{KID}"])
    assert (sorted(paths_since(a, 0)), sorted(paths_since(b, 0))) == (both, both)

    for delay in (60, 120, 200, 200):  # doubles, capped at absent_retry_max
        for step in (0, delay - 1):
            clock.advance(step)
            start_a, start_b = len(a.requests), len(b.requests)
            got = await pool.observe([known, KID])
            assert got[KID].error == backed_off(delay - step) and got[KID].gateway == ""
            assert got[KID].execution_state is None and got[KID].last_activity is None  # unknown, never idle
            assert got[known].error is None
            assert paths_since(a, start_a) == [f"/api/kernels/{known}"] and paths_since(b, start_b) == []
        clock.advance(1)  # the retry time: asked again, once per gateway
        start_a, start_b = len(a.requests), len(b.requests)
        got = await pool.observe([known, KID])
        assert got[KID].error == NOT_KNOWN_ANYWHERE
        assert sorted(paths_since(a, start_a)) == both  # asked concurrently
        assert paths_since(b, start_b) == [f"/api/kernels/{KID}"]

    start_a, start_b = len(a.requests), len(b.requests)
    result, detail = await pool.shutdown(KID)  # nobody serves it: failed, as without the backoff
    assert result == "failed" and backed_off(200) in detail
    assert (paths_since(a, start_a), paths_since(b, start_b)) == ([], [])


async def test_pool_backs_off_per_kernel_gets_when_listing_is_refused(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a", list_kernels=False)
    b, cb = await make_gateway(name="b", list_kernels=False)
    known = a.add_kernel()
    clock = FakeClock()
    pool = GatewayPool([ca, cb], clock=clock)
    assert (await pool.observe([known, KID]))[KID].error == NOT_KNOWN_ANYWHERE
    assert a.count("GET", f"/api/kernels/{KID}") == b.count("GET", f"/api/kernels/{KID}") == 1

    clock.advance(59)
    start_a, start_b = len(a.requests), len(b.requests)
    got = await pool.observe([known, KID])
    assert got[KID].error == backed_off(1) and got[known].error is None
    assert paths_since(a, start_a) == [f"/api/kernels/{known}"] and paths_since(b, start_b) == []

    clock.advance(1)
    start_a, start_b = len(a.requests), len(b.requests)
    assert (await pool.observe([known, KID]))[KID].error == NOT_KNOWN_ANYWHERE
    assert sorted(paths_since(a, start_a)) == sorted([f"/api/kernels/{known}", f"/api/kernels/{KID}"])
    assert paths_since(b, start_b) == [f"/api/kernels/{KID}"]
    assert (await pool.observe([KID]))[KID].error == backed_off(120)


def _fail_gets(fault: Any) -> Any:
    """Let the (refused) listing through; answer per-kernel GETs with ``fault``."""

    async def only_gets(request: Any) -> Any:
        return None if request.path == "/api/kernels" else await fault(request)

    return only_gets


async def _b_503(make: Make) -> GatewayClient:
    gw, client = await make(name="b")
    gw.fault = status(503)
    return client


async def _b_get_500(make: Make) -> GatewayClient:
    gw, client = await make(name="b", list_kernels=False)
    gw.fault = _fail_gets(status(500))
    return client


async def _b_hangs(make: Make) -> GatewayClient:
    gw, client = await make(name="b", timeout=0.3)
    gw.fault = hang(gw.release)
    return client


async def _b_refused(make: Make) -> GatewayClient:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    return GatewayClient(settings_for(f"http://127.0.0.1:{closed}", name="b", timeout=2.0))


@pytest.mark.parametrize(
    "make_b, reason",
    [
        pytest.param(_b_503, "HTTP 503", id="5xx"),
        pytest.param(_b_get_500, "HTTP 500", id="per-kernel-get-5xx"),
        pytest.param(_b_hangs, "timed out", id="timeout"),
        pytest.param(_b_refused, "connection refused", id="refused"),
    ],
)
async def test_pool_does_not_back_off_a_kernel_a_gateway_failed_on(
    make_gateway: Make, make_b: Callable[[Make], Awaitable[GatewayClient]], reason: str
) -> None:
    a, ca = await make_gateway(name="a")  # answers "not found"; b cannot say
    cb = await make_b(make_gateway)
    asked_b: list[float] = []
    cb.on_request = lambda name, seconds: asked_b.append(seconds)
    clock = FakeClock()
    pool = GatewayPool([ca, cb], clock=clock)
    try:
        for cycle in range(1, 4):
            got = (await pool.observe([KID]))[KID]
            assert got.error is not None and NOT_KNOWN_ANYWHERE not in got.error and reason in got.error
            assert a.count("GET", f"/api/kernels/{KID}") == cycle and len(asked_b) >= cycle  # asked every cycle
            clock.advance(1)
    finally:
        await cb.close()


async def test_pool_asks_again_next_cycle_when_a_retry_fails(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    clock = FakeClock()
    pool = GatewayPool([ca], clock=clock)
    assert (await pool.observe([KID]))[KID].error == NOT_KNOWN_ANYWHERE
    clock.advance(60)
    a.fault = status(503)
    assert "HTTP 503" in str((await pool.observe([KID]))[KID].error)
    a.fault = None
    clock.advance(1)
    assert (await pool.observe([KID]))[KID].error == NOT_KNOWN_ANYWHERE  # asked at once, not backed off
    assert a.count("GET", f"/api/kernels/{KID}") == 3
    assert (await pool.observe([KID]))[KID].error == backed_off(120)  # the failure did not reset the backoff


async def test_pool_finds_a_backed_off_kernel_that_appears_later(make_gateway: Make) -> None:
    a, ca = await make_gateway(name="a")
    b, cb = await make_gateway(name="b")
    clock = FakeClock()
    pool = GatewayPool([ca, cb], clock=clock)
    assert (await pool.observe([KID]))[KID].error == NOT_KNOWN_ANYWHERE
    b.add_kernel(KID, state="busy")
    clock.advance(30)
    assert (await pool.observe([KID]))[KID].error == backed_off(30)  # not asked before its retry
    assert b.count("GET", f"/api/kernels/{KID}") == 1

    clock.advance(30)
    found = (await pool.observe([KID]))[KID]
    assert found.error is None and found.gateway == "b" and found.execution_state == "busy"
    assert pool.client_for(KID) is cb
    start_a, start_b = len(a.requests), len(b.requests)
    assert (await pool.observe([KID]))[KID].error is None
    assert (paths_since(a, start_a), paths_since(b, start_b)) == ([], [f"/api/kernels/{KID}"])

    del b.kernels[KID]  # gone again: the backoff starts over, it does not continue from before
    assert "no longer knows" in str((await pool.observe([KID]))[KID].error)
    assert (await pool.observe([KID]))[KID].error == NOT_KNOWN_ANYWHERE
    assert (await pool.observe([KID]))[KID].error == backed_off(60)


async def test_pool_forgets_backoffs_of_kernels_no_longer_asked_about(make_gateway: Make) -> None:
    gw, client = await make_gateway()
    other = gw.add_kernel()
    clock = FakeClock()
    pool = GatewayPool([client], clock=clock, absent_retry=60, absent_retry_max=100)
    await pool.observe([KID])
    clock.advance(60)
    await pool.observe([KID])  # absent again: next delay would be 100
    clock.advance(101)
    await pool.observe([other])  # KID not asked about for over absent_retry_max: its entry is dropped
    assert (await pool.observe([KID]))[KID].error == NOT_KNOWN_ANYWHERE
    assert (await pool.observe([KID]))[KID].error == backed_off(60)  # started over, not continued at 100


@pytest.mark.parametrize(
    "retry, retry_max",
    [pytest.param(0, 900, id="zero"), pytest.param(-1, 900, id="negative"), pytest.param(60, 30, id="max-below")],
)
def test_pool_rejects_bad_backoff(retry: float, retry_max: float) -> None:
    with pytest.raises(ValueError, match="absent_retry"):
        GatewayPool([], absent_retry=retry, absent_retry_max=retry_max)


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
@e2e_fixture
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl CLI)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return d / "cert.pem", d / "key.pem"


async def _tls_gateway(aiohttp_server: Any, tls_files: tuple[Path, Path]) -> tuple[FakeGateway, str, str]:
    cert, key = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    gw = FakeGateway(token="tls-" + secrets.token_hex(8))
    kid = gw.add_kernel()
    server = await aiohttp_server(gw.app(), ssl=ctx)
    url = str(server.make_url(""))
    assert url.startswith("https://")
    return gw, url, kid


@pytest.mark.parametrize(
    "ca, verify, ok",
    [
        pytest.param(True, True, True, id="ca-file-honoured"),
        pytest.param(False, True, False, id="unknown-ca-refused"),
        pytest.param(False, False, True, id="verification-off"),
    ],
)
async def test_tls(aiohttp_server: Any, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                   ca: bool, verify: bool, ok: bool) -> None:
    gw, url, kid = await _tls_gateway(aiohttp_server, tls_files)
    monkeypatch.setenv("RECLAIMER_TEST_TLS_TOKEN", gw.token)
    client = GatewayClient(settings_for(url, token_env="RECLAIMER_TEST_TLS_TOKEN", verify_tls=verify,
                                        ca_file=str(tls_files[0]) if ca else None))
    try:
        got = await client.get_kernel(kid)
    finally:
        await client.close()
    if ok:
        assert got.error is None and got.execution_state == "idle"
    else:
        assert got.error is not None and "TLS" in got.error
        assert gw.requests == []  # the handshake failed before any request (or token) was sent


# --------------------------------------------------------------------------- real servers


def _client(handle: JupyterProcess, name: str, monkeypatch: pytest.MonkeyPatch, token: str | None = None,
            timeout: float = 10.0) -> GatewayClient:
    env = f"RECLAIMER_TEST_REAL_{name.upper().replace('-', '_')}"
    monkeypatch.setenv(env, token or handle.token)
    return GatewayClient(settings_for(handle.url, name=name, timeout=timeout, token_env=env))


async def test_kernel_gateway_idle_kernel(kernel_gateway: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    kg = kernel_gateway
    kid = await start_kernel(kg.url, kg.token)
    client = _client(kg, "kg", monkeypatch)
    pool = GatewayPool([client])
    try:
        model = await wake_kernel(kg.url, kg.token, kid)
        pid = await kernel_pid(kg.url, kg.token, kid)
        await wait_for_state(kg.url, kg.token, kid, "idle")
        got = (await pool.observe([kid]))[kid]
        listed = await client.list_kernels()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    finally:
        await pool.close()
        await shutdown_kernel(kg.url, kg.token, kid)
    assert got.error is None and got.gateway == "kg" and got.execution_state == "idle"
    assert got.kernel_name == "python3" and got.connections == 0
    assert got.last_activity is not None and got.last_activity >= parse_last_activity(model["last_activity"])
    assert abs((datetime.now(UTC) - got.last_activity).total_seconds()) < 600
    assert listed is not None and kid in {a.kernel_id for a in listed}
    # What attribution relies on: the kernel process names its connection file.
    assert any(f"kernel-{kid}.json".encode() in part for part in cmdline)


async def test_probe_keeps_gateway_up_meaningful_without_kernels(kernel_gateway: JupyterProcess,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    up = _client(kernel_gateway, "kg-probe", monkeypatch)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    down = GatewayClient(settings_for(f"http://127.0.0.1:{closed}", name="kg-down", timeout=2.0))
    pool = GatewayPool([up, down])
    try:
        assert pool.gateway_up() == {"kg-probe": None, "kg-down": None}
        await pool.probe_quiet(older_than=60)
        assert pool.gateway_up() == {"kg-probe": True, "kg-down": False}
        requests_before = up.last_request_at
        await pool.probe_quiet(older_than=60)  # contacted just now: not probed again
        assert up.last_request_at == requests_before
    finally:
        await pool.close()


async def test_kernel_gateway_busy_kernel(kernel_gateway: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    kg = kernel_gateway
    kid = await start_kernel(kg.url, kg.token)
    pool = GatewayPool([_client(kg, "kg", monkeypatch)])
    try:
        await wake_kernel(kg.url, kg.token, kid)
        await run_code(kg.url, kg.token, kid, "import time; time.sleep(30)", wait=False, silent=True)
        await wait_for_state(kg.url, kg.token, kid, "busy")
        busy = (await pool.observe([kid]))[kid]
        await interrupt_kernel(kg.url, kg.token, kid)
        await wait_for_state(kg.url, kg.token, kid, "idle")
        idle = (await pool.observe([kid]))[kid]
    finally:
        await pool.close()
        await shutdown_kernel(kg.url, kg.token, kid)
    assert busy.error is None and busy.execution_state == "busy"
    assert idle.error is None and idle.execution_state == "idle"
    assert idle.last_activity is not None and busy.last_activity is not None
    assert idle.last_activity >= busy.last_activity


async def test_kernel_gateway_without_listing(kernel_gateway_unlisted: JupyterProcess,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    kg = kernel_gateway_unlisted
    kid = await start_kernel(kg.url, kg.token)
    client = _client(kg, "kg-unlisted", monkeypatch)
    pool = GatewayPool([client])
    try:
        await wake_kernel(kg.url, kg.token, kid)
        listed = await client.list_kernels()
        up_after_listing = client.up
        got = (await pool.observe([kid, KID]))
    finally:
        await pool.close()
        await shutdown_kernel(kg.url, kg.token, kid)
    assert listed is None and up_after_listing is True  # 403 = unknown, not "no kernels", not "down"
    assert got[kid].error is None and got[kid].execution_state == "idle"
    assert got[KID].error == NOT_KNOWN_ANYWHERE


async def test_kernel_gateway_wrong_token(kernel_gateway: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(kernel_gateway, "kg-wrong", monkeypatch, token="wrong-" + secrets.token_hex(8))
    try:
        got = await client.get_kernel(KID)
        listed = await client.list_kernels()
    finally:
        await client.close()
    assert got.error is not None and got.error.startswith("HTTP 40") and listed is None
    assert client.up is False


async def test_kernel_gateway_shutdown(kernel_gateway: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    kg = kernel_gateway
    kid = await start_kernel(kg.url, kg.token)
    client = _client(kg, "kg", monkeypatch)
    pool = GatewayPool([client])
    try:
        await wake_kernel(kg.url, kg.token, kid)
        assert (await pool.observe([kid]))[kid].error is None
        first = await pool.shutdown(kid)
        again = await client.shutdown_kernel(kid)
        listed = await client.list_kernels()
    finally:
        await pool.close()
        await shutdown_kernel(kg.url, kg.token, kid)
    assert first[0] == "success" and again[0] == "already-gone"
    assert listed is not None and kid not in {a.kernel_id for a in listed}


async def test_jupyter_server(jupyter_server: JupyterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    js = jupyter_server
    kid = await start_kernel(js.url, js.token)
    client = _client(js, "js", monkeypatch)
    pool = GatewayPool([client])
    try:
        await wake_kernel(js.url, js.token, kid)
        got = (await pool.observe([kid]))[kid]
        listed = await client.list_kernels()
        result = await pool.shutdown(kid)
        after = await client.get_kernel(kid)
    finally:
        await pool.close()
        await shutdown_kernel(js.url, js.token, kid)
    assert got.error is None and got.execution_state == "idle" and got.gateway == "js"
    assert listed is not None and kid in {a.kernel_id for a in listed}
    assert result[0] == "success" and after.error == "not found"


@pytest.mark.e2e  # a churn of 3,000 kernels over 300 cycles (seconds)
async def test_item4_pool_caches_stay_bounded_by_the_kernels_still_asked_about(make_gateway: Make) -> None:
    """3,000 kernels come and go (some served, some unknown to every gateway): the home and absence caches hold
    only what an observe asked about within absent_retry_max."""
    gw, client = await make_gateway()
    clock = FakeClock()
    pool = GatewayPool([client], clock=clock, absent_retry=60, absent_retry_max=120)
    live: list[str] = []
    for cycle in range(300):
        for _ in range(10):  # 5 new served kernels and 5 no gateway knows, each living 4 cycles
            live.append(gw.add_kernel() if len(live) % 2 == 0 else str(uuid.uuid4()))
        live = live[-40:]
        got = await pool.observe(live)
        assert all(got[k].error is None for k in live if k in gw.kernels)
        sizes = pool.tracked()
        # What was asked about in the last absent_retry_max (120 s = 8 cycles of 15 s): 10 new ids per cycle.
        assert sizes["homes"] + sizes["absent"] <= 10 * (120 // 15 + 1) + 40, (cycle, sizes)
        clock.advance(15)
    clock.advance(121)
    await pool.observe([])
    await pool.observe([live[0]])
    assert sum(pool.tracked().values()) <= 1
