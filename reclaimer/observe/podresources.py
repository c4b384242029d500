"""kubelet pod-resources v1 over gRPC on a unix socket: which GPUs each pod's containers were allocated.

Synchronous (callers use ``asyncio.to_thread``). Any failure raises ``PodResourcesUnavailable``, which callers
treat as "allocation unknown" (never as "no allocations").
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence

import grpc
import structlog

from reclaimer.core.errors import ReclaimerError
from reclaimer.core.model import PodGpuAllocation
from reclaimer.observe._podresources_pb import api_pb2, api_pb2_grpc

log = structlog.get_logger(__name__)

DEFAULT_RESOURCE_NAMES: tuple[str, ...] = ("nvidia.com/gpu", "nvidia.com/mig-*")
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the kubelet's own cap for pod-resources responses
_OLD_STYLE_MIG = re.compile(r"^MIG-(GPU-[^/]+)/\d+/\d+$")  # drivers < 470: MIG-GPU-<uuid>/<gi>/<ci>

_unresolved_logged: set[str] = set()
_unresolved_lock = threading.Lock()


class PodResourcesUnavailable(ReclaimerError):
    """The kubelet pod-resources API could not be asked; the message is a one-line cause."""


def resource_matches(resource_name: str, patterns: Iterable[str]) -> bool:
    """Exact match, or prefix match for a pattern ending in ``*`` (``nvidia.com/mig-*``)."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if resource_name.startswith(pattern[:-1]):
                return True
        elif resource_name == pattern:
            return True
    return False


def gpu_uuid_for(device_id: str, mig_parents: Mapping[str, str] | None = None) -> str:
    """The parent GPU uuid for a device id as the device plugin reports it.

    ``GPU-abc::3`` (time-slicing replica) -> ``GPU-abc``; ``MIG-x`` -> ``mig_parents[MIG-x]``; an old-style
    ``MIG-GPU-abc/1/0`` -> ``GPU-abc``. Anything unresolvable is returned as is (logged once): an id that names
    no sampled GPU is "unknown" downstream, never idle.
    """
    base = device_id.split("::", 1)[0]
    if base.startswith("GPU-"):
        return base
    if base.startswith("MIG-"):
        parent = (mig_parents or {}).get(base)
        if parent:
            return parent
        old = _OLD_STYLE_MIG.match(base)
        if old:
            return old.group(1)
    _log_unresolved_once(base)
    return base


def _log_unresolved_once(device_id: str) -> None:
    with _unresolved_lock:
        if device_id in _unresolved_logged:
            return
        _unresolved_logged.add(device_id)
    log.warning("device id not resolved to a GPU uuid; kept as is", device_id=device_id)


def allocations_from_response(
    response: api_pb2.ListPodResourcesResponse,
    mig_parents: Mapping[str, str] | None = None,
    resource_names: Sequence[str] = DEFAULT_RESOURCE_NAMES,
) -> list[PodGpuAllocation]:
    """One ``PodGpuAllocation`` per container holding at least one matching device; uuids deduplicated in order."""
    out: list[PodGpuAllocation] = []
    for pod in response.pod_resources:
        for container in pod.containers:
            device_ids: list[str] = []
            for dev in container.devices:
                if resource_matches(dev.resource_name, resource_names):
                    device_ids.extend(dev.device_ids)
            if not device_ids:
                continue
            uuids = tuple(dict.fromkeys(gpu_uuid_for(d, mig_parents) for d in device_ids))
            out.append(PodGpuAllocation(pod.namespace, pod.name, container.name, uuids, tuple(device_ids)))
    return out


def _check_socket(socket_path: str) -> None:
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        raise PodResourcesUnavailable(
            f"pod-resources socket {socket_path} does not exist (is /var/lib/kubelet/pod-resources mounted?)"
        ) from None
    except OSError as exc:
        raise PodResourcesUnavailable(f"pod-resources socket {socket_path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise PodResourcesUnavailable(f"pod-resources socket {socket_path} is not a unix socket")


def list_gpu_allocations(
    socket_path: str,
    timeout: float = 2.0,
    mig_parents: Mapping[str, str] | None = None,
    resource_names: Sequence[str] = DEFAULT_RESOURCE_NAMES,
) -> list[PodGpuAllocation]:
    """Ask the kubelet (``List``) which GPUs every pod's containers hold.

    Returns within about ``timeout`` seconds or raises ``PodResourcesUnavailable`` (missing socket, kubelet not
    answering, any gRPC error).
    """
    _check_socket(socket_path)
    target = "unix://" + os.path.abspath(socket_path)
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        try:
            response = stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = (exc.details() if hasattr(exc, "details") else None) or ""
            cause = {
                "UNAVAILABLE": "kubelet not reachable",
                "DEADLINE_EXCEEDED": f"kubelet did not answer within {timeout:g}s",
            }.get(name, "kubelet refused the request")
            raise PodResourcesUnavailable(
                f"pod-resources List on {socket_path}: {cause} ({name}: {' '.join(details.split())[:200]})"
            ) from None
    return allocations_from_response(response, mig_parents, resource_names)
