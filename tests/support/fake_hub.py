"""A fake JupyterHub (aiohttp) following the real hub's REST semantics, for faults a real hub cannot be made to show.

The real hub (tests/support/jupyter_fixtures.start_jupyterhub) covers the happy paths; this one adds the old
plain-list answer, a ``next`` URL naming another host, non-advancing pagination, 202/400 stop answers, garbled
bodies and a base path. Semantics copied from JupyterHub 5/6 ``apihandlers/users.py``:
- ``GET /hub/api/users`` with ``Accept: application/jupyterhub-pagination+json`` answers
  ``{"items": [...], "_pagination": {"offset", "limit", "total", "next": {"offset", "limit", "url"} | null}}``;
  without it, a plain list (the first ``limit`` users). ``state=active`` keeps users with a running server.
- ``DELETE /hub/api/users/{user}/server`` and ``.../servers/{name}``: 204 stopped, 202 stop pending, 404 no such user
  or named server.
- ``POST /hub/api/users/{user}/tokens`` mints a token owned by the user with the scopes asked for (201, with "token",
  "id", "scopes"); ``DELETE /hub/api/users/{user}/tokens/{id}`` revokes it (204; 404 when unknown).
- ``<prefix>/user/{user}/[{server}/]api/kernels`` stands in for the single-user server itself, reached directly at
  this app's origin: it accepts only a minted token whose scope is ``access:servers!server=<user>/<server>`` (403
  otherwise, the hub token included), as jupyterhub-singleuser does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.support.fake_gateway import Fault, Recorded, kernel_model


def server_model(user: str, name: str = "", prefix: str = "", ready: bool = True,
                 last_activity: str | None = "2026-11-23T19:13:42.773735Z") -> dict[str, Any]:
    url = f"{prefix}/user/{user}/" + (f"{name}/" if name else "")
    return {"name": name, "last_activity": last_activity, "started": "2026-11-23T19:00:00Z", "pending": None,
            "ready": ready, "stopped": False, "url": url, "user_options": {}}


@dataclass
class FakeHub:
    token: str = "fake-hub-token"
    prefix: str = ""  # the hub's base_url, e.g. "/jhub"
    page_limit: int = 200
    paginate: bool = True  # False: an old hub that answers a plain list
    next_url_host: str | None = None  # put another host in "next.url" (the client must ignore it)
    stuck_pagination: bool = False  # "next" never advances
    users: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # user -> server name -> model
    kernels: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    delete_answer: tuple[int, Any] | None = None  # forced (status, JSON body) for DELETE
    mint_answer: tuple[int, Any] | None = None  # forced (status, JSON body) for POST .../tokens
    minted: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> {"id", "user", "scopes"}
    revoked: list[str] = field(default_factory=list)  # token ids
    requests: list[Recorded] = field(default_factory=list)
    fault: Fault | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def add_server(self, user: str, name: str = "", **kw: Any) -> dict[str, Any]:
        model = server_model(user, name, self.prefix, **kw)
        self.users.setdefault(user, {})[name] = model
        return model

    def add_kernel(self, user: str, server_name: str = "", kernel_id: str | None = None, **kw: Any) -> str:
        import uuid

        kid = kernel_id or str(uuid.uuid4())
        self.kernels.setdefault((user, server_name), []).append(kernel_model(kid, **kw))
        return kid

    def stop_hanging(self) -> None:
        self.release.set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        p = self.prefix
        app.router.add_get(f"{p}/hub/api/users", self._list_users)
        app.router.add_delete(f"{p}/hub/api/users/{{user}}/server", self._delete)
        app.router.add_delete(f"{p}/hub/api/users/{{user}}/servers/{{name}}", self._delete)
        app.router.add_post(f"{p}/hub/api/users/{{user}}/tokens", self._mint)
        app.router.add_delete(f"{p}/hub/api/users/{{user}}/tokens/{{token_id}}", self._revoke)
        app.router.add_get(f"{p}/user/{{user}}/api/kernels", self._kernels)
        app.router.add_get(f"{p}/user/{{user}}/{{name}}/api/kernels", self._kernels)
        app.router.add_delete(f"{p}/user/{{user}}/api/kernels/{{kernel_id}}", self._delete_kernel)
        app.router.add_delete(f"{p}/user/{{user}}/{{name}}/api/kernels/{{kernel_id}}", self._delete_kernel)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
        self.requests.append(Recorded(request.method, request.raw_path.split("?")[0], request.query_string,
                                      dict(request.headers)))
        if self.fault is not None:
            answer = await self.fault(request)
            if answer is not None:
                return answer
        if "/hub/api/" not in request.path:
            return await handler(request)  # a user's server checks its own tokens
        if request.headers.get("Authorization") != f"token {self.token}":
            # JupyterHub's answer to an unknown or expired token (scopes.needs_scope).
            return web.json_response({"status": 403, "message": "Missing or invalid credentials."}, status=403)
        return await handler(request)

    def server_token_ok(self, request: web.Request, user: str, name: str) -> bool:
        header = request.headers.get("Authorization", "")
        held = self.minted.get(header.removeprefix("token "))
        return held is not None and held["scopes"] == [f"access:servers!server={user}/{name}"]

    async def _mint(self, request: web.Request) -> web.StreamResponse:
        import secrets

        if self.mint_answer is not None:
            code, body = self.mint_answer
            return web.json_response(body, status=code)
        user = unquote(request.match_info["user"])
        if user not in self.users:
            return web.json_response({"status": 403, "message": f"User {user} not found"}, status=403)
        body = await request.json()
        token, token_id = secrets.token_hex(16), "a" + secrets.token_hex(4)
        self.minted[token] = {"id": token_id, "user": user, "scopes": list(body.get("scopes") or []),
                              "note": body.get("note"), "expires_in": body.get("expires_in")}
        return web.json_response({"token": token, "id": token_id, "user": user, "scopes": body.get("scopes")},
                                 status=201)

    async def _revoke(self, request: web.Request) -> web.StreamResponse:
        token_id = request.match_info["token_id"]
        for token, held in list(self.minted.items()):
            if held["id"] == token_id and held["user"] == unquote(request.match_info["user"]):
                del self.minted[token]
                self.revoked.append(token_id)
                return web.Response(status=204)
        return web.json_response({"status": 404, "message": "no such token"}, status=404)

    def _user_model(self, name: str) -> dict[str, Any]:
        servers = self.users[name]
        return {"kind": "user", "name": name, "admin": False, "roles": ["user"], "groups": [],
                "server": servers[""]["url"] if "" in servers else None, "pending": None,
                "last_activity": None, "servers": dict(servers)}

    async def _list_users(self, request: web.Request) -> web.StreamResponse:
        names = sorted(self.users)
        if request.query.get("state") == "active":
            names = [n for n in names if self.users[n]]
        offset = int(request.query.get("offset", "0"))
        limit = min(int(request.query.get("limit", str(self.page_limit))), self.page_limit)
        page = [self._user_model(n) for n in names[offset:offset + limit]]
        if not self.paginate or request.headers.get("Accept") != "application/jupyterhub-pagination+json":
            return web.json_response(page)
        nxt = None
        if offset + limit < len(names):
            next_offset = offset if self.stuck_pagination else offset + limit
            host = self.next_url_host or f"{request.scheme}://{request.host}"
            nxt = {"offset": next_offset, "limit": limit,
                   "url": f"{host}{self.prefix}/hub/api/users?offset={next_offset}&limit={limit}"}
        return web.json_response({"items": page, "_pagination": {"offset": offset, "limit": limit,
                                                                 "total": len(names), "next": nxt}})

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        if self.delete_answer is not None:
            code, body = self.delete_answer
            return web.json_response(body, status=code) if body is not None else web.Response(status=code)
        user = unquote(request.match_info["user"])
        name = unquote(request.match_info.get("name", ""))
        if user not in self.users:
            return web.json_response({"status": 404, "message": None}, status=404)
        if name and name not in self.users[user]:
            return web.json_response({"status": 404, "message": f"{user} has no server named '{name}'"}, status=404)
        self.users[user].pop(name, None)
        return web.Response(status=204)

    async def _kernels(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["user"], request.match_info.get("name", ""))
        if not self.server_token_ok(request, *key):
            return web.json_response({"status": 403, "message": "Forbidden"}, status=403)
        if key[1] not in self.users.get(key[0], {}):
            return web.Response(status=503, text="<html>Service Unavailable</html>", content_type="text/html")
        return web.json_response(self.kernels.get(key, []))

    async def _delete_kernel(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["user"], request.match_info.get("name", ""))
        if not self.server_token_ok(request, *key):
            return web.json_response({"status": 403, "message": "Forbidden"}, status=403)
        kernels = self.kernels.get(key, [])
        kept = [k for k in kernels if k["id"] != request.match_info["kernel_id"]]
        if len(kept) == len(kernels):
            return web.json_response({"message": "Kernel does not exist"}, status=404)
        self.kernels[key] = kept
        return web.Response(status=204)
