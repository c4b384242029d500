"""The edges one node's daemon talks to (GPU, gateways, hub, Kubernetes, kubelet, Kubeflow), opened from Settings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from reclaimer.core.config import Settings
from reclaimer.core.errors import StartupError
from reclaimer.core.model import KernelActivity, NotebookRef, PodGpuAllocation, PodInfo, ServerRef
from reclaimer.core.results import AdapterOutcome
from reclaimer.observe.sampler import GpuBackend, open_backend

if TYPE_CHECKING:
    from reclaimer.observe.gateway import KernelListing, OnRequest
    from reclaimer.observe.kube import EvictionResult

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------------- what the daemon needs of each edge
# One Protocol per role, met by the real adapter (named in each docstring) and by any stand-in a test or a bench
# passes. The executor (act.actions) is handed the same objects.


class Credential(Protocol):
    """A token the daemon presents (observe.gateway.TokenSource)."""

    @property
    def rejected(self) -> str | None:
        """Why the other side refused it even after re-reading it (None: not refused); actions halt meanwhile."""


class Gateway(Protocol):
    """One configured Jupyter gateway (observe.gateway.GatewayClient)."""

    on_request: OnRequest | None  # (gateway name, seconds) of every request, for the request-duration histogram

    @property
    def name(self) -> str: ...

    @property
    def credential(self) -> Credential | None: ...


class Gateways(Protocol):
    """Every configured gateway together (observe.gateway.GatewayPool)."""

    @property
    def clients(self) -> Sequence[Gateway]: ...

    async def probe_quiet(self, older_than: float) -> None: ...

    async def observe(self, kernel_ids: Iterable[str], *, confirm: bool = False) -> dict[str, KernelActivity]: ...

    async def listing(self, name: str) -> KernelListing: ...

    def gateway_up(self) -> dict[str, bool | None]: ...

    async def shutdown(self, kernel_id: str) -> AdapterOutcome: ...

    async def close(self) -> None: ...


class Hub(Protocol):
    """JupyterHub's REST API and the user servers it names (observe.hub.HubClient)."""

    @property
    def credential(self) -> Credential | None: ...

    async def list_servers(self) -> list[ServerRef] | None: ...

    async def user_servers(self, user: str) -> list[ServerRef] | None: ...

    async def server_kernels(self, server: ServerRef) -> list[KernelActivity] | None: ...

    async def stop_server(self, user: str, server_name: str = "") -> AdapterOutcome: ...

    async def shutdown_server_kernel(self, server: ServerRef, kernel_id: str) -> AdapterOutcome: ...

    async def close(self) -> None: ...


class Kube(Protocol):
    """The Kubernetes API: read one pod, evict, stop a Kubeflow notebook, create Events (observe.kube.KubeClient)."""

    @property
    def rejected(self) -> str | None: ...  # why the API server refused the service-account token (None: it did not)

    def get_pod(self, namespace: str, name: str) -> PodInfo | None: ...

    def evict(self, namespace: str, name: str, uid: str, dry_run: bool = False) -> EvictionResult: ...

    def stop_notebook(self, namespace: str, name: str, now: float | None = None) -> AdapterOutcome: ...

    def create_event(self, pod: PodInfo, *, reason: str, action: str, note: str, type: str = "Normal") -> bool: ...


class Pods(Protocol):
    """The pods on this node, listed from the API server at most every resync interval (observe.kube.PodCache)."""

    @property
    def up(self) -> bool: ...  # the latest refresh succeeded

    @property
    def last_success_at(self) -> float | None: ...

    def refresh_if_due(self, now: float | None = None) -> bool: ...

    def pods(self) -> tuple[PodInfo, ...]: ...

    def kernel_ids(self) -> dict[str, str]: ...  # pod uid -> the kernel id its labels name


class PodResources(Protocol):
    """The kubelet's GPU allocation per pod (observe.podresources.list_gpu_allocations, bound to the socket)."""

    def __call__(self) -> Sequence[PodGpuAllocation]: ...


class Notebooks(Protocol):
    """Kubeflow notebook servers' kernels (observe.kubeflow.NotebookServers)."""

    @property
    def credential(self) -> Credential | None: ...

    async def kernels(self, namespace: str, name: str) -> NotebookRef: ...

    async def shutdown_kernel(self, namespace: str, name: str, kernel_id: str) -> AdapterOutcome: ...

    async def prune(self, live: Iterable[tuple[str, str]]) -> None: ...

    async def close(self) -> None: ...


@dataclass
class Adapters:
    """The edges the daemon talks to; any of them may be missing (no Kubernetes, no hub, no gateways)."""

    backend: GpuBackend
    gateways: Gateways | None = None
    hub: Hub | None = None
    kube: Kube | None = None
    pods: Pods | None = None
    pod_resources: PodResources | None = None
    notebooks: Notebooks | None = None


def build_adapters(settings: Settings, backend: GpuBackend | None = None) -> Adapters:
    """Open every configured edge. A missing optional dependency (Kubernetes with enabled: auto) is logged, not
    fatal."""
    from reclaimer.observe.gateway import GatewayClient, GatewayPool

    if backend is None:
        backend = open_backend(settings.gpu)
    adapters = Adapters(backend=backend)
    if settings.gateways:
        adapters.gateways = GatewayPool([GatewayClient(g) for g in settings.gateways])
    if settings.hub is not None:
        from reclaimer.observe.hub import HubClient

        adapters.hub = HubClient(settings.hub)
    if settings.kubeflow is not None:
        from reclaimer.observe.kubeflow import NotebookServers

        adapters.notebooks = NotebookServers(settings.kubeflow)
    k = settings.kubernetes
    if k.enabled is not False:
        from reclaimer.observe.kube import KubeClient, KubeUnavailable, PodCache

        kube: KubeClient | None = None
        try:
            kube = KubeClient.from_settings(k, node_name=settings.node_name)
        except KubeUnavailable as exc:
            if k.enabled is True:
                raise StartupError(f"kubernetes.enabled is true but no cluster config was found: {exc}") from None
            log.info("kubernetes not configured; running without pod metadata", cause=str(exc))
        if kube is not None:
            from reclaimer.observe.podresources import list_gpu_allocations

            adapters.kube = kube
            adapters.pods = PodCache(kube, settings.node_name, k)
            adapters.pod_resources = lambda: list_gpu_allocations(
                k.pod_resources_socket, timeout=min(2.0, k.timeout), mig_parents=backend.mig_parents()
            )
    return adapters
