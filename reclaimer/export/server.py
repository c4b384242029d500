"""The HTTP edge: ``/metrics``, ``/healthz``, ``/readyz``, ``/report`` and an index, as an aiohttp app.

Handlers only read what the daemon already built (the snapshot, the loops' heartbeats): nothing here waits on
a gateway, the API server or the GPU. Liveness never depends on a dependency.

``/metrics`` and ``/report`` name kernel ids, users and pods (and on a gateway without auth a kernel id is enough
to run code in that kernel), so they can require a bearer token (``listen_token_file``). ``/healthz`` and
``/readyz`` stay open: the kubelet probes them and cannot send a token read from a Secret, and neither names a
kernel, user or pod (readiness lists component states and configured gateway names only).
"""

from __future__ import annotations

import hmac
import html
import time
from typing import Any, Protocol

import structlog
from aiohttp import web

from reclaimer.core.model import CycleSnapshot
from reclaimer.export.metrics import Metrics
from reclaimer.export.report import build_report, render_json
from reclaimer.observe.tokens import TokenError, TokenSource, read_bearer_token_file

log = structlog.get_logger(__name__)

ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/metrics", "Prometheus metrics"),
    ("/healthz", "liveness: 200 while the daemon's own loops tick"),
    ("/readyz", "readiness: 200 once the first sample and observation are in (JSON details)"),
    ("/report", "the current report (JSON, same schema as `reclaimer report -o json`)"),
)


class DaemonView(Protocol):
    """What the HTTP server may ask the daemon. Every method returns at once (no I/O)."""

    def snapshot(self) -> CycleSnapshot | None: ...

    def health(self, now: float) -> tuple[bool, str]: ...  # loops ticking? liveness NEVER depends on dependencies

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]: ...  # first sample and observation in; by component


PROTECTED_PATHS = frozenset({"/metrics", "/report"})  # what names kernels, users and pods
REALM = "gpu-reclaimer"
# The API server's pod proxy authenticates the caller and drops Authorization before proxying: `reclaimer report
# --cluster` sends the daemon token in this header instead (the same token, the same constant-time check).
PROXY_TOKEN_HEADER = "X-Reclaimer-Token"


# ``listen_token_file`` problems are TokenErrors (StartupErrors): the message names the file, never the value.
TokenFileError = TokenError


def _token_where(path: str) -> str:
    return f"listen_token_file {path}"


def _read_token_file(path: str) -> str:
    return read_bearer_token_file(path, _token_where(path))


class BearerToken:
    """The token ``/metrics`` and ``/report`` require, from a file (a mounted Secret), re-read when it changes.

    The same re-reading as every other token file (tokens.TokenSource): the file's identity (inode, size, mtime) is
    checked on each request and a changed file is read again, so a rotated Secret takes effect without a restart; a
    file that becomes unreadable keeps the last good token and logs once; there is never a moment without a token.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # At start-up an unusable file is fatal, with its name.
        self._source = TokenSource("listen_token_file", file=path, where=_token_where(path), bearer=True)

    def current(self) -> str:
        return self._source.current()

    def accepts(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (``Bearer <token>``), compared in constant time."""
        if not header:
            return False
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.current().encode("utf-8"))


VIEW_KEY: web.AppKey[DaemonView] = web.AppKey("reclaimer_view", DaemonView)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("reclaimer_metrics", Metrics)
TOKEN_KEY: web.AppKey[BearerToken | None] = web.AppKey("reclaimer_token")


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    ok, reason = request.app[VIEW_KEY].health(time.time())
    if ok:
        return web.Response(text="ok\n")
    log.warning("liveness failing", reason=reason)
    return web.Response(status=503, text=f"{reason}\n")


async def _readyz(request: web.Request) -> web.Response:
    ready, details = request.app[VIEW_KEY].readiness(time.time())
    return web.json_response({"ready": ready, "components": details}, status=200 if ready else 503)


async def _report(request: web.Request) -> web.Response:
    snap = request.app[VIEW_KEY].snapshot()
    if snap is None:
        return web.json_response(
            {"error": "no decision cycle has completed yet; retry after the first decide interval"}, status=503
        )
    return web.Response(text=render_json(build_report(snap), indent=None), content_type="application/json")


async def _index(request: web.Request) -> web.Response:
    items = "".join(f'<li><a href="{path}">{path}</a> — {html.escape(what)}</li>' for path, what in ENDPOINTS)
    page = (
        "<!doctype html><html><head><title>gpu-reclaimer</title></head>"
        f"<body><h1>gpu-reclaimer</h1><ul>{items}</ul></body></html>\n"
    )
    return web.Response(text=page, content_type="text/html")


@web.middleware
async def _errors_as_500(request: web.Request, handler: Any) -> web.StreamResponse:
    """A bug in a handler answers a short 500 and one log line, never a traceback to the client."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("HTTP handler failed", path=request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}"}, status=500)


@web.middleware
async def _bearer_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 for ``/metrics`` and ``/report`` without the token, when one is configured. The answer says nothing else."""
    token = request.app[TOKEN_KEY]
    if token is None or request.path not in PROTECTED_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization")
    proxied = request.headers.get(PROXY_TOKEN_HEADER)
    if token.accepts(header) or (proxied is not None and token.accepts(f"Bearer {proxied}")):
        return await handler(request)
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if header else "")
    return web.json_response(
        {"error": "unauthorized: send Authorization: Bearer <token>"},
        status=401,
        headers={"WWW-Authenticate": challenge},
    )


def make_app(view: DaemonView, metrics: Metrics, token: BearerToken | None = None) -> web.Application:
    """The aiohttp application serving ``view`` and ``metrics`` (GET and HEAD on every endpoint).

    With ``token``, ``/metrics`` and ``/report`` need ``Authorization: Bearer <token>``; the rest stays open.
    """
    app = web.Application(middlewares=[_errors_as_500, _bearer_auth])
    app[VIEW_KEY] = view
    app[METRICS_KEY] = metrics
    app[TOKEN_KEY] = token
    app.router.add_get("/", _index)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/report", _report)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app`` on host:port (port 0: any free port; see ``runner.addresses``).

    Returns the started runner; the caller stops it with ``await runner.cleanup()``. No access log: Prometheus
    scrapes every few seconds and each line would say nothing new.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("http server listening", addresses=[f"{a[0]}:{a[1]}" for a in runner.addresses])
    return runner
