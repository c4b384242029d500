"""The JupyterHub fallback of one node: the hub's server listing (cached) and the kernels of the servers it names.

Why here (app/) and not in observe/hub.py: the hub client (observe.hub.HubClient, typed here as the ``Hub`` role
of app.adapters) is one adapter and speaks only to the hub; the fallback
combines it with what the gateways answered (a kernel no configured gateway claims, invariant 14), with /proc (which
server process a kernel runs under, on the procfs stage's thread) and with the decide interval. Composing adapters is
the application's job; the adapters stay independent of one another (import-linter independence contract).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import structlog

from reclaimer.app.adapters import Hub
from reclaimer.core import candidates as join_mod
from reclaimer.core.config import Settings
from reclaimer.core.model import KernelActivity, ServerRef
from reclaimer.observe.gateway import claimed_by_a_gateway
from reclaimer.observe.hub import locate_servers
from reclaimer.observe.stall import StageWorker

log = structlog.get_logger(__name__)
MAX_CACHED_SERVERS = 20_000  # a larger hub listing is used for the cycle but not kept


def describe(exc: BaseException, what: str = "call", timeout: float | None = None) -> str:
    """What failed, in words: a timeout names what timed out and after how long (``str(TimeoutError())`` is "")."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"{what} did not finish within {timeout:g}s" if timeout is not None else f"{what} timed out"
    return str(exc) or f"{what} failed: {type(exc).__name__}"


class HubFallback:
    """What the hub tells one node's decide cycles: its user servers, and the kernels of those servers.

    ``ok`` is whether the last listing worked (None: never asked); ``error`` says why the listing is unknown this
    cycle (None: listed, or not asked). Both show in ``/readyz`` and in the candidates' reasons.
    """

    def __init__(
        self,
        hub: Hub,
        settings: Settings,
        *,
        clock: Callable[[], float],
        timeout: float,
        procfs: StageWorker,
    ) -> None:
        assert settings.hub is not None
        self.hub = hub
        self.settings = settings
        self.clock = clock
        self.timeout = timeout  # every hub call, shorter than the decide interval
        self.procfs = procfs  # /proc reads locating a kernel's server run on this stage's thread
        self.ok: bool | None = None
        self.error: str | None = None
        self._servers: list[ServerRef] | None = None  # the hub's last listing (bounded: MAX_CACHED_SERVERS)
        self._listed_at: float | None = None

    async def servers(self, wanted: bool, missing: frozenset[tuple[str, str]] = frozenset()) -> list[ServerRef] | None:
        """The hub's user servers, asked only when a candidate needs them, from a listing at most ``hub.cache_ttl``
        old; a server a candidate names that the cached listing lacks makes one fresh listing (at most one per decide
        interval). A failed or partial listing leaves no cache and is None: unknown, never "no servers"
        (``error`` says why). Each server keeps the time it was listed (``listed_at``)."""
        if not wanted:
            return []
        assert self.settings.hub is not None
        now = self.clock()
        age = now - self._listed_at if self._listed_at is not None else math.inf
        cached = self._servers
        if cached is not None and age < self.settings.hub.cache_ttl:
            known = {(s.user, s.server_name) for s in cached}
            if not (missing - known) or age < self.settings.decide_interval:
                return list(cached)
        try:
            servers = await asyncio.wait_for(self.hub.list_servers(), self.timeout)
            self.ok = servers is not None
            self.error = None if servers is not None else "the hub did not answer every page usably"
        except Exception as exc:
            self.ok = False
            servers = None
            self.error = f"hub listing failed: {type(exc).__name__}"
            log.warning("hub unavailable", error=describe(exc, "hub server list", self.timeout))
        if servers is None or len(servers) > MAX_CACHED_SERVERS:
            self._servers, self._listed_at = None, None
            return None if servers is None else list(servers)
        self._servers, self._listed_at = list(servers), now
        return list(servers)

    async def server_kernels(self, server: ServerRef) -> list[KernelActivity] | None:
        """Every kernel of one user server (through the hub); None when it could not be listed."""
        try:
            got = await asyncio.wait_for(self.hub.server_kernels(server), self.timeout)
            return list(got) if got is not None else None
        except Exception as exc:
            log.warning(
                "hub kernel listing failed",
                user=server.user,
                server_name=server.server_name,
                error=describe(exc, "hub kernel listing", self.timeout),
            )
            return None

    async def kernels(
        self,
        result: join_mod.JoinResult,
        activities: dict[str, KernelActivity],
        servers: list[ServerRef],
        listings: dict[tuple[str, str], list[KernelActivity] | None],
    ) -> dict[str, ServerRef]:
        """Kernels of JupyterHub user servers are observed in their server when no configured gateway knows them.

        Each kernel's server is located exactly (``hub.locate_servers``) and listed directly with a token that opens
        only that server. Returns the server of each kernel found (with its direct address), and puts its activity
        into ``activities``; every listing made lands in ``listings`` (the whole target of a stop-server / evict-pod).
        """
        assert self.settings.hub is not None
        missing = [
            c
            for c in result.candidates
            if c.kernel_id
            and (activities.get(c.kernel_id) is None or activities[c.kernel_id].error)
            and not claimed_by_a_gateway(activities.get(c.kernel_id))
        ]  # invariant 14: no third source
        if not missing:
            return {}
        try:
            located = await self.procfs.call(
                locate_servers,
                missing,
                servers,
                self.settings.procfs_root,
                self.settings.hub.server_port,
                timeout=self.timeout,
                what="/proc reads locating user servers",
            )
        except Exception as exc:
            log.warning("cannot locate the servers of hub kernels", error=describe(exc))
            return {}
        wanted = {(s.user, s.server_name, s.origin): s for s in located.values()}

        async def listed(server: ServerRef) -> tuple[ServerRef, list[KernelActivity] | None]:
            return server, await self.server_kernels(server)

        found: dict[str, ServerRef] = {}
        for server, kernels in await asyncio.gather(*(listed(s) for s in wanted.values())):
            listings[(server.user, server.server_name)] = kernels
            for ka in kernels or ():
                if located.get(ka.kernel_id) == server:
                    activities[ka.kernel_id] = ka
                    found[ka.kernel_id] = server
        return found
