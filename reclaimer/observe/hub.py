"""JupyterHub: the user servers running now and stopping one (the hub's REST API, with the hub token), and the
kernels inside one server (that server's own REST API, reached directly, with a token that opens only that server).

Trust boundaries (docs/tokens.md):
- The hub token goes to ``<hub.url>/hub/api/...`` only, never to a user's server: a user who logs the request headers
  of their own server must not get a token that opens every server.
- A user's server is asked with a token the hub mints for it (``POST /hub/api/users/{user}/tokens``, scopes
  ``access:servers!server=<user>/<name>`` only, short-lived, revoked when replaced, when the server is gone and at
  shutdown): it opens that server and nothing else, so the server gains nothing it did not have.
- A user's server is reached directly (its pod IP, or the loopback port its process listens on), never through the
  hub's proxy: configurable-http-proxy counts every proxied request as the user's activity. Requests carry
  ``no_track_activity=1`` so jupyter_server does not count them either; watching is not using.

Same safety as the gateway client (``reclaimer.observe.jupyter_rest.RestEndpoint``): header token only, no
redirects, capped bodies, timeouts; a server path from the hub is used only when it is a plain path under the
configured base path, and a server origin only when it is ``http://<IP literal>:<port>``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import structlog

from reclaimer.core.config import HubSettings
from reclaimer.core.kernelids import is_kernel_id
from reclaimer.core.keys import HUB_CREDENTIAL
from reclaimer.core.model import Candidate, KernelActivity, PodInfo, ServerRef
from reclaimer.core.results import ALREADY_GONE, FAILED, SUCCESS, AdapterOutcome
from reclaimer.core.sources import HUB_GATEWAY
from reclaimer.observe import procfs
from reclaimer.observe.jupyter_rest import (
    ERROR_BODY_LIMIT,
    LIST_BODY_LIMIT,
    SHUTDOWN_TIMEOUT_FACTOR,
    BadAnswer,
    RestEndpoint,
    SessionFactory,
    answer_clock_skew,
    parse_kernel_listing,
    parse_last_activity,
    tls_context,
)
from reclaimer.observe.tokens import TokenSource

log = structlog.get_logger(__name__)

PAGINATION_ACCEPT = "application/jupyterhub-pagination+json"
MAX_PAGES = 1000  # 1000 pages of the hub's default 200 users; a hub that paginates forever is unknown
MAX_NAME_LENGTH = 255
MAX_SERVER_TOKENS = 256  # minted server tokens held at once (LRU; an evicted one is revoked)
MAX_SERVER_ENDPOINTS = 64  # direct server origins with an open connection pool (LRU)
RENEW_FRACTION = 0.25  # a server token is replaced once less than this fraction of its life is left
TOKEN_NOTE_PREFIX = "Server at "  # the hub does not count API use of such a token as its owner's activity
SERVER_ANCESTOR_DEPTH = 4  # how far up from a kernel process its JupyterHub server process may be
SERVER_PORT_NAME = "notebook-port"  # KubeSpawner's name for the single-user server's container port
_TOKEN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

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


def safe_origin(origin: object) -> str | None:
    """``origin`` when it is ``http://<IP literal>:<port>`` (a pod IP or a loopback socket, found by the daemon, never
    taken from a user's text); None otherwise."""
    if not isinstance(origin, str) or len(origin) > 64:
        return None
    parts = urlsplit(origin)
    if parts.scheme != "http" or parts.path or parts.query or parts.fragment or parts.username or parts.password:
        return None
    try:
        host = parts.hostname
        port = parts.port
        if host is None or port is None or not 0 < port < 65536:
            return None
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_multicast or ip.is_unspecified:
        return None
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def _hub_refused(answer: Any) -> bool:
    """JupyterHub answers an unknown or expired token with 403 "Missing or invalid credentials." (scopes.needs_scope),
    a token that lacks a scope with another 403 message."""
    return bool(answer.status == 401 or (answer.status == 403 and answer.message.startswith("Missing or invalid")))


@dataclass(slots=True)
class _ServerToken:
    token: str
    token_id: str
    minted_at: float
    expires_at: float


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
        self._session_factory = session_factory
        # The hub token: sent to <hub.url>/hub/api/... and nowhere else (see _api).
        self._http = RestEndpoint(
            "hub",
            settings.url,
            TokenSource.from_settings(settings.token_env, settings.token_file, HUB_CREDENTIAL),
            timeout=settings.timeout,
            tls=tls_context(settings.url, settings.ca_file, settings.verify_tls, "hub"),
            session_factory=session_factory,
            refusal=_hub_refused,
        )
        self._servers: OrderedDict[str, RestEndpoint] = OrderedDict()  # origin -> endpoint without any token
        self._tokens: OrderedDict[tuple[str, str], _ServerToken] = OrderedDict()
        self._minting: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        self.tokens_minted = 0
        self.tokens_revoked = 0
        self._log = log.bind(hub=settings.url)

    @property
    def credential(self) -> TokenSource | None:
        """The hub token's source (its ``rejected`` says whether the hub refused it)."""
        return self._http.token_source

    async def _api(self, method: str, path: str, **kw: Any) -> Any:
        """A request to the hub's REST API, the only place the hub token goes."""
        if not path.startswith("/hub/api/"):
            raise ValueError(f"the hub token goes to /hub/api/ only, not {path[:60]!r}")
        return await self._http.request(method, path, **kw)

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
            answer = await self._api(
                "GET",
                "/hub/api/users",
                params=params,
                limit=LIST_BODY_LIMIT,
                accept=PAGINATION_ACCEPT,
            )
            if answer.error is not None:
                self._mark(False, answer.error)
                return None
            try:
                users, next_offset = _users_page(answer.body, offset)
                listed_at = self._clock()
                servers += [s for user in users for s in _servers_of(user, listed_at)]
            except BadAnswer as exc:
                self._mark(False, str(exc))
                return None
            if next_offset is None:
                self._mark(True, None)
                await self._revoke_gone({(s.user, s.server_name) for s in servers if s.ready is not False})
                return servers
            offset = next_offset
        self._mark(False, "too many pages")
        return None

    async def user_servers(self, user: str) -> list[ServerRef] | None:
        """The active servers of one user, asked now (``GET /hub/api/users/{name}``); None when unknown.

        The re-check before stop-server / evict-pod reads this instead of trusting the cycle's listing.
        """
        try:
            _check_name(user, "user name")
        except ValueError as exc:
            self._log.warning("user name refused; hub not asked", error=str(exc))
            return None
        answer = await self._api("GET", f"/hub/api/users/{quote(user, safe='')}", limit=LIST_BODY_LIMIT)
        if answer.status == 404:
            self._mark(True, None)
            return []
        if answer.error is not None:
            self._mark(False, answer.error)
            return None
        try:
            servers = _servers_of(answer.body, self._clock())
        except BadAnswer as exc:
            self._mark(False, str(exc))
            return None
        self._mark(True, None)
        return servers  # the hub lists only active servers unless asked with include_stopped_servers

    async def stop_server(self, user: str, server_name: str = "") -> AdapterOutcome:
        """Stop a user's server (``""``: the default one): ("success" | "already-gone" | "failed", detail)."""
        try:
            _check_name(user, "user name")
            _check_name(server_name, "server name")
        except ValueError as exc:
            return FAILED, f"{exc}; no request made"
        if not user:
            return FAILED, "empty user name; no request made"
        path = f"/hub/api/users/{quote(user, safe='')}/" + (
            f"servers/{quote(server_name, safe='')}" if server_name else "server"
        )
        answer = await self._api(
            "DELETE", path, limit=ERROR_BODY_LIMIT, timeout=self.settings.timeout * SHUTDOWN_TIMEOUT_FACTOR
        )
        label = f"{user}/{server_name}" if server_name else user
        if answer.status in (200, 202, 204):
            self._mark(True, None)
            return SUCCESS, ("stop requested (pending)" if answer.status == 202 else "server stopped") + f": {label}"
        if answer.status == 404:
            self._mark(True, None)
            return ALREADY_GONE, f"no such server: {label}"
        if answer.status == 400 and "not running" in answer.message:
            self._mark(True, None)
            return ALREADY_GONE, f"server not running: {label}"
        error = answer.error or f"unexpected HTTP {answer.status}"
        self._mark(False, error)
        return FAILED, f"hub: {error}: {answer.message}" if answer.message else f"hub: {error}"

    # ------------------------------------------------------------------ tokens for one server

    async def server_token(self, server: ServerRef) -> str | None:
        """A token that opens ``server`` and nothing else, minted by the hub and cached until most of its life is
        gone; None when the hub would not mint one (unknown)."""
        key = (server.user, server.server_name)
        held = self._tokens.get(key)
        now = self._clock()
        if held is not None and now < held.expires_at - RENEW_FRACTION * (held.expires_at - held.minted_at):
            self._tokens.move_to_end(key)
            return held.token
        pending = self._minting.get(key)
        if pending is not None:  # one mint per server at a time: concurrent callers share it
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._minting[key] = future
        try:
            token = await self._mint(server)
            future.set_result(token)
            return token
        except BaseException as exc:
            future.set_result(None)
            if isinstance(exc, Exception):
                self._log.warning(
                    "server token not minted", user=server.user, server_name=server.server_name, error=repr(exc)
                )
                return None
            raise
        finally:
            self._minting.pop(key, None)

    async def _mint(self, server: ServerRef) -> str | None:
        user, name = _check_name(server.user, "user name"), _check_name(server.server_name, "server name")
        if not user:
            return None
        scope = f"access:servers!server={user}/{name}"
        ttl = int(self.settings.server_token_ttl)
        body = {
            "scopes": [scope],
            "expires_in": ttl,
            "note": f"{TOKEN_NOTE_PREFIX}{server.url or '/user/' + user} (gpu-reclaimer: read kernels)",
        }
        started = self._clock()
        answer = await self._api(
            "POST", f"/hub/api/users/{quote(user, safe='')}/tokens", body=body, limit=ERROR_BODY_LIMIT
        )
        label = f"{user}/{name}"
        if answer.error is not None or answer.status != 201 or not isinstance(answer.body, dict):
            error = answer.error or f"unexpected HTTP {answer.status}"
            self._log.warning("hub did not mint a server token", server=label, error=error, detail=answer.message)
            return None
        token, token_id, scopes = answer.body.get("token"), answer.body.get("id"), answer.body.get("scopes")
        if not isinstance(token_id, str) or not _TOKEN_ID_RE.fullmatch(token_id):
            self._log.warning("hub minted a token without a usable id; not used", server=label)
            return None
        # The hub adds what identifying the token's owner takes (its own name and groups): nothing else is accepted.
        allowed = {scope, f"read:users:name!user={user}", f"read:users:groups!user={user}"}
        if (
            not isinstance(token, str)
            or not token.isascii()
            or not token.isprintable()
            or not token
            or (
                scopes is not None
                and (
                    not isinstance(scopes, list)
                    or scope not in scopes
                    or not all(isinstance(x, str) for x in scopes)
                    or not set(scopes) <= allowed
                )
            )
        ):
            # A token wider than one server must never reach a server: give it back at once.
            self._log.warning(
                "hub minted a token other than asked; revoked, not used",
                server=label,
                scopes=scopes if isinstance(scopes, list) else None,
            )
            await self._revoke(user, token_id)
            return None
        old = self._tokens.pop((server.user, server.server_name), None)
        self._tokens[(server.user, server.server_name)] = _ServerToken(token, token_id, started, started + ttl)
        self.tokens_minted += 1
        self._log.info("server token minted", server=label, scope=scope, expires_in=ttl)
        if old is not None:
            await self._revoke(user, old.token_id)
        while len(self._tokens) > MAX_SERVER_TOKENS:
            (evicted_user, _), evicted = self._tokens.popitem(last=False)
            await self._revoke(evicted_user, evicted.token_id)
        return token

    async def _revoke(self, user: str, token_id: str) -> bool:
        answer = await self._api(
            "DELETE", f"/hub/api/users/{quote(user, safe='')}/tokens/{quote(token_id, safe='')}", limit=ERROR_BODY_LIMIT
        )
        if answer.status in (200, 204, 404):
            self.tokens_revoked += 1
            return True
        self._log.warning(
            "server token not revoked; it expires by itself", user=user, error=answer.error or f"HTTP {answer.status}"
        )
        return False

    def forget_token(self, server: ServerRef) -> None:
        """Drop the cached token of ``server`` (the server refused it): the next request mints a new one."""
        self._tokens.pop((server.user, server.server_name), None)

    async def _revoke_gone(self, live: Iterable[tuple[str, str]]) -> None:
        keep = set(live)
        for key in [k for k in self._tokens if k not in keep]:
            held = self._tokens.pop(key)
            await self._revoke(key[0], held.token_id)

    # ------------------------------------------------------------------ kernels inside a server

    def _server_endpoint(self, origin: str) -> RestEndpoint:
        endpoint = self._servers.get(origin)
        if endpoint is None:
            # No token of its own: each request carries the one server's token. no_track_activity on every request.
            endpoint = RestEndpoint(
                "user-server",
                origin,
                None,
                timeout=self.settings.timeout,
                session_factory=self._session_factory,
                untracked=True,
            )
            self._servers[origin] = endpoint
            while len(self._servers) > MAX_SERVER_ENDPOINTS:
                _, old = self._servers.popitem(last=False)
                asyncio.get_running_loop().create_task(old.close())
        self._servers.move_to_end(origin)
        return endpoint

    async def _server_request(self, server: ServerRef, method: str, suffix: str, **kw: Any) -> Any:
        """``method`` on ``<server origin><server path><suffix>`` with the server's own token; (answer | None, why)."""
        path = safe_server_path(server.url, self._base_path)
        if path is None:
            return None, "server URL refused; no request made"
        origin = safe_origin(server.origin)
        if origin is None:
            return None, "no direct address for the server (not through the proxy); no request made"
        token = await self.server_token(server)
        if token is None:
            return None, "the hub minted no token for the server; no request made"
        answer = await self._server_endpoint(origin).request(method, path + suffix, token=token, **kw)
        if answer.status in (401, 403):
            self.forget_token(server)  # revoked by the user, or expired: mint a fresh one next time
        return answer, None

    async def server_kernels(self, server: ServerRef) -> list[KernelActivity] | None:
        """``GET <server>/api/kernels`` directly, with the server's own token; None when unknown."""
        answer, refused = await self._server_request(server, "GET", "api/kernels", limit=LIST_BODY_LIMIT)
        if answer is None:
            self._log.warning("server kernels unknown", user=server.user, server_name=server.server_name, error=refused)
            return None
        if answer.error is not None:
            self._log.warning(
                "server kernels unknown", user=server.user, server_name=server.server_name, error=answer.error
            )
            return None
        try:
            now = self._clock()
            return parse_kernel_listing(answer.body, HUB_GATEWAY, now, answer_clock_skew(answer, now))
        except BadAnswer as exc:
            self._log.warning(
                "server kernels unknown", user=server.user, server_name=server.server_name, error=str(exc)
            )
            return None

    async def shutdown_server_kernel(self, server: ServerRef, kernel_id: str) -> AdapterOutcome:
        """``DELETE <server>/api/kernels/{id}`` directly, for a kernel no configured gateway serves:
        ("success" | "already-gone" | "failed", detail)."""
        if not is_kernel_id(kernel_id):
            return FAILED, "not a canonical kernel id; no request made"
        answer, refused = await self._server_request(
            server,
            "DELETE",
            "api/kernels/" + quote(kernel_id, safe=""),
            limit=ERROR_BODY_LIMIT,
            timeout=self.settings.timeout * SHUTDOWN_TIMEOUT_FACTOR,
        )
        if answer is None:
            return FAILED, str(refused)
        label = f"{server.user}/{server.server_name}" if server.server_name else server.user
        if answer.status in (200, 202, 204):
            return SUCCESS, f"kernel shut down in server {label}"
        if answer.status == 404:
            return ALREADY_GONE, f"server {label} no longer has the kernel"
        error = answer.error or f"unexpected HTTP {answer.status}"
        return FAILED, f"server {label}: {error}"

    async def close(self) -> None:
        """Revoke every server token still held (best effort: they expire anyway), then close the connections."""
        try:
            await asyncio.wait_for(self._revoke_gone(()), self.settings.timeout)
        except Exception as exc:  # shutting down: a hub that does not answer must not hold the exit
            self._log.warning("server tokens not revoked at shutdown; they expire by themselves", error=repr(exc))
        self._tokens.clear()
        await asyncio.gather(*(e.close() for e in self._servers.values()), return_exceptions=True)
        self._servers.clear()
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


def _servers_of(user: Any, listed_at: float | None = None) -> list[ServerRef]:
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
        state = model.get("state")  # only with admin:server_state; LocalProcessSpawner keeps the server's pid
        pid = state.get("pid") if isinstance(state, dict) else None
        out.append(
            ServerRef(
                user=name,
                server_name=server_name,
                last_activity=parse_last_activity(model.get("last_activity")),
                url=url,
                ready=ready if isinstance(ready, bool) else None,
                groups=groups,
                profile=profile,
                options_known=options_known,
                pid=pid if type(pid) is int and pid > 0 else None,
                listed_at=listed_at,
            )
        )
    return out


# --------------------------------------------------------------------------- where a kernel's server is (blocking)


def locate_servers(
    candidates: Iterable[Candidate], servers: Iterable[ServerRef], procfs_root: str, default_port: int = 8888
) -> dict[str, ServerRef]:
    """For each kernel candidate, its JupyterHub server with the address to reach it directly (never the proxy).

    In a pod (KubeSpawner): the server the pod's labels name, at the pod's IP and its ``notebook-port`` (else
    ``default_port``). On a plain host (LocalProcessSpawner): the server whose process (its pid, from the hub's server
    state) is an ancestor of the kernel process, at the one loopback port that process listens on. Anything less
    certain gives no server (the kernel stays unknown). Reads /proc: call it in a thread.
    """
    by_pid = {s.pid: s for s in servers if s.pid is not None and s.ready is not False}
    out: dict[str, ServerRef] = {}
    for c in candidates:
        if c.kernel_id is None:
            continue
        if c.pod is not None:
            located = pod_server(c.pod, c.server, default_port) if c.server is not None else None
            if located is not None:
                out[c.kernel_id] = located
            continue
        owners: set[ServerRef] = set()
        for p in c.processes:
            start = p.kernel_pid or p.pid
            chain = [start, *procfs.ancestors(procfs_root, start, SERVER_ANCESTOR_DEPTH)]
            owners.update(by_pid[pid] for pid in chain if pid in by_pid)
        if len(owners) != 1:
            continue
        (server,) = owners
        assert server.pid is not None
        origin = loopback_origin(procfs_root, server.pid)
        if origin is not None:
            out[c.kernel_id] = replace(server, origin=origin)
    return out


def pod_server(pod: PodInfo, server: ServerRef, default_port: int = 8888) -> ServerRef | None:
    """The server running in ``pod`` (KubeSpawner) with its direct address: the pod's IP and its ``notebook-port``
    (else ``default_port``); None when the pod has no IP yet."""
    if not pod.ip:
        return None
    port = dict(pod.ports).get(SERVER_PORT_NAME, default_port)
    origin = safe_origin(f"http://[{pod.ip}]:{port}" if ":" in pod.ip else f"http://{pod.ip}:{port}")
    return replace(server, origin=origin) if origin is not None else None


def loopback_origin(procfs_root: str, pid: int) -> str | None:
    """``http://127.0.0.1:<port>`` when process ``pid`` shares our network namespace and listens on exactly one
    loopback (or any-address) port; None otherwise. Reads /proc."""
    if not procfs.same_network_namespace(procfs_root, pid):
        log.debug("server process is in another network namespace; not contacted", pid=pid)
        return None
    try:
        listening = procfs.listening_addresses(procfs_root, pid)
    except procfs.ProcfsError as exc:
        log.debug("server process sockets unreadable", pid=pid, error=str(exc))
        return None
    any_address = {"0.0.0.0": "127.0.0.1", "::": "::1"}
    ports = {
        (any_address.get(ip, ip), port)
        for ip, port in listening
        if ip in any_address or ip.startswith("127.") or ip == "::1"
    }
    if len({port for _, port in ports}) != 1:
        log.debug("server process does not listen on exactly one loopback port", pid=pid, ports=sorted(ports))
        return None
    ip, port = sorted(ports)[0]
    return safe_origin(f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}")
