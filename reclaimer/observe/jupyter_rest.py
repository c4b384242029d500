"""The Jupyter Server REST client shared by the gateway, hub and Kubeflow adapters: one safe endpoint (token header,
no redirects, capped bodies, timeouts, bounded concurrency), TLS, and the parsing of kernel models and timestamps."""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import structlog
import yarl

from reclaimer.core.errors import StartupError
from reclaimer.core.kernelids import is_kernel_id
from reclaimer.core.model import KernelActivity
from reclaimer.observe.tokens import TokenSource

log = structlog.get_logger(__name__)

LIST_BODY_LIMIT = 4 * 1024 * 1024  # a listing of thousands of kernels stays far below this
KERNEL_BODY_LIMIT = 256 * 1024
ERROR_BODY_LIMIT = 16 * 1024  # error pages are read only for a short message
MAX_CONCURRENCY = 8
SHUTDOWN_TIMEOUT_FACTOR = 3  # a graceful kernel shutdown waits for the kernel to exit; give it longer than a GET
MAX_STATE_LENGTH = 32

_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
    r"\s*(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)


SessionFactory = Callable[[], aiohttp.ClientSession]


# --------------------------------------------------------------------------- pure parsing


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
    year, month, day, hour, minute, second, fraction, _zulu, sign, off_h, off_m = m.groups()
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


# --------------------------------------------------------------------------- TLS


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

        async def once(with_token: str | None) -> HttpAnswer:
            return await self._request_once(
                method, path, limit=limit, timeout=timeout, params=params, accept=accept, token=with_token, body=body
            )

        answer = await once(token if token is not None else (source.current() if source else None))
        if source is None:
            return answer
        if self._refusal(answer):
            if source.reread():
                answer = await once(source.current())
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
