"""reclaimer.app.kernelclient: a kernel channel that closes before any answer is asked again for idempotent questions.

A small aiohttp websocket server stands in for a gateway whose channel drops while a fresh kernel is still starting
(seen with a real Kernel Gateway under load); real gateways are driven through this client by the e2e tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from reclaimer.app.kernelclient import ChannelClosed, GatewayRest

KID = "0b5c1a7e-0000-4000-8000-000000000001"


def _app(drops: int) -> tuple[web.Application, dict[str, int]]:
    seen = {"connections": 0}

    async def channels(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen["connections"] += 1
        if seen["connections"] <= drops:
            await ws.close()  # dropped before any answer
            return ws
        async for m in ws:
            if m.type != WSMsgType.TEXT:
                continue
            parent = json.loads(m.data)["header"]
            for msg_type, content in (("stream", {"name": "stdout", "text": "4242\n"}),
                                      ("status", {"execution_state": "idle"})):
                await ws.send_str(json.dumps({"header": {"msg_type": msg_type}, "msg_type": msg_type,
                                              "parent_header": parent, "content": content}))
        return ws

    app = web.Application()
    app.router.add_get("/api/kernels/{kid}/channels", channels)
    return app, seen


@pytest.mark.parametrize("drops, attempts, expected", [
    pytest.param(0, 3, 4242, id="answers-at-once"),
    pytest.param(2, 3, 4242, id="two-drops-then-answers"),
])  # fmt: skip
async def test_pid_asks_again_after_a_channel_closed_before_any_answer(aiohttp_server: Any, drops: int,
                                                                       attempts: int, expected: int) -> None:
    app, seen = _app(drops)
    server = await aiohttp_server(app)
    rest = GatewayRest(str(server.make_url("")).rstrip("/"), "tok")
    assert await rest.pid(KID, attempts=attempts) == expected
    assert seen["connections"] == drops + 1


async def test_pid_gives_up_after_its_attempts(aiohttp_server: Any) -> None:
    app, seen = _app(drops=5)
    server = await aiohttp_server(app)
    rest = GatewayRest(str(server.make_url("")).rstrip("/"), "tok")
    with pytest.raises(ChannelClosed):
        await rest.pid(KID, attempts=3)
    assert seen["connections"] == 3


def _lossy_app(lost: int) -> tuple[web.Application, list[str]]:
    """A channel whose first ``lost`` kernel_info answers never reach the client (ZMQ's slow joiner on a fresh
    subscription); it records every message type the client sent, in order."""
    sent: list[str] = []

    async def channels(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for m in ws:
            if m.type != WSMsgType.TEXT:
                continue
            parent = json.loads(m.data)["header"]
            sent.append(parent["msg_type"])
            if parent["msg_type"] == "kernel_info_request" and sent.count("kernel_info_request") <= lost:
                continue  # its IOPub status went out before the server's subscription joined
            replies = [("status", {"execution_state": "busy"})]
            if parent["msg_type"] == "execute_request":
                replies.append(("stream", {"name": "stdout", "text": "4242\n"}))
            replies.append(("status", {"execution_state": "idle"}))
            for msg_type, content in replies:
                await ws.send_str(json.dumps({"header": {"msg_type": msg_type}, "msg_type": msg_type,
                                              "parent_header": parent, "content": content}))
        return ws

    app = web.Application()
    app.router.add_get("/api/kernels/{kid}/channels", channels)
    return app, sent


@pytest.mark.parametrize("lost", [pytest.param(0, id="live-at-once"), pytest.param(2, id="two-answers-lost")])
async def test_code_is_sent_once_and_only_after_the_channel_is_known_live(aiohttp_server: Any,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          lost: int) -> None:
    monkeypatch.setattr("reclaimer.app.kernelclient.READY_RETRY", 0.05)
    app, sent = _lossy_app(lost)
    server = await aiohttp_server(app)
    rest = GatewayRest(str(server.make_url("")).rstrip("/"), "tok")
    assert await rest.execute(KID, "print(4242)", timeout=10) == "4242\n"
    # Asked until one kernel_info was answered, then the code, once: never before the channel was known live.
    assert sent == ["kernel_info_request"] * (lost + 1) + ["execute_request"]
