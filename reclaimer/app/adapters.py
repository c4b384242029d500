"""The edges one node's daemon talks to (GPU, gateways, hub, Kubernetes, kubelet, Kubeflow), opened from Settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from reclaimer.core.config import Settings
from reclaimer.core.errors import StartupError
from reclaimer.core.model import PodGpuAllocation
from reclaimer.observe.sampler import GpuBackend, open_backend

log = structlog.get_logger(__name__)


@dataclass
class Adapters:
    """The edges the daemon talks to; any of them may be missing (no Kubernetes, no hub, no gateways)."""

    backend: GpuBackend
    gateways: Any | None = None  # gateway.GatewayPool
    hub: Any | None = None  # hub.HubClient
    kube: Any | None = None  # kube.KubeClient
    pods: Any | None = None  # kube.PodCache
    pod_resources: Callable[[], Sequence[PodGpuAllocation]] | None = None
    notebooks: Any | None = None  # kubeflow.NotebookServers


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

        try:
            adapters.kube = KubeClient.from_settings(k, node_name=settings.node_name)
        except KubeUnavailable as exc:
            if k.enabled is True:
                raise StartupError(f"kubernetes.enabled is true but no cluster config was found: {exc}") from None
            log.info("kubernetes not configured; running without pod metadata", cause=str(exc))
        if adapters.kube is not None:
            from reclaimer.observe.podresources import list_gpu_allocations

            adapters.pods = PodCache(adapters.kube, settings.node_name, k)
            adapters.pod_resources = lambda: list_gpu_allocations(
                k.pod_resources_socket, timeout=min(2.0, k.timeout), mig_parents=backend.mig_parents()
            )
    return adapters
