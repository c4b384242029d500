"""A fake Jupyter gateway (aiohttp) that speaks the kernels REST subset and injects faults on demand.

Every request is recorded (method, path, query, headers) before anything else, so tests can assert what reached
the server — including that nothing did. ``fault`` (an async callable) may answer instead of the normal handler:

    gw = FakeGateway(token="t")
    kid = gw.add_kernel(state="idle")
    gw.fault = status(503)                 # or html(), raw(b"{"), hang(gw.release), redirect(url), ...
    server = await aiohttp_server(gw.app())

Handlers that hang wait on ``gw.release``; call ``gw.stop_hanging()`` before the server closes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Fault = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]


def kernel_model(kernel_id: str, state: str = "idle", last_activity: str = "2026-01-02T03:04:05.123456Z",
                 name: str = "python3", connections: int = 0) -> dict[str, Any]:
    return {"id": kernel_id, "name": name, "last_activity": last_activity, "execution_state": state,
            "connections": connections}


@dataclass
class FakeGateway:
    token: str = "fake-gateway-token"
    auth_status: int = 403  # what a wrong token gets: Jupyter Server answers 403, Kernel Gateway 401
    list_kernels: bool = True
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fault: Fault | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when a request reaches the server
    in_flight: int = 0
    max_in_flight: int = 0

    def add_kernel(self, kernel_id: str | None = None, **fields: Any) -> str:
        kid = kernel_id or str(uuid.uuid4())
        self.kernels[kid] = kernel_model(kid, **fields)
        return kid

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    def stop_hanging(self) -> None:
        self.release.set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/api", self._version)
        app.router.add_get("/api/kernels", self._list)
        app.router.add_get("/api/kernels/{kernel_id}", self._get)
        app.router.add_delete("/api/kernels/{kernel_id}", self._delete)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
        self.requests.append(Recorded(request.method, request.raw_path.split("?")[0], request.query_string,
                                      dict(request.headers)))
        self.arrived.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.fault is not None:
                answer = await self.fault(request)
                if answer is not None:
                    return answer
            if request.headers.get("Authorization") != f"token {self.token}":
                message = "Forbidden" if self.auth_status == 403 else "Invalid auth token"
                return web.json_response({"message": message}, status=self.auth_status)
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": "fake"})

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if not self.list_kernels:
            return web.json_response({"message": "Forbidden"}, status=403)
        return web.json_response(list(self.kernels.values()))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        model = self.kernels.get(request.match_info["kernel_id"])
        if model is None:
            return web.json_response({"message": "Kernel does not exist"}, status=404)
        return web.json_response(model)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        if self.kernels.pop(request.match_info["kernel_id"], None) is None:
            return web.json_response({"message": "Kernel does not exist"}, status=404)
        return web.Response(status=204)


# --------------------------------------------------------------------------- faults


def status(code: int, body: Any = None) -> Fault:
    async def fault(request: web.Request) -> web.StreamResponse:
        return web.json_response(body if body is not None else {"message": f"fault {code}"}, status=code)

    return fault


def raw(body: bytes, content_type: str = "application/json", code: int = 200) -> Fault:
    async def fault(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=code, content_type=content_type)

    return fault


def html(code: int = 200) -> Fault:
    return raw(b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>", "text/html", code)


def json_body(body: Any, code: int = 200) -> Fault:
    async def fault(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=code)

    return fault


def hang(release: asyncio.Event, then: Fault | None = None) -> Fault:
    """Wait until ``release`` is set (longer than any client timeout in the test), then answer normally."""

    async def fault(request: web.Request) -> web.StreamResponse | None:
        await release.wait()
        return await then(request) if then is not None else None

    return fault


def redirect(location: str, code: int = 302) -> Fault:
    async def fault(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers={"Location": location})

    return fault


def cut_short(declared: int = 4096, sent: bytes = b'{"id": "') -> Fault:
    """Declare ``declared`` bytes, send fewer, then drop the connection."""

    async def fault(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = declared
        await resp.prepare(request)
        await resp.write(sent)
        assert request.transport is not None
        request.transport.close()
        return resp

    return fault


def chunked(total: int, chunk: bytes = b" " * 65536) -> Fault:
    """A chunked body (no Content-Length) of about ``total`` bytes: whitespace, valid JSON only if read whole."""

    async def fault(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"[")
        sent = 0
        try:
            while sent < total:
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write(b"]")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client stopped reading at its cap, as it should
        return resp

    return fault
