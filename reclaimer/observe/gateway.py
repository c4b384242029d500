"""Observe kernels through Jupyter Server REST: Jupyter Server, Kernel Gateway, Enterprise Gateway.

Every failure is an answer with ``error`` set (unknown, never idle), never an exception. Safety rules, enforced by
``jupyter_rest.RestEndpoint`` and here: the token travels only in the ``Authorization`` header and is never logged or
repr'd; only the configured base URL is contacted (redirects are refused); kernel ids are canonical UUIDs before any
URL is built from them; bodies are read with a size cap; every request has a connect and total timeout; concurrency
per gateway is bounded.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog

from reclaimer.core.config import GatewaySettings
from reclaimer.core.kernelids import is_kernel_id
from reclaimer.core.model import KernelActivity
from reclaimer.core.results import ALREADY_GONE, DONE, FAILED, SUCCESS, AdapterOutcome
from reclaimer.observe.jupyter_rest import (
    ERROR_BODY_LIMIT,
    KERNEL_BODY_LIMIT,
    LIST_BODY_LIMIT,
    MAX_CONCURRENCY,
    SHUTDOWN_TIMEOUT_FACTOR,
    BadAnswer,
    RestEndpoint,
    SessionFactory,
    answer_clock_skew,
    parse_kernel_listing,
    parse_kernel_model,
    tls_context,
)
from reclaimer.observe.tokens import TokenSource

log = structlog.get_logger(__name__)

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


OnRequest = Callable[[str, float], None]


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

    async def shutdown_kernel(self, kernel_id: str) -> AdapterOutcome:
        """``DELETE /api/kernels/{id}``: ("success" | "already-gone" | "failed", detail)."""
        if not is_kernel_id(kernel_id):
            return FAILED, "not a canonical kernel id; no request made"
        answer = await self._http.request(
            "DELETE",
            "/api/kernels/" + quote(kernel_id, safe=""),
            limit=ERROR_BODY_LIMIT,
            timeout=self.timeout * SHUTDOWN_TIMEOUT_FACTOR,
        )
        if answer.status == 404:
            self._mark(True, None)
            return ALREADY_GONE, f"gateway {self.name} no longer has the kernel"
        if answer.error is not None or answer.status not in (200, 202, 204):
            error = answer.error or f"unexpected HTTP {answer.status}"
            self._mark(False, error)
            detail = f"{error}: {answer.message}" if answer.message else error
            return FAILED, f"gateway {self.name}: {detail}"
        self._mark(True, None)
        return SUCCESS, f"kernel shut down through gateway {self.name}"

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
        by_client = dict(zip(self.clients, answers, strict=True))
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

    async def shutdown(self, kernel_id: str) -> AdapterOutcome:
        """Shut the kernel down through the gateway that serves it: (result, detail) as ``shutdown_kernel``."""
        if not is_kernel_id(kernel_id):
            return FAILED, "not a canonical kernel id; no request made"
        client = self.client_for(kernel_id)
        if client is None:
            seen = (await self.observe([kernel_id]))[kernel_id]
            client = self.client_for(kernel_id)
            if client is None:
                # Not "already-gone": a kernel no gateway ever served here (e.g. one seen only through the hub)
                # is still running, and saying otherwise would report a reclaim that did not happen.
                return FAILED, f"cannot tell which gateway serves the kernel: {seen.error}"
        result, detail = await client.shutdown_kernel(kernel_id)
        if result in DONE:
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
