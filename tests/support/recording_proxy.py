"""A recording reverse proxy in front of a real gateway: tests assert on exactly which calls the daemon made."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass
class RecordingProxy:
    upstream: str
    calls: list[tuple[str, str]] = field(default_factory=list)
    failing: bool = False  # answer 503 to everything (a gateway outage) while set
    _session: aiohttp.ClientSession | None = None

    def mutating(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] not in ("GET", "HEAD", "OPTIONS")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.method, request.path_qs))
        if self.failing:
            return web.Response(status=503, text="gateway outage (test)")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body or None, allow_redirects=False) as up:
            payload = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=up.status, body=payload, headers=out_headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def session_ctx(_: web.Application):
            self._session = aiohttp.ClientSession()
            yield
            await self._session.close()

        app.cleanup_ctx.append(session_ctx)
        return app
