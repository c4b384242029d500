"""Fake Jupyter gateways for the load measures: real aiohttp servers on loopback answering ``GET /api/kernels`` and
``GET /api/kernels/{id}`` with Jupyter Server's kernel model, behind a TCP proxy that counts the bytes on the wire.

``start_gateway`` runs inside the caller's event loop; ``GatewaysInThread`` runs several in a background thread
for a daemon subprocess to talk to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

TOKEN_ENV = "BENCH_GATEWAY_TOKEN"
TOKEN = "bench-gateway-token-not-secret"  # only ever sent to loopback fakes


def kernel_model(kernel_id: str, index: int, now: datetime) -> dict[str, Any]:
    """Jupyter Server's kernel model as ``/api/kernels`` returns it: most idle for a while, some busy."""
    busy = index % 5 == 0
    last = now - timedelta(seconds=5 if busy else 600 + 37 * index)
    return {
        "id": kernel_id,
        "name": "python3" if index % 3 else "ir",
        "last_activity": last.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z",
        "execution_state": "busy" if busy else "idle",
        "connections": 1 if index % 4 else 0,
    }


@dataclass
class GatewayStats:
    """What one gateway received: requests by kind, and bytes on the wire each way (from the proxy)."""

    listings: int = 0
    kernel_gets: int = 0
    other: int = 0
    bytes_in: int = 0  # client -> gateway (requests)
    bytes_out: int = 0  # gateway -> client (responses)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"listings": self.listings, "kernel_gets": self.kernel_gets, "other": self.other,
                    "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def gateway_app(kernels: dict[str, dict[str, Any]], stats: GatewayStats, token: str = TOKEN) -> web.Application:
    """The kernels REST subset, with the token check a real gateway does."""

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"token {token}":
            return web.json_response({"message": "Forbidden"}, status=403)
        return await handler(request)

    async def listing(request: web.Request) -> web.StreamResponse:
        stats.add(listings=1)
        return web.json_response(list(kernels.values()))

    async def one(request: web.Request) -> web.StreamResponse:
        stats.add(kernel_gets=1)
        model = kernels.get(request.match_info["kernel_id"])
        if model is None:
            return web.json_response({"message": "Kernel does not exist"}, status=404)
        return web.json_response(model)

    app = web.Application(middlewares=[auth])
    app.router.add_get("/api/kernels", listing)
    app.router.add_get("/api/kernels/{kernel_id}", one)
    return app


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Callable[[int], None]) -> None:
    try:
        while chunk := await reader.read(65536):
            count(len(chunk))
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass  # the other side went away: close ours too
    finally:
        writer.close()


async def _counting_proxy(upstream_port: int, stats: GatewayStats) -> asyncio.AbstractServer:
    """A loopback TCP proxy to ``upstream_port`` that adds every byte each way to ``stats``."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(
            _pipe(client_r, up_w, lambda n: stats.add(bytes_in=n)),
            _pipe(up_r, client_w, lambda n: stats.add(bytes_out=n)),
        )

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@dataclass
class RunningGateway:
    url: str  # the proxy's URL: what clients are configured with
    stats: GatewayStats
    kernels: dict[str, dict[str, Any]]
    _runner: web.AppRunner
    _proxy: asyncio.AbstractServer

    async def close(self) -> None:
        self._proxy.close()
        await self._proxy.wait_closed()
        await self._runner.cleanup()


async def start_gateway(kernel_ids: Sequence[str], first_index: int = 0) -> RunningGateway:
    """A gateway serving ``kernel_ids`` on loopback behind a byte-counting proxy, in the running loop."""
    now = datetime.now(timezone.utc)
    kernels = {kid: kernel_model(kid, first_index + i, now) for i, kid in enumerate(kernel_ids)}
    stats = GatewayStats()
    runner = web.AppRunner(gateway_app(kernels, stats), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    proxy = await _counting_proxy(port, stats)
    proxy_port = proxy.sockets[0].getsockname()[1]
    return RunningGateway(f"http://127.0.0.1:{proxy_port}", stats, kernels, runner, proxy)


class GatewaysInThread:
    """Several fake gateways served from a background thread's event loop (for a daemon in a subprocess)."""

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self._groups = groups
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-gateways", daemon=True)
        self.gateways: list[RunningGateway] = []

    def __enter__(self) -> GatewaysInThread:
        self._thread.start()

        async def start_all() -> list[RunningGateway]:
            out, first = [], 0
            for group in self._groups:
                out.append(await start_gateway(group, first))
                first += len(group)
            return out

        self.gateways = asyncio.run_coroutine_threadsafe(start_all(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close_all() -> None:
            for g in self.gateways:
                await g.close()

        try:
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
