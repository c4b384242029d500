"""GPU process -> pod -> kernel attribution over fake /proc trees, and over the real /proc with a real kernel."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.multikernelmanager import MultiKernelManager
from structlog.testing import capture_logs

from reclaimer.observe.attribution import Attributor
from reclaimer.core.model import AttributedProcess, ProcessSample
from reclaimer.observe.procfs import INITIAL_PID_NAMESPACE
from tests.support.procfs_fixtures import (
    OTHER_PID_NAMESPACE,
    SECRET,
    FakeProc,
    kernel_cmdline,
    kill_if_same,
    pod_cgroup,
    real_starttime,
    recording_opens,
)
from tests.support.e2e import e2e_fixture

K1 = "0e1b5f4a-9c3d-4b2e-8f7a-6d5c4b3a2f1e"
K2 = "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d"
POD_A = "55c6c714-b240-4dec-9a45-57b61696ab6e"
POD_B = "adcfbb42-ec24-48ae-a259-f756c8d1f046"
CID_A = "a" * 64
CID_A2 = "c" * 64
CID_B = "b" * 64
GPU0 = "GPU-00000000-1111-2222-3333-444444444444"
GPU1 = "GPU-55555555-6666-7777-8888-999999999999"
SHIM = ["/usr/bin/containerd-shim-runc-v2", "-namespace", "k8s.io", "-id", CID_A, "-address",
        "/run/containerd/containerd.sock"]


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    f = FakeProc(tmp_path / "proc")
    f.host_init()
    return f


def gpu(pid: int, uuid: str = GPU0, memory: int | None = 1 << 30) -> tuple[str, ProcessSample]:
    return uuid, ProcessSample(pid=pid, used_memory_bytes=memory, sm_utilization=0.25)


def one(attributor: Attributor, pid: int, **kwargs: object) -> AttributedProcess:
    [result] = attributor.attribute([gpu(pid)], **kwargs)  # type: ignore[arg-type]
    return result


def host_jupyter(fake: FakeProc) -> None:
    """systemd(1) -> jupyter-lab(100) -> ipykernel K1 (200), all on the host."""
    fake.add(100, ppid=1, cmdline=["/usr/bin/python3", "/usr/local/bin/jupyter-lab", "--no-browser"], starttime=50)
    fake.add(200, ppid=100, cmdline=kernel_cmdline(K1), starttime=60)


def pod_kernel(fake: FakeProc, pod: str = POD_A, cid: str = CID_A, base: int = 1000, kernel: str | None = K1) -> None:
    """containerd-shim (host) -> tini (pod, container PID 1) -> ipykernel (or a plain python) in the container."""
    fake.add(base, ppid=1, cmdline=SHIM, comm="containerd-shim", starttime=40)
    fake.add(base + 1, ppid=base, cmdline=["tini", "-g", "--", "start-notebook.sh"], cgroup=pod_cgroup(pod, cid),
             starttime=41)
    fake.add(base + 2, ppid=base + 1, cmdline=kernel_cmdline(kernel) if kernel else ["python", "serve.py"],
             cgroup=pod_cgroup(pod, cid), starttime=42)


# --------------------------------------------------------------------------- chains on a plain host


@pytest.mark.parametrize(
    ("chain", "kernel_pid"),
    [
        pytest.param([], 200, id="the-kernel-itself"),
        pytest.param([["/bin/sh", "-c", "python train.py"], ["python", "train.py"]], 200, id="shell-escape-child"),
        pytest.param([["python", "train.py"], ["python", "-c", "from multiprocessing.spawn import spawn_main"]],
                     200, id="dataloader-worker-grandchild"),
        pytest.param([["bash"]] * 10, 200, id="ten-levels-down"),
    ],
)
def test_gpu_process_belongs_to_the_kernel_above_it(fake: FakeProc, chain: list[list[str]], kernel_pid: int) -> None:
    host_jupyter(fake)
    pid = 200
    for i, cmdline in enumerate(chain):
        fake.add(300 + i, ppid=pid, cmdline=cmdline, starttime=70 + i)
        pid = 300 + i
    result = one(Attributor(fake.root), pid)
    assert result == AttributedProcess(
        pid=pid, starttime=60 if pid == 200 else 70 + len(chain) - 1, gpu_uuid=GPU0, used_memory_bytes=1 << 30,
        sm_utilization=0.25, pod_uid=None, container_id=None, kernel_id=K1, kernel_pid=kernel_pid, reason="",
    )


def test_nearest_kernel_wins_for_a_kernel_started_from_a_kernel(fake: FakeProc) -> None:
    host_jupyter(fake)
    fake.add(300, ppid=200, cmdline=kernel_cmdline(K2, "--f"), starttime=70)
    fake.add(301, ppid=300, cmdline=["python", "train.py"], starttime=71)
    result = one(Attributor(fake.root), 301)
    assert (result.kernel_id, result.kernel_pid) == (K2, 300)


def test_host_process_without_kernel_names_how_many_ancestors_were_checked(fake: FakeProc) -> None:
    fake.add(100, ppid=1, cmdline=["sshd: alice"], starttime=50)
    fake.add(101, ppid=100, cmdline=["-bash"], starttime=51)
    fake.add(102, ppid=101, cmdline=["python", "train.py"], starttime=52)
    result = one(Attributor(fake.root), 102)
    assert result.kernel_id is None and result.kernel_pid is None
    assert result.reason == "no kernel connection file among 3 ancestors"  # sshd, bash, systemd
    assert (result.starttime, result.pod_uid, result.container_id) == (52, None, None)


def test_walk_stops_at_ppid_zero_without_pid_one(fake: FakeProc) -> None:
    fake.remove(1)
    fake.add(7, ppid=0, cmdline=["/sbin/init"], starttime=1)
    fake.add(8, ppid=7, cmdline=["python"], starttime=2)
    assert one(Attributor(fake.root), 8).reason == "no kernel connection file among 1 ancestors"


# --------------------------------------------------------------------------- pods and containers


def test_kernel_in_a_pod(fake: FakeProc) -> None:
    pod_kernel(fake)
    fake.add(1003, ppid=1002, cmdline=["python", "train.py"], cgroup=pod_cgroup(POD_A, CID_A), starttime=43)
    kernel, child = Attributor(fake.root).attribute([gpu(1002), gpu(1003, GPU1)])
    assert (kernel.kernel_id, kernel.kernel_pid, kernel.pod_uid, kernel.container_id) == (K1, 1002, POD_A, CID_A)
    assert (child.kernel_id, child.kernel_pid, child.pod_uid, child.container_id, child.gpu_uuid) == (
        K1, 1002, POD_A, CID_A, GPU1)


@pytest.mark.parametrize(
    ("ancestor_cgroup", "reason"),
    [
        pytest.param("0::/user.slice/user-1000.slice/session-1.scope\n", "crosses pod boundary at pid 900",
                     id="pod-process-under-host-kernel"),
        pytest.param(pod_cgroup(POD_B, CID_B), "crosses pod boundary at pid 900", id="ancestor-in-another-pod"),
        pytest.param(pod_cgroup(POD_A, CID_A2), "crosses container boundary at pid 900",
                     id="ancestor-in-another-container-of-the-pod"),
    ],
)
def test_walk_never_crosses_a_pod_or_container_boundary(fake: FakeProc, ancestor_cgroup: str, reason: str) -> None:
    # Only a contrived tree has a kernel right above a pod's process; the walk must still not take it.
    fake.add(900, ppid=1, cmdline=kernel_cmdline(K2), cgroup=ancestor_cgroup, starttime=30)
    fake.add(1001, ppid=900, cmdline=["python", "train.py"], cgroup=pod_cgroup(POD_A, CID_A), starttime=41)
    result = one(Attributor(fake.root), 1001)
    assert result.kernel_id is None and result.kernel_pid is None
    assert result.reason == f"no kernel connection file among 0 ancestors; parent chain {reason}"
    assert (result.pod_uid, result.container_id) == (POD_A, CID_A)


def test_host_process_under_a_pod_kernel_is_not_the_pods(fake: FakeProc) -> None:
    fake.add(900, ppid=1, cmdline=kernel_cmdline(K2), cgroup=pod_cgroup(POD_A, CID_A), starttime=30)
    fake.add(901, ppid=900, cmdline=["python"], starttime=31)  # moved to a host cgroup (e.g. systemd-run)
    assert "crosses pod boundary at pid 900" in one(Attributor(fake.root), 901).reason


def test_pod_process_without_kernel_stops_at_the_shim(fake: FakeProc) -> None:
    pod_kernel(fake, kernel=None)
    result = one(Attributor(fake.root), 1002)
    assert result.kernel_id is None
    assert result.reason == "no kernel connection file among 1 ancestors; parent chain crosses pod boundary at pid 1000"


@pytest.mark.parametrize(
    ("label", "kernel_id", "reason"),
    [
        pytest.param(K2, K2, "", id="label-names-the-kernel"),
        pytest.param(K2.upper(), K2, "", id="label-uppercase-lowered"),
        pytest.param("not-a-uuid", None, "pod label kernel_id 'not-a-uuid' is not a UUID", id="bad-label"),
    ],
)
def test_kernel_pod_label_names_the_kernel_when_no_connection_file(
    fake: FakeProc, label: str, kernel_id: str | None, reason: str
) -> None:
    pod_kernel(fake, kernel=None)  # Enterprise Gateway's launcher: no connection file on the command line
    result = one(Attributor(fake.root), 1002, pod_kernel_ids={POD_A: label, POD_B: K1})
    assert (result.kernel_id, result.kernel_pid) == (kernel_id, None)
    assert reason in result.reason
    assert bool(result.reason) == (kernel_id is None)


def test_kernel_pod_label_of_another_pod_is_not_used(fake: FakeProc) -> None:
    pod_kernel(fake, kernel=None)
    result = one(Attributor(fake.root), 1002, pod_kernel_ids={POD_B: K2})
    assert result.kernel_id is None and "pod boundary" in result.reason


def test_pod_label_agreeing_with_the_connection_file_keeps_the_kernel_pid(fake: FakeProc) -> None:
    pod_kernel(fake)
    result = one(Attributor(fake.root), 1002, pod_kernel_ids={POD_A: K1})
    assert (result.kernel_id, result.kernel_pid, result.reason) == (K1, 1002, "")


def test_pod_label_contradicting_the_connection_file_attributes_nothing(fake: FakeProc) -> None:
    pod_kernel(fake)
    result = one(Attributor(fake.root), 1002, pod_kernel_ids={POD_A: K2})
    assert result.kernel_id is None and result.kernel_pid is None
    assert result.reason == f"kernel connection file names kernel {K1} but the pod's kernel_id label names {K2}"


def test_host_process_ignores_pod_labels(fake: FakeProc) -> None:
    fake.add(500, ppid=1, cmdline=["python"], starttime=5)
    assert one(Attributor(fake.root), 500, pod_kernel_ids={POD_A: K1}).kernel_id is None


# --------------------------------------------------------------------------- broken chains


def test_cycle_in_the_parent_chain(fake: FakeProc) -> None:
    fake.add(10, ppid=11, cmdline=["a"], starttime=5)
    fake.add(11, ppid=12, cmdline=["b"], starttime=5)
    fake.add(12, ppid=10, cmdline=["c"], starttime=5)
    result = one(Attributor(fake.root), 10)
    assert result.kernel_id is None and result.reason == "parent chain has a cycle at pid 10"


def test_self_parent_is_a_cycle(fake: FakeProc) -> None:
    fake.add(10, ppid=10, cmdline=["a"], starttime=5)
    assert one(Attributor(fake.root), 10).reason == "parent chain has a cycle at pid 10"


def _deep_chain(fake: FakeProc, depth: int) -> int:
    """Kernel at pid 200 with ``depth`` - 1 shells between it and the GPU process; returns the GPU pid."""
    host_jupyter(fake)
    pid = 200
    for i in range(depth):
        fake.add(1000 + i, ppid=pid, cmdline=["sh"], starttime=70)
        pid = 1000 + i
    return pid


@pytest.mark.parametrize(
    ("depth", "max_depth", "kernel_id", "reason"),
    [
        pytest.param(32, 32, K1, "", id="kernel-exactly-at-max-depth"),
        pytest.param(33, 32, None, "no kernel connection file among 32 ancestors (max_depth reached)",
                     id="kernel-one-beyond-max-depth"),
        pytest.param(40, 64, K1, "", id="larger-max-depth-reaches-it"),
        pytest.param(3, 1, None, "no kernel connection file among 1 ancestors (max_depth reached)", id="max-depth-1"),
    ],
)
def test_depth_limit(fake: FakeProc, depth: int, max_depth: int, kernel_id: str | None, reason: str) -> None:
    gpu_pid = _deep_chain(fake, depth)
    result = one(Attributor(fake.root, max_depth=max_depth), gpu_pid)
    assert (result.kernel_id, result.reason) == (kernel_id, reason)


def test_chain_that_ends_exactly_at_max_depth_is_not_reported_as_cut(fake: FakeProc) -> None:
    fake.add(100, ppid=1, cmdline=["sh"], starttime=5)
    fake.add(101, ppid=100, cmdline=["sh"], starttime=5)
    assert one(Attributor(fake.root, max_depth=3), 101).reason == "no kernel connection file among 2 ancestors"
    assert one(Attributor(fake.root, max_depth=2), 101).reason == "no kernel connection file among 2 ancestors"


@pytest.mark.parametrize(
    ("ns_link", "reason"),
    [
        pytest.param(INITIAL_PID_NAMESPACE, "process exited", id="host-pid-namespace"),
        pytest.param(OTHER_PID_NAMESPACE, "pid not visible (is hostPID enabled?)", id="container-pid-namespace"),
        pytest.param(None, "process exited or pid not visible (is hostPID enabled?)", id="unknown-namespace"),
    ],
)
def test_gpu_pid_not_in_procfs(fake: FakeProc, ns_link: str | None, reason: str) -> None:
    if ns_link is None:
        (fake.root / "self" / "ns" / "pid").unlink()
    else:
        fake.set_pid_namespace(ns_link)
    result = one(Attributor(fake.root), 4321)
    assert result == AttributedProcess(pid=4321, starttime=None, gpu_uuid=GPU0, used_memory_bytes=1 << 30,
                                       sm_utilization=0.25, reason=reason)


def test_not_host_pid_namespace_warns_once(fake: FakeProc) -> None:
    fake.set_pid_namespace(OTHER_PID_NAMESPACE)
    attributor = Attributor(fake.root)
    with capture_logs() as logs:
        for _ in range(3):
            attributor.attribute([gpu(4321), gpu(4322)])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["problem"] for e in warnings] == ["not-host-pid-namespace"]


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        pytest.param(lambda f: f.remove(200), "ancestor pid 200 exited during the walk", id="ancestor-gone"),
        pytest.param(lambda f: (f.root / "200" / "cgroup").unlink(), "ancestor pid 200 exited during the walk",
                     id="ancestor-vanished-mid-read"),
        pytest.param(lambda f: f.write(200, "cgroup", "garbage\n"), "ancestor pid 200 unreadable (bad-cgroup) "
                     "during the walk", id="ancestor-unreadable"),
        pytest.param(lambda f: f.add(200, ppid=1, cmdline=kernel_cmdline(K2), starttime=999),
                     "ancestor pid 200 was replaced by a newer process during the walk", id="ancestor-pid-reused"),
    ],
)
def test_broken_ancestor_attributes_nothing(fake: FakeProc, breakage, reason: str) -> None:
    host_jupyter(fake)
    fake.add(300, ppid=200, cmdline=["python", "train.py"], starttime=70)
    breakage(fake)
    result = one(Attributor(fake.root), 300)
    assert (result.kernel_id, result.kernel_pid, result.reason) == (None, None, reason)
    assert result.starttime == 70


def test_unreadable_gpu_process_is_reported_and_warned_once(fake: FakeProc) -> None:
    for pid in (300, 301):
        fake.add(pid, ppid=1, starttime=70)
        fake.write(pid, "stat", "garbage")
    attributor = Attributor(fake.root)
    with capture_logs() as logs:
        for _ in range(3):
            results = attributor.attribute([gpu(300), gpu(301)])
    assert all(r.kernel_id is None and r.reason.startswith("process unreadable (bad-stat") for r in results)
    assert [e["problem"] for e in logs if e["log_level"] == "warning"] == ["bad-stat"]


# --------------------------------------------------------------------------- identity and cache


def test_reused_pid_does_not_inherit_the_old_kernel(fake: FakeProc) -> None:
    host_jupyter(fake)
    fake.add(300, ppid=200, cmdline=["python", "train.py"], starttime=70)
    attributor = Attributor(fake.root)
    assert one(attributor, 300).kernel_id == K1
    # The kernel's child exits; its pid is reused by a new, unrelated host process.
    fake.add(300, ppid=1, cmdline=["python", "train.py"], starttime=5000)
    result = one(attributor, 300)
    assert (result.kernel_id, result.starttime) == (None, 5000)
    assert result.reason == "no kernel connection file among 1 ancestors"


def test_reused_pid_of_the_kernel_itself(fake: FakeProc) -> None:
    host_jupyter(fake)
    attributor = Attributor(fake.root)
    assert one(attributor, 200).kernel_id == K1
    fake.add(200, ppid=100, cmdline=["python", "other.py"], starttime=8000)
    assert one(attributor, 200).kernel_id is None


def test_orphan_of_an_exited_kernel_is_not_attributed(fake: FakeProc) -> None:
    host_jupyter(fake)
    fake.add(300, ppid=200, cmdline=["python", "train.py"], starttime=70)
    attributor = Attributor(fake.root)
    assert one(attributor, 300).kernel_id == K1
    fake.remove(200)
    fake.add(300, ppid=1, cmdline=["python", "train.py"], starttime=70)  # same identity, re-parented to init
    result = one(attributor, 300)
    assert result.kernel_id is None and result.reason == "no kernel connection file among 1 ancestors"


def test_only_new_identities_are_parsed(fake: FakeProc) -> None:
    host_jupyter(fake)
    fake.add(300, ppid=200, cmdline=["python", "train.py"], starttime=70)
    fake.add(301, ppid=300, cmdline=["python", "worker"], starttime=71)
    attributor = Attributor(fake.root)
    cold = attributor.attribute([gpu(300), gpu(301), gpu(301, GPU1)])
    assert (attributor.parsed_total, attributor.cache_hits_total, attributor.cache_size) == (3, 0, 3)
    warm = attributor.attribute([gpu(300), gpu(301), gpu(301, GPU1)])
    assert warm == cold
    assert (attributor.parsed_total, attributor.cache_hits_total, attributor.cache_size) == (3, 3, 3)
    fake.add(302, ppid=300, cmdline=["python", "worker"], starttime=72)
    attributor.attribute([gpu(300), gpu(301), gpu(302)])
    assert (attributor.parsed_total, attributor.cache_hits_total, attributor.cache_size) == (4, 6, 4)


def test_cache_is_read_through_stat_not_trusted_blindly(fake: FakeProc) -> None:
    host_jupyter(fake)
    attributor = Attributor(fake.root)
    one(attributor, 200)
    fake.remove(200)
    assert one(attributor, 200).reason == "process exited"


def test_cache_evicts_identities_not_seen_for_n_calls(fake: FakeProc) -> None:
    host_jupyter(fake)
    fake.add(300, ppid=200, cmdline=["python"], starttime=70)
    fake.add(400, ppid=1, cmdline=["python"], starttime=80)
    attributor = Attributor(fake.root, evict_after_calls=2)
    attributor.attribute([gpu(300), gpu(400)])
    assert attributor.cache_size == 4  # 300 and its kernel 200; 400 and init
    attributor.attribute([gpu(400)])
    assert attributor.cache_size == 4  # 300 and 200 were last seen one call ago
    attributor.attribute([gpu(400)])
    assert attributor.cache_size == 2  # 400 and init
    attributor.attribute([])
    attributor.attribute([])
    assert attributor.cache_size == 0


def test_cache_stays_bounded_under_pid_churn(fake: FakeProc) -> None:
    attributor = Attributor(fake.root, evict_after_calls=3)
    for tick in range(30):
        pid = 5000 + tick
        fake.add(pid, ppid=1, cmdline=["python"], starttime=10 + tick)
        attributor.attribute([gpu(pid)])
        fake.remove(pid)
    assert attributor.cache_size <= 4


# --------------------------------------------------------------------------- inputs and secrets


def test_output_follows_input_order_and_copies_sample_fields(fake: FakeProc) -> None:
    host_jupyter(fake)
    samples = [(GPU1, ProcessSample(200, None, None)), (GPU0, ProcessSample(4321, 5, 0.0)),
               (GPU0, ProcessSample(200, 7, 0.5))]
    results = Attributor(fake.root).attribute(iter(samples))
    assert [(r.gpu_uuid, r.pid, r.used_memory_bytes, r.sm_utilization) for r in results] == [
        (GPU1, 200, None, None), (GPU0, 4321, 5, 0.0), (GPU0, 200, 7, 0.5)]
    assert [r.kernel_id for r in results] == [K1, None, K1]


@pytest.mark.parametrize("pid", [pytest.param(0, id="zero"), pytest.param(-1, id="negative")])
def test_invalid_pid_from_the_driver_is_unattributed(fake: FakeProc, pid: int) -> None:
    result = one(Attributor(fake.root), pid)
    assert result.kernel_id is None and result.reason == f"invalid pid {pid} reported for this GPU"


@pytest.mark.parametrize(
    ("processes", "culprit"),
    [
        pytest.param([(GPU0, ProcessSample(1, 0)), ("x",)], r"processes\[1\] must be a \(gpu_uuid", id="not-a-pair"),
        pytest.param([(0, ProcessSample(1, 0))], r"processes\[0\]: gpu_uuid must be a str", id="uuid-not-str"),
        pytest.param([(GPU0, {"pid": 1})], r"processes\[0\]: expected a ProcessSample, got dict", id="dict-sample"),
    ],
)
def test_malformed_input_raises_naming_the_culprit(fake: FakeProc, processes: list, culprit: str) -> None:
    with pytest.raises(TypeError, match=culprit):
        Attributor(fake.root).attribute(processes)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        pytest.param({"procfs_root": "/nonexistent/proc"}, "procfs_root '/nonexistent/proc' is not a directory",
                     id="missing-root"),
        pytest.param({"max_depth": 0}, "max_depth must be a positive integer, got 0", id="max-depth-0"),
        pytest.param({"max_depth": True}, "max_depth", id="max-depth-bool"),
        pytest.param({"evict_after_calls": 0}, "evict_after_calls", id="evict-0"),
    ],
)
def test_bad_settings_raise_naming_the_culprit(fake: FakeProc, kwargs: dict[str, object], culprit: str) -> None:
    with pytest.raises(ValueError, match=re.escape(culprit)):
        Attributor(**{"procfs_root": fake.root, **kwargs})  # type: ignore[arg-type]


def test_attribution_never_opens_environ_nor_leaks_it(fake: FakeProc) -> None:
    host_jupyter(fake)
    pod_kernel(fake)
    fake.add(300, ppid=200, cmdline=["python", "--token", SECRET], starttime=70)
    with recording_opens() as opened, capture_logs() as logs:
        results = Attributor(fake.root).attribute([gpu(300), gpu(1002), gpu(4321)])
    assert any(p == "cmdline" or p.endswith("/cmdline") for p in opened)  # the recorder sees procfs opens
    assert not [p for p in opened if "environ" in p]
    assert SECRET not in repr(results) + repr(logs)


# --------------------------------------------------------------------------- the real /proc, a real kernel


@pytest.fixture(scope="module")
@e2e_fixture
def kernel_with_child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, int]]:
    """A real ipykernel, started as Jupyter Server does, that spawned `sleep 30`: (kernel_id, kernel pid, child pid)."""
    mkm = MultiKernelManager(connection_dir=str(tmp_path_factory.mktemp("runtime")))
    kernel_id = mkm.start_kernel(kernel_name="python3")
    child: tuple[int, int | None] | None = None
    client = None
    try:
        km = mkm.get_kernel(kernel_id)
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        out: list[str] = []

        def on_output(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        code = "import subprocess\np = subprocess.Popen(['sleep', '30'])\nprint('CHILD', p.pid)"
        reply = client.execute_interactive(code, output_hook=on_output, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        match = re.search(r"CHILD (\d+)", "".join(out))
        assert match, out
        child_pid = int(match[1])
        child = (child_pid, real_starttime(child_pid))
        yield kernel_id, km.provisioner.pid, child_pid
    finally:
        if client is not None:
            if child is not None:
                client.execute_interactive("p.kill(); p.wait()", timeout=30)
            client.stop_channels()
        mkm.shutdown_all(now=True)
        if child is not None:
            kill_if_same(*child)


def test_real_kernel_child_is_attributed_to_the_kernel(kernel_with_child: tuple[str, int, int]) -> None:
    kernel_id, kernel_pid, child_pid = kernel_with_child
    attributor = Attributor("/proc")
    with recording_opens() as opened:
        child, kernel = attributor.attribute([gpu(child_pid), gpu(kernel_pid, GPU1)])
    assert (child.kernel_id, child.kernel_pid, child.reason) == (kernel_id, kernel_pid, "")
    assert child.starttime == real_starttime(child_pid)
    assert (kernel.kernel_id, kernel.kernel_pid) == (kernel_id, kernel_pid)
    assert not [p for p in opened if "environ" in p]
    assert attributor.parsed_total == 2  # the child and the kernel; the walk stopped there
    attributor.attribute([gpu(child_pid)])
    assert attributor.parsed_total == 2 and attributor.cache_hits_total == 2


def test_real_process_outside_any_kernel() -> None:
    result = one(Attributor("/proc"), os.getpid())
    assert result.kernel_id is None
    assert re.fullmatch(r"no kernel connection file among \d+ ancestors", result.reason), result.reason


@pytest.mark.e2e  # a churn of 1,000 kernels (seconds of CPU)
def test_item4_cache_stays_bounded_by_the_live_gpu_processes(fake: FakeProc) -> None:
    """1,000 kernels (each a kernel process and a GPU child) come and go, 5 alive at a time: the identity cache holds
    the live chains only, never the history."""
    fake.host_init()
    a = Attributor(procfs_root=fake.root)
    live: list[int] = []
    for n in range(1000):
        kernel_pid, child_pid = 10_000 + 2 * n, 10_001 + 2 * n
        kid = f"00000000-0000-4000-8000-{n:012d}"
        fake.add(kernel_pid, ppid=1, cmdline=kernel_cmdline(kid), starttime=1000 + n)
        fake.add(child_pid, ppid=kernel_pid, cmdline=["python", "train.py"], starttime=1000 + n)
        live.append(child_pid)
        if len(live) > 5:
            gone = live.pop(0)
            fake.remove(gone)
            fake.remove(gone - 1)
        out = a.attribute([gpu(pid) for pid in live])
        assert all(p.kernel_id for p in out)
        # Each live GPU process, its kernel, and pid 1; plus what was seen within evict_after_calls.
        assert a.cache_size <= 3 * (len(live) + a.evict_after_calls) + 1, (n, a.cache_size)
