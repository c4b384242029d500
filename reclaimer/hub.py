"""JupyterHub REST: the user servers running now, stopping one, and the kernels inside one (through the hub's proxy).

Same safety as the gateway client (``reclaimer.gateway.RestEndpoint``): header token only, no redirects, capped
bodies, timeouts, and only the configured base URL's origin is contacted — a server URL from the hub is used only
when it is a plain path under the configured base path. ``hub.url`` should be the URL that serves both
``/hub/api`` and ``/user/...`` (the proxy's public URL, e.g. ``http://proxy-public``); the hub's own port answers
``/user/...`` with a redirect loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import structlog

from reclaimer.config import HubSettings
from reclaimer.gateway import (
    ERROR_BODY_LIMIT,
    LIST_BODY_LIMIT,
    SHUTDOWN_TIMEOUT_FACTOR,
    BadAnswer,
    RestEndpoint,
    SessionFactory,
    is_kernel_id,
    parse_kernel_listing,
    parse_last_activity,
    read_token,
    tls_context,
)
from reclaimer.model import KernelActivity, ServerRef

log = structlog.get_logger(__name__)

HUB_GATEWAY = "jupyterhub"  # KernelActivity.gateway for kernels observed through the hub's proxy
PAGINATION_ACCEPT = "application/jupyterhub-pagination+json"
MAX_PAGES = 1000  # 1000 pages of the hub's default 200 users; a hub that paginates forever is unknown
MAX_NAME_LENGTH = 255

_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def safe_server_path(url: object, base_path: str) -> str | None:
    """``url`` as a server path ending in "/" when it is a plain path under ``base_path``; None otherwise.

    Refuses absolute and scheme-relative URLs, queries, fragments, backslashes and ``.``/``..`` segments (also
    percent-encoded), so a hub answer can never steer a request, and its token, elsewhere.
    """
    if not isinstance(url, str) or not url or len(url) > 2048 or not _PATH_RE.fullmatch(url) or "//" in url:
        return None
    segments = unquote(url).split("/")
    if any(seg in (".", "..") or "\\" in seg or not seg.isprintable() for seg in segments):
        return None
    path = url if url.endswith("/") else url + "/"
    prefix = base_path.rstrip("/") + "/"
    return path if path.startswith(prefix) else None


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {_type_name(value)}")
    if len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise ValueError(f"{what} {value[:40]!r} is too long or holds control characters")
    return value


class HubClient:
    """One JupyterHub. Methods never raise for the hub's failures: None (or "failed") means unknown."""

    def __init__(
        self,
        settings: HubSettings,
        session_factory: SessionFactory | None = None,
        clock: Callable[[], float] = time.time,
        page_limit: int | None = None,
    ):
        self.settings = settings
        self.up: bool | None = None
        self._clock = clock
        self._page_limit = page_limit
        self._base_path = urlsplit(settings.url).path.rstrip("/")
        self._http = RestEndpoint(
            "hub",
            settings.url,
            read_token(settings.token_env, settings.token_file, "hub"),
            timeout=settings.timeout,
            tls=tls_context(settings.url, settings.ca_file, settings.verify_tls, "hub"),
            session_factory=session_factory,
        )
        self._log = log.bind(hub=settings.url)

    def __repr__(self) -> str:
        return f"HubClient(url={self.settings.url!r})"

    def _mark(self, usable: bool, error: str | None) -> None:
        if usable != self.up:
            if usable:
                self._log.info("hub answering", was=self.up)
            else:
                self._log.warning("hub not answering usably", error=error)
        self.up = usable

    # ------------------------------------------------------------------ servers

    async def list_servers(self) -> list[ServerRef] | None:
        """Every active user server, following the hub's pagination; None when unknown (any page failed)."""
        servers: list[ServerRef] = []
        offset = 0
        for _ in range(MAX_PAGES):
            params = {"state": "active", "offset": str(offset)}
            if self._page_limit is not None:
                params["limit"] = str(self._page_limit)
            answer = await self._http.request(
                "GET", "/hub/api/users", params=params, limit=LIST_BODY_LIMIT, accept=PAGINATION_ACCEPT,
            )
            if answer.error is not None:
                self._mark(False, answer.error)
                return None
            try:
                users, next_offset = _users_page(answer.body, offset)
                servers += [s for user in users for s in _servers_of(user)]
            except BadAnswer as exc:
                self._mark(False, str(exc))
                return None
            if next_offset is None:
                self._mark(True, None)
                return servers
            offset = next_offset
        self._mark(False, "too many pages")
        return None

    async def stop_server(self, user: str, server_name: str = "") -> tuple[str, str]:
        """Stop a user's server (``""``: the default one): ("success" | "already-gone" | "failed", detail)."""
        try:
            _check_name(user, "user name")
            _check_name(server_name, "server name")
        except ValueError as exc:
            return "failed", f"{exc}; no request made"
        if not user:
            return "failed", "empty user name; no request made"
        path = f"/hub/api/users/{quote(user, safe='')}/" + (
            f"servers/{quote(server_name, safe='')}" if server_name else "server"
        )
        answer = await self._http.request(
            "DELETE", path, limit=ERROR_BODY_LIMIT, timeout=self.settings.timeout * SHUTDOWN_TIMEOUT_FACTOR
        )
        label = f"{user}/{server_name}" if server_name else user
        if answer.status in (200, 202, 204):
            self._mark(True, None)
            return "success", ("stop requested (pending)" if answer.status == 202 else "server stopped") + f": {label}"
        if answer.status == 404:
            self._mark(True, None)
            return "already-gone", f"no such server: {label}"
        if answer.status == 400 and "not running" in answer.message:
            self._mark(True, None)
            return "already-gone", f"server not running: {label}"
        error = answer.error or f"unexpected HTTP {answer.status}"
        self._mark(False, error)
        return "failed", f"hub: {error}: {answer.message}" if answer.message else f"hub: {error}"

    # ------------------------------------------------------------------ kernels inside a server

    async def server_kernels(self, server: ServerRef) -> list[KernelActivity] | None:
        """``GET <server url>api/kernels`` through the hub's proxy with the hub token; None when unknown."""
        path = safe_server_path(server.url, self._base_path)
        if path is None:
            self._log.warning("server URL refused; not contacted", user=server.user, server_name=server.server_name)
            return None
        answer = await self._http.request("GET", path.removeprefix(self._base_path) + "api/kernels",
                                          limit=LIST_BODY_LIMIT)
        if answer.error is not None:
            self._log.warning("server kernels unknown", user=server.user, server_name=server.server_name,
                              error=answer.error)
            return None
        try:
            return parse_kernel_listing(answer.body, HUB_GATEWAY, self._clock())
        except BadAnswer as exc:
            self._log.warning("server kernels unknown", user=server.user, server_name=server.server_name,
                              error=str(exc))
            return None

    async def shutdown_server_kernel(self, server: ServerRef, kernel_id: str) -> tuple[str, str]:
        """``DELETE <server url>api/kernels/{id}`` through the hub's proxy, for a kernel no configured gateway
        serves: ("success" | "already-gone" | "failed", detail)."""
        path = safe_server_path(server.url, self._base_path)
        if path is None:
            return "failed", "server URL refused; no request made"
        if not is_kernel_id(kernel_id):
            return "failed", "not a canonical kernel id; no request made"
        answer = await self._http.request(
            "DELETE", path.removeprefix(self._base_path) + "api/kernels/" + quote(kernel_id, safe=""),
            limit=ERROR_BODY_LIMIT, timeout=self.settings.timeout * SHUTDOWN_TIMEOUT_FACTOR,
        )
        label = f"{server.user}/{server.server_name}" if server.server_name else server.user
        if answer.status in (200, 202, 204):
            return "success", f"kernel shut down in server {label}"
        if answer.status == 404:
            return "already-gone", f"server {label} no longer has the kernel"
        error = answer.error or f"unexpected HTTP {answer.status}"
        return "failed", f"server {label}: {error}"

    async def close(self) -> None:
        await self._http.close()


def _users_page(body: Any, offset: int) -> tuple[list[Any], int | None]:
    """(users, next offset or None) from the paginated form or the old plain list."""
    if isinstance(body, list):
        return body, None
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise BadAnswer(f"expected a user list, got {_type_name(body)}")
    pagination = body.get("_pagination")
    nxt = pagination.get("next") if isinstance(pagination, dict) else None
    if nxt is None:
        return body["items"], None
    # Only the offset is taken from the hub: its "url" is never followed (it could name another host).
    next_offset = nxt.get("offset") if isinstance(nxt, dict) else None
    if type(next_offset) is not int or next_offset <= offset:
        raise BadAnswer("pagination does not advance")
    return body["items"], next_offset


def _groups_of(user: dict[str, Any], name: str) -> tuple[str, ...] | None:
    """The user's groups; None when the hub did not say (the token lacks ``read:users:groups``)."""
    if "groups" not in user:
        return None
    groups = user["groups"]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadAnswer(f"user {name!r}: 'groups' is not a list of names")
    return tuple(sorted(groups))


def _profile_of(model: dict[str, Any]) -> tuple[str | None, bool]:
    """(KubeSpawner profile slug, whether the server's user_options were shown and readable)."""
    options = model.get("user_options")
    if options is None and "user_options" not in model:
        return None, False
    if options is None:
        return None, True  # the spawner was given no options: no profile chosen
    if not isinstance(options, dict):
        return None, False
    profile = options.get("profile")
    if profile is None:
        return None, True
    if isinstance(profile, str) and 0 < len(profile) <= MAX_NAME_LENGTH and profile.isprintable():
        return profile, True
    return None, False  # a profile we cannot read: which policy applies is unknown


def _servers_of(user: Any) -> list[ServerRef]:
    if not isinstance(user, dict):
        raise BadAnswer(f"expected a user object, got {_type_name(user)}")
    name = user.get("name")
    if not isinstance(name, str) or not name:
        raise BadAnswer("user object without a 'name'")
    groups = _groups_of(user, name)
    servers = user.get("servers")
    if not isinstance(servers, dict):
        raise BadAnswer(f"user {name!r} has no 'servers' object (does the token have the read:servers scope?)")
    out: list[ServerRef] = []
    for server_name, model in servers.items():
        if not isinstance(model, dict):
            raise BadAnswer(f"server {server_name!r} of user {name!r} is not an object")
        url = model.get("url")
        if url is not None and not isinstance(url, str):
            raise BadAnswer(f"server {server_name!r} of user {name!r}: 'url' is not a string")
        ready = model.get("ready")
        profile, options_known = _profile_of(model)
        out.append(ServerRef(
            user=name,
            server_name=server_name,
            last_activity=parse_last_activity(model.get("last_activity")),
            url=url,
            ready=ready if isinstance(ready, bool) else None,
            groups=groups,
            profile=profile,
            options_known=options_known,
        ))
    return out
