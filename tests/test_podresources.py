"""reclaimer.observe.podresources against a real grpcio PodResourcesLister on a unix socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from reclaimer.observe import podresources
from reclaimer.core.model import PodGpuAllocation
from reclaimer.observe.podresources import PodResourcesUnavailable, gpu_uuid_for, list_gpu_allocations, resource_matches
from tests.support.fake_kubelet import FakeKubelet, pod

MIG_PARENTS = {"MIG-11111111-2222-3333-4444-555555555555": "GPU-parent-a"}


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[FakeKubelet]:
    with FakeKubelet(tmp_path / "kubelet.sock") as k:
        yield k


@pytest.mark.parametrize(
    ("device_id", "expected"),
    [
        pytest.param("GPU-abc", "GPU-abc", id="gpu-uuid"),
        pytest.param("GPU-abc::3", "GPU-abc", id="time-slicing-suffix"),
        pytest.param("MIG-11111111-2222-3333-4444-555555555555", "GPU-parent-a", id="mig-known"),
        pytest.param("MIG-11111111-2222-3333-4444-555555555555::1", "GPU-parent-a", id="mig-time-sliced"),
        pytest.param("MIG-GPU-def/1/0", "GPU-def", id="mig-old-style"),
        pytest.param("MIG-99999999-0000-0000-0000-000000000000", "MIG-99999999-0000-0000-0000-000000000000",
                     id="mig-unknown-kept"),
        pytest.param("0", "0", id="index-strategy-kept"),
    ],
)
def test_gpu_uuid_for(device_id: str, expected: str) -> None:
    assert gpu_uuid_for(device_id, MIG_PARENTS) == expected


@pytest.mark.parametrize(
    ("resource", "matches"),
    [
        pytest.param("nvidia.com/gpu", True, id="whole-gpu"),
        pytest.param("nvidia.com/mig-1g.10gb", True, id="mig-prefix"),
        pytest.param("nvidia.com/gpu.shared", False, id="renamed-shared-not-default"),
        pytest.param("example.com/fpga", False, id="other-vendor"),
        pytest.param("nvidia.com/gpu2", False, id="exact-not-prefix"),
    ],
)
def test_resource_matches_defaults(resource: str, matches: bool) -> None:
    assert resource_matches(resource, podresources.DEFAULT_RESOURCE_NAMES) is matches


def test_unknown_mig_is_logged_once() -> None:
    mig = "MIG-deadbeef-0000-0000-0000-000000000001"
    podresources._unresolved_logged.discard(mig)
    with capture_logs() as logs:
        gpu_uuid_for(mig)
        gpu_uuid_for(mig + "::2")
    assert [e["device_id"] for e in logs if e.get("device_id") == mig] == [mig]


def test_lists_gpu_allocations_from_the_kubelet(kubelet: FakeKubelet) -> None:
    kubelet.pods = [
        pod("nb-alice", "jhub", {"notebook": [("nvidia.com/gpu", ["GPU-a", "GPU-b"])]}),
        pod("nb-bob", "jhub", {
            "notebook": [("nvidia.com/gpu", ["GPU-c::0", "GPU-c::1"])],  # two time-slicing replicas of one GPU
            "sidecar": [],
        }),
        pod("mig-user", "research", {"main": [("nvidia.com/mig-1g.10gb", list(MIG_PARENTS))]}),
        pod("cpu-only", "default", {"app": [("example.com/fpga", ["fpga-0"])]}),
        pod("mixed", "default", {"c": [("example.com/fpga", ["fpga-1"]), ("nvidia.com/gpu", ["GPU-d"])]}),
    ]
    got = list_gpu_allocations(str(kubelet.socket_path), mig_parents=MIG_PARENTS)
    assert got == [
        PodGpuAllocation("jhub", "nb-alice", "notebook", ("GPU-a", "GPU-b"), ("GPU-a", "GPU-b")),
        PodGpuAllocation("jhub", "nb-bob", "notebook", ("GPU-c",), ("GPU-c::0", "GPU-c::1")),
        PodGpuAllocation("research", "mig-user", "main", ("GPU-parent-a",), tuple(MIG_PARENTS)),
        PodGpuAllocation("default", "mixed", "c", ("GPU-d",), ("GPU-d",)),
    ]
    assert kubelet.calls == 1


def test_custom_resource_names(kubelet: FakeKubelet) -> None:
    kubelet.pods = [pod("nb", "jhub", {"nb": [("nvidia.com/gpu.shared", ["GPU-a::2"])]})]
    assert list_gpu_allocations(str(kubelet.socket_path)) == []
    got = list_gpu_allocations(str(kubelet.socket_path), resource_names=("nvidia.com/gpu*",))
    assert [a.gpu_uuids for a in got] == [("GPU-a",)]


def test_no_pods_is_an_empty_list_not_an_error(kubelet: FakeKubelet) -> None:
    assert list_gpu_allocations(str(kubelet.socket_path)) == []


def test_missing_socket_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "kubelet.sock"
    with pytest.raises(PodResourcesUnavailable, match=r"nope/kubelet\.sock does not exist"):
        list_gpu_allocations(str(path))


def test_a_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "kubelet.sock"
    path.write_text("")
    with pytest.raises(PodResourcesUnavailable, match="not a unix socket"):
        list_gpu_allocations(str(path))


def test_stale_socket_without_a_kubelet_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "kubelet.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the socket file stays, nobody listens: connection refused
    with pytest.raises(PodResourcesUnavailable, match="UNAVAILABLE"):
        list_gpu_allocations(str(path), timeout=5.0)


@pytest.mark.timeout(20)
def test_kubelet_that_never_answers_hits_the_deadline(kubelet: FakeKubelet) -> None:
    kubelet.hang()
    with pytest.raises(PodResourcesUnavailable, match="DEADLINE_EXCEEDED") as err:
        list_gpu_allocations(str(kubelet.socket_path), timeout=0.3)
    assert "did not answer within 0.3s" in str(err.value)
    assert kubelet.hung.is_set()  # the request did reach the server: it was the answer that never came


@pytest.mark.timeout(20)
def test_listener_that_never_speaks_grpc_hits_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "kubelet.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)  # connections queue in the backlog; nothing ever reads or writes
        with pytest.raises(PodResourcesUnavailable, match="DEADLINE_EXCEEDED|UNAVAILABLE"):
            list_gpu_allocations(str(path), timeout=0.3)


@pytest.mark.parametrize(
    "code",
    [pytest.param(grpc.StatusCode.PERMISSION_DENIED, id="permission-denied"),
     pytest.param(grpc.StatusCode.INTERNAL, id="internal"),
     pytest.param(grpc.StatusCode.UNAVAILABLE, id="unavailable")],
)
def test_grpc_errors_become_unavailable(kubelet: FakeKubelet, code: grpc.StatusCode) -> None:
    kubelet.fail_with = code
    with pytest.raises(PodResourcesUnavailable, match=code.name):
        list_gpu_allocations(str(kubelet.socket_path))
