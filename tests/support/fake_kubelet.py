"""A real grpcio server on a unix socket implementing kubelet pod-resources v1 ``List``.

    with FakeKubelet(tmp_path / "kubelet.sock") as kubelet:
        kubelet.pods = [pod("nb-alice", "jhub", {"notebook": [("nvidia.com/gpu", ["GPU-a"])]})]
        list_gpu_allocations(str(kubelet.socket_path))
        kubelet.hang()       # List blocks until released (or the server stops): the client's deadline must fire
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from reclaimer.observe._podresources_pb import api_pb2, api_pb2_grpc

Devices = Sequence[tuple[str, Sequence[str]]]  # (resource_name, device_ids)


def pod(name: str, namespace: str, containers: Mapping[str, Devices]) -> api_pb2.PodResources:
    """A PodResources message: ``containers`` maps container name -> [(resource_name, [device ids])]."""
    return api_pb2.PodResources(
        name=name,
        namespace=namespace,
        containers=[
            api_pb2.ContainerResources(
                name=cname,
                devices=[api_pb2.ContainerDevices(resource_name=r, device_ids=list(ids)) for r, ids in devices],
            )
            for cname, devices in containers.items()
        ],
    )


class _Lister(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, owner: FakeKubelet) -> None:
        self.owner = owner

    def List(self, request: api_pb2.ListPodResourcesRequest, context: Any) -> api_pb2.ListPodResourcesResponse:
        self.owner.calls += 1
        if self.owner._hanging.is_set():
            self.owner.hung.set()
            self.owner._release.wait()
        if self.owner.fail_with is not None:
            context.abort(self.owner.fail_with, "scripted failure")
        return api_pb2.ListPodResourcesResponse(pod_resources=list(self.owner.pods))


class FakeKubelet:
    """PodResourcesLister v1 served by grpcio on ``socket_path`` (a context manager)."""

    def __init__(self, socket_path: str | Path) -> None:
        self.socket_path = Path(socket_path)
        self.pods: list[api_pb2.PodResources] = []
        self.fail_with: grpc.StatusCode | None = None
        self.calls = 0
        self.hung = threading.Event()  # set once a List call is being held
        self._hanging = threading.Event()
        self._release = threading.Event()
        self._server: grpc.Server | None = None

    def hang(self) -> None:
        """Hold every List call until the server stops (a kubelet that accepts but never answers)."""
        self._hanging.set()

    def start(self) -> FakeKubelet:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Lister(self), self._server)
        if self._server.add_insecure_port(f"unix://{self.socket_path}") == 0:
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
