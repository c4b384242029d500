"""Observe kernels through Jupyter Server REST: Jupyter Server, Kernel Gateway, Enterprise Gateway.

Every failure is an answer with ``error`` set (unknown, never idle), never an exception. Safety rules, all enforced
here: the token travels only in the ``Authorization`` header and is never logged or repr'd; only the configured base
URL is contacted (redirects are refused); kernel ids are canonical UUIDs before any URL is built from them; bodies
are read with a size cap; every request has a connect and total timeout; concurrency per gateway is bounded.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
import yarl

from reclaimer.core.config import GatewaySettings
from reclaimer.core.errors import StartupError
from reclaimer.core.model import KernelActivity

log = structlog.get_logger(__name__)

LIST_BODY_LIMIT = 4 * 1024 * 1024  # a listing of thousands of kernels stays far below this
KERNEL_BODY_LIMIT = 256 * 1024
ERROR_BODY_LIMIT = 16 * 1024  # error pages are read only for a short message
MAX_CONCURRENCY = 8
SHUTDOWN_TIMEOUT_FACTOR = 3  # a graceful kernel shutdown waits for the kernel to exit; give it longer than a GET
MAX_STATE_LENGTH = 32
KNOWN_KERNELS_LIMIT = 10_000  # kernel -> gateway cache entries kept (LRU)

NOT_KNOWN_ANYWHERE = "no configured gateway knows this kernel"
CONFLICTING_GATEWAYS = "conflicting sources: several gateways answer for this kernel id"
POSSIBLE_SECOND_GATEWAY = "cannot rule out a second gateway serving it"


def claimed_by_a_gateway(activity: KernelActivity | None) -> bool:
    """Whether a configured gateway claimed the kernel (alone, or with others: a conflict). Such a kernel is never
    looked up through another source (the hub, a notebook server): a conflict is not settled by a third answer."""
    if activity is None:
        return False
    return activity.error is None or CONFLICTING_GATEWAYS in activity.error or POSSIBLE_SECOND_GATEWAY in activity.error


_KERNEL_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
    r"\s*(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)

OnRequest = Callable[[str, float], None]
SessionFactory = Callable[[], aiohttp.ClientSession]


class TokenError(StartupError):
    """A configured token source is unusable. The message names the source, never the value."""


# --------------------------------------------------------------------------- pure parsing


def is_kernel_id(value: object) -> bool:
    """True for a canonical lowercase UUID (``8-4-4-4-12`` hex), the only form a URL is ever built from."""
    return isinstance(value, str) and _KERNEL_ID_RE.fullmatch(value) is not None


def parse_last_activity(value: object) -> datetime | None:
    """An ISO-8601 timestamp as an aware UTC datetime; None for anything unparsable.

    Accepts a fraction of up to 9 digits (truncated to microseconds), ``Z`` or ``+HH:MM``/``-HHMM`` offsets, and
    treats a naive timestamp as UTC.
    """
    if not isinstance(value, str) or len(value) > 64:
        return None
    m = _TIMESTAMP_RE.fullmatch(value.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = m.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        offset = timedelta(0)
        if sign:
            if int(off_h) > 23 or int(off_m) > 59:
                return None
            offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (1 if sign == "+" else -1)
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=timezone(offset)
        )
        return local.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def answer_clock_skew(answer: HttpAnswer, received_at: float) -> float | None:
    """The answering server's clock minus ours when its answer arrived (invariant 19); None without a Date header."""
    return None if answer.date is None else answer.date - received_at


class BadAnswer(Exception):
    """A gateway's answer that cannot be trusted as a whole (not a kernel model, not a listing)."""


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header (RFC 9110 IMF-fixdate, always GMT) as POSIX seconds; None when absent or unparsable."""
    if not value or len(value) > 64:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # RFC 850 / asctime forms are GMT too
    return moment.timestamp()


def _has_zone(value: object) -> bool:
    m = _TIMESTAMP_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    return m is not None and (m.group(8) is not None or m.group(9) is not None)


def parse_kernel_model(
    model: object, gateway: str, observed_at: float, clock_skew: float | None = None
) -> KernelActivity:
    """One kernel model (``{"id", "name", "execution_state", "last_activity", "connections"}``) as an activity.

    Raises BadAnswer when it is not an object with a canonical ``id`` (there is no kernel to attach an error to).
    Any other missing or ill-typed field gives the activity an ``error``; the fields that did parse are kept.
    """
    if not isinstance(model, dict):
        raise BadAnswer(f"expected a kernel object, got {_type_name(model)}")
    kernel_id = model.get("id")
    if not is_kernel_id(kernel_id):
        raise BadAnswer("kernel object without a canonical 'id'")
    problems: list[str] = []
    name = model.get("name")
    if name is not None and not isinstance(name, str):
        problems.append(f"'name' must be a string, got {_type_name(name)}")
        name = None
    state = model.get("execution_state")
    if not isinstance(state, str) or not state or len(state) > MAX_STATE_LENGTH:
        problems.append("'execution_state' missing" if state is None else "'execution_state' is not a short string")
        state = None
    raw_activity = model.get("last_activity")
    last_activity = parse_last_activity(raw_activity)
    if last_activity is None:
        problems.append("'last_activity' missing" if raw_activity is None else "'last_activity' is not a timestamp")
    elif not _has_zone(raw_activity):
        # Invariant 19: naive local time west of UTC would make the kernel look idle for hours longer than it is.
        problems.append("'last_activity' has no time zone (local time could shorten the idle window)")
    connections = model.get("connections")
    if connections is not None and (type(connections) is not int or connections < 0):
        problems.append(f"'connections' must be a non-negative integer, got {_type_name(connections)}")
        connections = None
    return KernelActivity(
        kernel_id=str(kernel_id),
        gateway=gateway,
        observed_at=observed_at,
        kernel_name=name,
        execution_state=state,
        last_activity=last_activity,
        connections=connections,
        error="; ".join(problems) or None,
        clock_skew=clock_skew,
    )


def parse_kernel_listing(
    body: object, gateway: str, observed_at: float, clock_skew: float | None = None
) -> list[KernelActivity]:
    """A ``GET /api/kernels`` body as activities. Raises BadAnswer unless it is a list of kernel objects with
    distinct canonical ids: a garbled listing is unknown as a whole, never "no kernels"."""
    if not isinstance(body, list):
        raise BadAnswer(f"expected a list of kernels, got {_type_name(body)}")
    out = [parse_kernel_model(item, gateway, observed_at, clock_skew) for item in body]
    if len({a.kernel_id for a in out}) != len(out):
        raise BadAnswer("listing names the same kernel twice")
    return out


# --------------------------------------------------------------------------- tokens and TLS


def _check_token(token: str, where: str, bearer: bool = False) -> str:
    token = token.strip()
    if not token:
        raise TokenError(f"{where} is empty")
    if bearer and (not (token.isascii() and token.isprintable()) or " " in token):
        raise TokenError(f"{where} holds characters a bearer token cannot have")
    if not token.isprintable() or not token.isascii():
        # A newline would let the value inject a second header.
        raise TokenError(f"{where} holds characters that cannot go in an HTTP header")
    return token


def _read_token_file(path: str, where: str, bearer: bool = False) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return _check_token(fh.read(64 * 1024), where, bearer)
    except OSError as exc:
        raise TokenError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise TokenError(f"{where} is not UTF-8 text") from None


def read_bearer_token_file(path: str, where: str) -> str:
    """A token we accept (``listen_token_file``), read once: as a token file, and without spaces."""
    return _read_token_file(path, where, bearer=True)


class TokenSource:
    """A token from an environment variable (fixed for the process's life) or a file (a mounted Secret, a projected
    service-account token), re-read when the file changes.

    ``current()`` stats the file (inode, size, mtime: one syscall) and reads it again only when that changed; a file
    that becomes unreadable or empty keeps the last good token (a Secret update swaps a symlink) and logs once.
    ``reread()`` is the 401 path: read again now, say whether the value changed. ``rejected`` is set (with the
    reason, never the value) when the server refused the token and re-reading did not help; it clears once a request
    with the token is accepted again.
    """

    def __init__(
        self,
        owner: str,
        *,
        env: str | None = None,
        file: str | None = None,
        value: str | None = None,
        where: str | None = None,
        bearer: bool = False,
    ):
        if sum(x is not None for x in (env, file, value)) != 1:
            raise ValueError("a token source is exactly one of env, file or value")
        self.owner = owner
        self.file = file
        self._bearer = bearer  # a token we accept (listen_token_file): no spaces, as `Bearer <token>` splits on them
        self.rejected: str | None = None
        self.rereads = 0  # times the file was read again because it changed or a request was refused
        self._stamp: tuple[int, int, int] | None = None
        self._failing = False
        if env is not None:
            self.where = f"{owner}: environment variable {env}"
            raw = os.environ.get(env)
            if raw is None:
                raise TokenError(f"{self.where} is not set")
            self._token = _check_token(raw, self.where)
        elif file is not None:
            self.where = where or f"{owner}: token file {file}"
            self._stamp = self._stat()
            self._token = _read_token_file(file, self.where, bearer)
        else:
            self.where = f"{owner}: token"
            self._token = _check_token(str(value), self.where)

    @classmethod
    def from_settings(cls, token_env: str | None, token_file: str | None, owner: str) -> TokenSource | None:
        if token_env:
            return cls(owner, env=token_env)
        if token_file:
            return cls(owner, file=token_file)
        return None

    def __repr__(self) -> str:
        return f"TokenSource({self.where!r})"

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> str:
        """The token now (the file is read again when it changed since the last read)."""
        if self.file is not None:
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._load(stamp)
        return self._token

    def reread(self) -> bool:
        """Read the file again now (after a 401); True when the token changed. Always False for env and values."""
        if self.file is None:
            return False
        before = self._token
        self._load(self._stat())
        return self._token != before

    def _load(self, stamp: tuple[int, int, int] | None) -> None:
        assert self.file is not None
        try:
            token = _read_token_file(self.file, self.where, self._bearer)
        except TokenError as exc:
            if not self._failing:
                log.warning("token file unusable; keeping the last good token", owner=self.owner, error=str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("token file usable again", owner=self.owner, file=self.file)
        self._failing = False
        self._stamp = stamp
        if token != self._token:
            self.rereads += 1
            log.info("token file changed; using the new token", owner=self.owner, file=self.file)
        self._token = token

    def accepted(self) -> None:
        if self.rejected is not None:
            log.info("token accepted again", owner=self.owner)
        self.rejected = None

    def refused(self, status: int) -> None:
        reason = f"{self.where} was refused (HTTP {status})" + (
            " and re-reading the file did not help"
            if self.file is not None
            else "; an environment token cannot be re-read: restart with a valid one"
        )
        if self.rejected != reason:
            log.error("credential refused; actions halted until it is accepted", owner=self.owner, reason=reason)
        self.rejected = reason


def tls_context(url: str, ca_file: str | None, verify_tls: bool, owner: str) -> ssl.SSLContext | None:
    """The TLS context for an https URL (None for http): verified against ``ca_file`` or the system store."""
    if not url.lower().startswith("https://"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"{owner}: ca_file {ca_file} cannot be used: {exc}") from None
    if not verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning("TLS verification disabled by configuration", target=owner)
    return ctx


# --------------------------------------------------------------------------- one safe HTTP endpoint


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What one request got: ``status`` None when no HTTP answer came back; ``error`` None when ``body`` is usable."""

    status: int | None
    body: Any = None
    error: str | None = None
    date: float | None = None  # the answer's HTTP Date header (POSIX seconds); None: absent or unparsable

    @property
    def message(self) -> str:
        """The server's own short error message (``{"message": ...}``), for details; "" when there is none."""
        if isinstance(self.body, dict) and isinstance(self.body.get("message"), str):
            return "".join(ch for ch in self.body["message"][:200] if ch.isprintable())
        return ""


class _TooLarge(Exception):
    pass


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise _TooLarge
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise _TooLarge
    return bytes(buf)


def _describe_connect_error(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"


class RestEndpoint:
    """Requests to one configured base URL, with the header token, caps, timeouts and a concurrency bound."""

    def __init__(
        self,
        name: str,
        base_url: str,
        token: str | TokenSource | None,
        *,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        concurrency: int = MAX_CONCURRENCY,
        session_factory: SessionFactory | None = None,
        on_request: Callable[[float], None] | None = None,
        untracked: bool = False,
        refusal: Callable[[HttpAnswer], bool] | None = None,
    ):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # A plain string is a fixed token (tests, the demo); a TokenSource follows its file and handles 401s.
        self.token_source = TokenSource(name, value=token) if isinstance(token, str) else token
        # Jupyter servers count every authenticated API request as user activity unless it carries
        # ``no_track_activity`` (jupyter_server APIHandler.update_api_activity): watching is not using.
        self._untracked = untracked
        # How this server says "that token is not valid" (401 by default; JupyterHub answers 403 with a message).
        self._refusal = refusal or (lambda answer: answer.status == 401)
        self._tls = tls
        self._concurrency = concurrency
        self._session_factory = session_factory
        self._on_request = on_request
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"RestEndpoint(name={self.name!r}, base_url={self.base_url!r})"

    def _client_session(self) -> aiohttp.ClientSession:
        # Created on first use: the daemon builds its adapters before the event loop runs.
        if self._session is None or self._session.closed:
            if self._session_factory is not None:
                self._session = self._session_factory()
            else:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(
                        ssl=self._tls if self._tls is not None else True, limit=self._concurrency
                    ),
                    cookie_jar=aiohttp.DummyCookieJar(),
                )
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._concurrency)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        limit: int,
        timeout: float | None = None,
        params: Mapping[str, str] | None = None,
        accept: str = "application/json",
        token: str | None = None,
        body: Any = None,
    ) -> HttpAnswer:
        """``method`` on base URL + ``path`` (already quoted). Never raises for a network or protocol failure.

        ``token`` replaces the endpoint's own token for this request. A 401 for the endpoint's token re-reads its file
        once and retries when the token changed; a 401 that stays marks the token ``rejected``.
        """
        source = self.token_source if token is None else None
        answer = await self._request_once(
            method,
            path,
            limit=limit,
            timeout=timeout,
            params=params,
            accept=accept,
            token=token if token is not None else (source.current() if source else None),
            body=body,
        )
        if source is None:
            return answer
        if self._refusal(answer):
            if source.reread():
                answer = await self._request_once(
                    method,
                    path,
                    limit=limit,
                    timeout=timeout,
                    params=params,
                    accept=accept,
                    token=source.current(),
                    body=body,
                )
            if self._refusal(answer):
                source.refused(answer.status or 0)
                return answer
        if answer.status is not None and answer.status != 403 and answer.status < 500:
            source.accepted()
        return answer

    async def _request_once(
        self,
        method: str,
        path: str,
        *,
        limit: int,
        timeout: float | None,
        params: Mapping[str, str] | None,
        accept: str,
        token: str | None,
        body: Any,
    ) -> HttpAnswer:
        session = self._client_session()
        assert self._semaphore is not None
        seconds = timeout or self.timeout
        url = yarl.URL(self.base_url + path, encoded=True)
        query = dict(params or {})
        if self._untracked:
            query["no_track_activity"] = "1"
        if query:
            url = url.with_query(query)
        headers = {"Accept": accept}
        if token is not None:
            headers["Authorization"] = f"token {token}"
        async with self._semaphore:
            started = time.perf_counter()

            async def exchange() -> HttpAnswer:
                async with session.request(
                    method,
                    url,
                    headers=headers,
                    allow_redirects=False,
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=seconds, connect=seconds),
                ) as resp:
                    return await self._answer(resp, limit)

            try:
                return await asyncio.wait_for(exchange(), seconds)
            except (TimeoutError, asyncio.TimeoutError):  # distinct types before Python 3.11
                return HttpAnswer(None, error=f"timed out after {seconds:g}s")
            except aiohttp.ClientSSLError as exc:
                return HttpAnswer(None, error=f"TLS error: {type(exc).__name__}")
            except aiohttp.ClientConnectorError as exc:
                return HttpAnswer(None, error=_describe_connect_error(exc))
            except aiohttp.ClientPayloadError:
                return HttpAnswer(None, error="truncated response body")
            except (aiohttp.ClientError, OSError) as exc:
                return HttpAnswer(None, error=f"request failed: {type(exc).__name__}")
            finally:
                self._report(time.perf_counter() - started)

    def _report(self, seconds: float) -> None:
        if self._on_request is None:
            return
        try:
            self._on_request(seconds)
        except Exception as exc:  # a metrics hook must never turn an answer into a failure
            log.warning("request hook failed", target=self.name, error=repr(exc))

    async def _answer(self, resp: aiohttp.ClientResponse, limit: int) -> HttpAnswer:
        status = resp.status
        if 300 <= status < 400:
            return HttpAnswer(status, error=f"redirect refused (HTTP {status})")
        if status == 204:
            return HttpAnswer(status)
        ok = 200 <= status < 300
        try:
            raw = await _read_capped(resp, limit if ok else ERROR_BODY_LIMIT)
        except _TooLarge:
            if ok:
                return HttpAnswer(status, error=f"response body over {limit} bytes")
            return HttpAnswer(status, error=f"HTTP {status}")
        try:
            body = json.loads(raw) if raw else None
            parsed = True
        except (ValueError, RecursionError):
            body, parsed = None, False
        if not ok:
            return HttpAnswer(status, body, f"HTTP {status}")
        if not parsed:
            if "html" in (resp.content_type or ""):
                return HttpAnswer(status, error=f"answered an HTML page, not JSON (HTTP {status})")
            return HttpAnswer(status, error=f"answer is not valid JSON (HTTP {status})")
        return HttpAnswer(status, body, date=http_date(resp.headers.get("Date")))

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


# --------------------------------------------------------------------------- one gateway


@dataclass(frozen=True, slots=True)
class KernelLookup:
    """One gateway's answer about one kernel. ``found``: the gateway serves this kernel (its data may still carry an
    error); ``not_found``: the gateway said 404, so another gateway may serve it; neither: the answer is unknown."""

    activity: KernelActivity
    found: bool = False
    not_found: bool = False
    unreachable: bool = False  # no HTTP answer at all (refused, timed out, TLS)


@dataclass(frozen=True, slots=True)
class KernelListing:
    """``kernels`` None: unknown. ``forbidden``: the gateway refuses listings (KG/EG default), so ask per kernel."""

    kernels: list[KernelActivity] | None
    error: str | None = None
    forbidden: bool = False


class GatewayClient:
    """One configured gateway. Methods never raise for the gateway's failures; ``up`` says whether the last request
    got a usable answer (None before the first)."""

    def __init__(
        self,
        settings: GatewaySettings,
        session_factory: SessionFactory | None = None,
        on_request: OnRequest | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.name = settings.name
        self.on_request = on_request
        self.up: bool | None = None
        self.last_request_at: float | None = None
        self._clock = clock
        owner = f"gateway {settings.name!r}"
        self._http = RestEndpoint(
            settings.name,
            settings.url,
            TokenSource.from_settings(settings.token_env, settings.token_file, owner),
            timeout=settings.timeout,
            tls=tls_context(settings.url, settings.ca_file, settings.verify_tls, owner),
            session_factory=session_factory,
            on_request=self._hook,
            untracked=True,
        )
        self._log = log.bind(gateway=settings.name)

    def __repr__(self) -> str:
        return f"GatewayClient(name={self.name!r}, url={self.settings.url!r})"

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    @property
    def credential(self) -> TokenSource | None:
        """This gateway's token source (its ``rejected`` says whether the gateway refused it)."""
        return self._http.token_source

    def _hook(self, seconds: float) -> None:
        self.last_request_at = self._clock()
        if self.on_request is not None:
            self.on_request(self.name, seconds)

    async def probe(self) -> bool:
        """``GET /api`` (the server's version: cheap, no kernel data), so ``up`` stays meaningful on a node whose
        GPUs hold no kernel of this gateway. True when the gateway answered usably."""
        answer = await self._http.request("GET", "/api", limit=ERROR_BODY_LIMIT)
        ok = answer.error is None and isinstance(answer.body, dict)
        self._mark(ok, answer.error or (None if ok else "unexpected answer to GET /api"))
        return ok

    def _mark(self, usable: bool, error: str | None) -> None:
        if usable != self.up:
            if usable:
                self._log.info("gateway answering", was=self.up)
            else:
                self._log.warning("gateway not answering usably", error=error)
        self.up = usable

    def unknown_activity(self, kernel_id: str, error: str) -> KernelActivity:
        return KernelActivity(kernel_id, self.name, self._clock(), error=error)

    async def lookup_kernel(self, kernel_id: str) -> KernelLookup:
        """``GET /api/kernels/{id}``; a 404 is ``not_found`` (another gateway may serve the kernel)."""
        if not is_kernel_id(kernel_id):
            refused = "not a canonical kernel id; no request made"
            return KernelLookup(self.unknown_activity(str(kernel_id)[:100], refused))
        answer = await self._http.request("GET", "/api/kernels/" + quote(kernel_id, safe=""), limit=KERNEL_BODY_LIMIT)
        now = self._clock()
        if answer.status == 404:
            self._mark(True, None)
            return KernelLookup(self.unknown_activity(kernel_id, "not found"), not_found=True)
        if answer.error is not None:
            self._mark(False, answer.error)
            return KernelLookup(self.unknown_activity(kernel_id, answer.error), unreachable=answer.status is None)
        try:
            activity = parse_kernel_model(answer.body, self.name, now, answer_clock_skew(answer, now))
        except BadAnswer as exc:
            self._mark(False, str(exc))
            return KernelLookup(self.unknown_activity(kernel_id, str(exc)))
        if activity.kernel_id != kernel_id:
            self._mark(False, "answer for another kernel")
            return KernelLookup(self.unknown_activity(kernel_id, "the gateway answered for another kernel id"))
        self._mark(activity.error is None, activity.error)
        return KernelLookup(activity, found=True)

    async def get_kernel(self, kernel_id: str) -> KernelActivity:
        """The kernel's activity; ``error`` is set on any failure ("not found" for a 404)."""
        return (await self.lookup_kernel(kernel_id)).activity

    async def listing(self) -> KernelListing:
        """``GET /api/kernels`` with the reason when it is unknown (``forbidden``: listing is switched off)."""
        answer = await self._http.request("GET", "/api/kernels", limit=LIST_BODY_LIMIT)
        if answer.status in (403, 404, 405):
            self._mark(True, None)
            return KernelListing(None, f"listing refused (HTTP {answer.status})", forbidden=True)
        if answer.error is not None:
            self._mark(False, answer.error)
            return KernelListing(None, answer.error)
        try:
            now = self._clock()
            kernels = parse_kernel_listing(answer.body, self.name, now, answer_clock_skew(answer, now))
        except BadAnswer as exc:
            self._mark(False, str(exc))
            return KernelListing(None, str(exc))
        self._mark(True, None)
        return KernelListing(kernels)

    async def list_kernels(self) -> list[KernelActivity] | None:
        """Every kernel the gateway lists; None when unknown (403 — listing off —, error, or a garbled body)."""
        return (await self.listing()).kernels

    async def shutdown_kernel(self, kernel_id: str) -> tuple[str, str]:
        """``DELETE /api/kernels/{id}``: ("success" | "already-gone" | "failed", detail)."""
        if not is_kernel_id(kernel_id):
            return "failed", "not a canonical kernel id; no request made"
        answer = await self._http.request(
            "DELETE",
            "/api/kernels/" + quote(kernel_id, safe=""),
            limit=ERROR_BODY_LIMIT,
            timeout=self.timeout * SHUTDOWN_TIMEOUT_FACTOR,
        )
        if answer.status == 404:
            self._mark(True, None)
            return "already-gone", f"gateway {self.name} no longer has the kernel"
        if answer.error is not None or answer.status not in (200, 202, 204):
            error = answer.error or f"unexpected HTTP {answer.status}"
            self._mark(False, error)
            detail = f"{error}: {answer.message}" if answer.message else error
            return "failed", f"gateway {self.name}: {detail}"
        self._mark(True, None)
        return "success", f"kernel shut down through gateway {self.name}"

    async def close(self) -> None:
        await self._http.close()


# --------------------------------------------------------------------------- all gateways


@dataclass(slots=True)
class _Absent:
    """A kernel every configured gateway said it does not know: not asked again before ``retry_at``."""

    retry_at: float
    delay: float
    seen_at: float  # last time an ``observe`` asked about it; stale entries are dropped


class GatewayPool:
    """Observe the kernels that hold GPUs here across every configured gateway.

    Only per-kernel requests (``GET /api/kernels/{id}``), never listings: a kernel whose gateway is known is asked
    there; a kernel new to this node is asked of every gateway at once (a 404 means "not here"), so discovery costs
    one small GET per gateway whatever the number of kernels a gateway holds, and works where listing is refused
    (the Kernel Gateway / Enterprise Gateway default). An id is a canonical UUID before any URL is built from it.

    Two gateways answering for one kernel id (e.g. a Jupyter Server with ``--gateway-url`` and the Enterprise Gateway
    behind it) is a conflict: the kernel is unknown, with the reason, and no "home" gateway is remembered from it.
    ``observe(..., confirm=True)`` (the re-check right before acting) asks every gateway again, so a conflict that
    arose after discovery is seen before anything is done.

    Gateways are asked concurrently, each within its own timeout, so one slow gateway never delays the others. A
    kernel that every gateway said it does not know (e.g. one of a JupyterHub user server) is not asked for again
    until a retry time (``absent_retry`` seconds, doubling up to ``absent_retry_max``); until then it is unknown,
    never idle. Errors and timeouts are not "absent": those kernels are asked again next time.
    """

    def __init__(
        self,
        clients: Sequence[GatewayClient],
        clock: Callable[[], float] = time.time,
        absent_retry: float = 60.0,
        absent_retry_max: float = 900.0,
    ):
        names = [c.name for c in clients]
        if len(set(names)) != len(names):
            raise ValueError(f"gateway names must be unique: {names}")
        if not 0 < absent_retry <= absent_retry_max:
            raise ValueError(f"need 0 < absent_retry <= absent_retry_max, got {absent_retry} and {absent_retry_max}")
        self.clients: list[GatewayClient] = list(clients)
        self._clock = clock
        self._known: OrderedDict[str, GatewayClient] = OrderedDict()  # least recently asked first
        self._known_at: dict[str, float] = {}  # kernel id -> when an observe last asked about it
        self.absent_retry = absent_retry
        self.absent_retry_max = absent_retry_max
        self._absent: OrderedDict[str, _Absent] = OrderedDict()  # oldest ``seen_at`` first

    def client_for(self, kernel_id: str) -> GatewayClient | None:
        """The gateway last seen serving ``kernel_id`` alone (None when unknown or in conflict)."""
        return self._known.get(kernel_id)

    def gateway_up(self) -> dict[str, bool | None]:
        return {c.name: c.up for c in self.clients}

    def _remember(self, kernel_id: str, client: GatewayClient) -> None:
        self._known[kernel_id] = client
        self._known.move_to_end(kernel_id)
        self._known_at.setdefault(kernel_id, self._clock())
        while len(self._known) > KNOWN_KERNELS_LIMIT:
            self._forget(next(iter(self._known)))

    def _forget(self, kernel_id: str) -> None:
        self._known.pop(kernel_id, None)
        self._known_at.pop(kernel_id, None)

    def _age_out_homes(self, asked: Iterable[str], now: float) -> None:
        """Homes follow what is live: a kernel no ``observe`` asked about for ``absent_retry_max`` is forgotten."""
        for kid in asked:
            if kid in self._known:
                self._known_at[kid] = now
                self._known.move_to_end(kid)
        while self._known:
            kid = next(iter(self._known))
            if now - self._known_at.get(kid, now) <= self.absent_retry_max:
                break
            self._forget(kid)

    def tracked(self) -> dict[str, int]:
        """Sizes of the per-kernel caches (for the soak and the bounds tests)."""
        return {"homes": len(self._known), "absent": len(self._absent)}

    async def observe(self, kernel_ids: Iterable[str], *, confirm: bool = False) -> dict[str, KernelActivity]:
        """One activity per requested kernel id; ``error`` set where the answer is unknown.

        ``confirm``: ask every gateway about every kernel (no cached home, no backoff), as discovery does; used right
        before acting, so that two gateways answering for one id is never missed.
        """
        wanted = list(dict.fromkeys(kernel_ids))
        now = self._clock()
        out: dict[str, KernelActivity] = {}
        valid: list[str] = []
        for kid in wanted:
            if is_kernel_id(kid):
                valid.append(kid)
            else:
                out[kid] = KernelActivity(str(kid), "", now, error="not a canonical kernel id; no request made")
        self._age_out_homes(valid, now)
        # Taken before awaiting: a concurrent observe (a re-check) may change the cache meanwhile.
        homes = {k: (None if confirm else self._known.get(k)) for k in valid}
        backed_off = {} if confirm else self._backed_off([k for k in valid if homes[k] is None], now)
        out.update(backed_off)
        asked = [k for k in valid if k not in backed_off]
        unknown = [k for k in asked if homes[k] is None]
        per_client = {c: [k for k in asked if homes[k] is c] + unknown for c in self.clients}
        answers = await asyncio.gather(*(self._ask(c, per_client[c]) for c in self.clients))
        by_client = dict(zip(self.clients, answers))
        for kid in asked:
            home = homes[kid]
            if home is not None:
                out[kid] = self._settle_cached(kid, home, by_client[home][kid])
            else:
                replies = [(c, by_client[c][kid]) for c in self.clients]
                out[kid] = self._settle_unknown(kid, replies, now)
                self._note_absence(kid, replies, now)
        return {k: out[k] for k in wanted}

    def _backed_off(self, unknown: list[str], now: float) -> dict[str, KernelActivity]:
        """Answers (unknown, no request) for the kernels still within their absence backoff; drops stale entries."""
        out: dict[str, KernelActivity] = {}
        for kid in unknown:
            entry = self._absent.get(kid)
            if entry is None:
                continue
            entry.seen_at = now
            self._absent.move_to_end(kid)
            if now < entry.retry_at:
                error = f"{NOT_KNOWN_ANYWHERE} (next check in {math.ceil(entry.retry_at - now)}s)"
                out[kid] = KernelActivity(kid, "", now, error=error)
        # Ordered by seen_at: a kernel no longer on this node's GPUs ages out from the front.
        while self._absent:
            kid, entry = next(iter(self._absent.items()))
            if now - entry.seen_at <= self.absent_retry_max and len(self._absent) <= KNOWN_KERNELS_LIMIT:
                break
            del self._absent[kid]
        return out

    def _note_absence(self, kid: str, answers: list[tuple[GatewayClient, KernelLookup]], now: float) -> None:
        """Back off a kernel every gateway said it does not know; forget it once served. Errors change nothing."""
        if any(a.found for _, a in answers):
            self._absent.pop(kid, None)
        elif all(a.not_found for _, a in answers):
            previous = self._absent.pop(kid, None)
            delay = min(previous.delay * 2, self.absent_retry_max) if previous else self.absent_retry
            self._absent[kid] = _Absent(retry_at=now + delay, delay=delay, seen_at=now)
            log.debug("no gateway knows kernel; backing off", kernel_id=kid, retry_in=delay)

    def _settle_cached(self, kid: str, home: GatewayClient, found: KernelLookup) -> KernelActivity:
        if found.not_found:
            # The gateway lost the kernel: rediscover next time; unknown (not idle) until then.
            self._forget(kid)
            return _identity_only(found.activity, f"gateway {home.name} no longer knows this kernel")
        if found.found:
            self._remember(kid, home)
        return found.activity

    def _settle_unknown(
        self, kid: str, answers: list[tuple[GatewayClient, KernelLookup]], now: float
    ) -> KernelActivity:
        served = [(c, a) for c, a in answers if a.found]
        if len(served) > 1:
            # Invariant 14: two sources for one kernel (a Jupyter Server proxying to an EG, or two gateways sharing
            # a kernel id) may disagree about its state; which one a shutdown would reach is a guess. Unknown.
            self._forget(kid)
            names = [c.name for c, _ in served]
            log.warning("kernel answered by several gateways; unknown", kernel_id=kid, gateways=names)
            return KernelActivity(kid, "", now, error=f"{CONFLICTING_GATEWAYS}: {', '.join(names)}")
        if served:
            client, lookup = served[0]
            failed = [(c, a) for c, a in answers if not a.found and not a.not_found]
            if failed:
                # Another gateway could not say whether it serves this kernel too: no home from a partial answer.
                self._forget(kid)
                detail = "; ".join(f"{c.name}: {a.activity.error}" for c, a in failed)
                return KernelActivity(
                    kid,
                    client.name,
                    now,
                    error=f"served by gateway {client.name}, but {POSSIBLE_SECOND_GATEWAY} ({detail})",
                )
            self._remember(kid, client)
            return lookup.activity
        failed = [(c, a) for c, a in answers if not a.not_found]
        if failed:
            detail = "; ".join(f"{c.name}: {a.activity.error}" for c, a in failed)
            return KernelActivity(kid, failed[0][0].name if len(failed) == 1 else "", now, error=detail)
        return KernelActivity(kid, "", now, error=NOT_KNOWN_ANYWHERE)

    async def _ask(self, client: GatewayClient, kids: list[str]) -> dict[str, KernelLookup]:
        """This gateway's answers (per-kernel GETs), all within the gateway's own timeout. Once a request gets no
        answer at all, the kernels not yet asked are left unknown rather than queued behind more timeouts."""
        got: dict[str, KernelLookup] = {}
        broken: list[str] = []
        pending = iter(kids)  # shared by the workers: each kernel is taken once

        async def worker() -> None:
            for kid in pending:
                if broken:
                    got[kid] = KernelLookup(client.unknown_activity(kid, f"not asked: gateway {broken[0]}"))
                    continue
                got[kid] = lookup = await client.lookup_kernel(kid)
                if lookup.unreachable:
                    broken.append(str(lookup.activity.error))

        if kids:
            # A little over the request timeout, so a request's own timeout (the clearer error) fires first. Not
            # wait_for(gather(...)): when the caller is cancelled mid-wait, that leaves the gather's exception
            # unretrieved ("_GatheringFuture exception was never retrieved"). Every worker's outcome is collected.
            workers = [asyncio.ensure_future(worker()) for _ in range(min(MAX_CONCURRENCY, len(kids)))]
            try:
                await asyncio.wait(workers, timeout=client.timeout + 0.25)
            finally:
                for w in workers:
                    w.add_done_callback(_retrieve)
                    w.cancel()
        for kid in kids:
            if kid not in got:
                late = f"gateway did not answer within {client.timeout:g}s"
                got[kid] = KernelLookup(client.unknown_activity(kid, late))
        return got

    async def listing(self, name: str) -> KernelListing:
        """Every kernel the gateway called ``name`` lists: the whole target of an evict-pod when the kernel's pod runs
        that server (e.g. a Jupyter Server in a pod configured as a gateway). Unknown (kernels None) when refused."""
        client = next((c for c in self.clients if c.name == name), None)
        if client is None:
            return KernelListing(None, f"no configured gateway named {name!r}")
        return await client.listing()

    async def probe_quiet(self, older_than: float) -> None:
        """Probe each gateway not contacted for ``older_than`` seconds, concurrently (see ``GatewayClient.probe``)."""
        now = self._clock()
        # A gateway that refused its token is asked every time: its token file may have been fixed since.
        quiet = [
            c
            for c in self.clients
            if c.last_request_at is None
            or now - c.last_request_at >= older_than
            or (c.credential is not None and c.credential.rejected is not None)
        ]
        await asyncio.gather(*(c.probe() for c in quiet))

    async def shutdown(self, kernel_id: str) -> tuple[str, str]:
        """Shut the kernel down through the gateway that serves it: (result, detail) as ``shutdown_kernel``."""
        if not is_kernel_id(kernel_id):
            return "failed", "not a canonical kernel id; no request made"
        client = self.client_for(kernel_id)
        if client is None:
            seen = (await self.observe([kernel_id]))[kernel_id]
            client = self.client_for(kernel_id)
            if client is None:
                # Not "already-gone": a kernel no gateway ever served here (e.g. one seen only through the hub)
                # is still running, and saying otherwise would report a reclaim that did not happen.
                return "failed", f"cannot tell which gateway serves the kernel: {seen.error}"
        result, detail = await client.shutdown_kernel(kernel_id)
        if result in ("success", "already-gone"):
            self._forget(kernel_id)
        log.info("kernel shutdown", kernel_id=kernel_id, gateway=client.name, result=result, detail=detail)
        return result, detail

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Collect a finished worker's outcome so none is left unretrieved; a failure is a bug worth a line."""
    if not task.cancelled() and task.exception() is not None:
        log.error("gateway worker failed", error=repr(task.exception()))


def _identity_only(activity: KernelActivity, error: str) -> KernelActivity:
    """The same kernel with only its identity kept and ``error`` set (unknown)."""
    return KernelActivity(activity.kernel_id, activity.gateway, activity.observed_at, error=error)
