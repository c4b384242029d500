"""/proc parsing: cgroup (v1/v2, every driver and runtime), stat, cmdline and kernel ids; reading a process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.multikernelmanager import MultiKernelManager
from structlog.testing import capture_logs

from reclaimer.observe import procfs
from reclaimer.observe.procfs import (
    LogOnce,
    ProcessGone,
    ProcessUnreadable,
    ProcfsParseError,
    kernel_id_from_cmdline,
    load_process,
    parse_cgroup,
    parse_cmdline,
    parse_stat,
    read_process,
)
from tests.support.e2e import e2e_fixture
from tests.support.procfs_fixtures import (
    SAMPLES,
    SECRET,
    FakeProc,
    kernel_cmdline,
    kill_if_same,
    pod_cgroup,
    real_starttime,
    recording_opens,
)

K = "0e1b5f4a-9c3d-4b2e-8f7a-6d5c4b3a2f1e"
POD = "55c6c714-b240-4dec-9a45-57b61696ab6e"
CID = "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36"


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


# --------------------------------------------------------------------------- parse_cgroup


CGROUP_CASES = [
    ("gke-cos-v1-cgroupfs-besteffort", "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376",
     "74c13223-5a00-11e9-b385-42010a80018d"),
    ("k3s-v2-cgroupfs-burstable", "3aaaa76f09e1de6bb75e84f9c15b737a2d590f69757953e3ec262bd5861dc15b",
     "404bd273-57bc-4508-a386-e2b76d3c9cfe"),
    ("k3s-v1-cgroupfs-guaranteed", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
     "0c7b7d0c-2b8d-4e7e-9f55-1f4a1d2c3b4a"),
    ("k3s-v2-nested-system-slice", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
     "5e4f2a1b-6c3d-4e8f-a9b0-c1d2e3f4a5b6"),
    ("eks-al2023-v2-systemd-burstable", CID, POD),
    ("aks-ubuntu2204-v2-systemd-besteffort", "484b78324bb363a0cc93d136431e2005ceac970d035aaeec4ad6bfb6848a7b51",
     "adcfbb42-ec24-48ae-a259-f756c8d1f046"),
    ("v2-systemd-guaranteed", "8885c54ca43d6fc94e4c8c69e640369b41b68d7201160585cb14e7ede0525cbe",
     "bf9d0bcd-6f57-47a6-b0b0-367b782509d7"),
    ("eks-al2-v1-systemd-colon-form", "ee4b20e90ac7f42a10bd004d05646b13d8ab5e2c5e7cbc01abf8006bac016459",
     "0125ec2f-b64a-4868-8f5b-94b56cbab864"),
    ("kind-v2-kubelet-slice", "a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e",
     "1e597579-417e-482f-bf65-5fe170c3aebd"),
    ("kind-v1-nested-in-docker", "c1a5f0f4c2b7a3e9d8f6b5a4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4",
     "d3e1f6a2-8b4c-4f0e-9a7d-2c5b8e1f4a3d"),
    ("openshift-v1-crio", "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c",
     "a5c1f8d5-1919-434d-add7-4afaafdaef89"),
    ("openshift-v2-crio-crun-subgroup", "66d6d4ac9851cfcab8400277ad96770ce52c1d75eeac29046753875056eacaed",
     "a5c1f8d5-1919-434d-add7-4afaafdaef89"),
    ("openshift-v2-crio-conmon-in-pod", None, "a5c1f8d5-1919-434d-add7-4afaafdaef89"),
    ("crio-conmon-system-slice", None, None),
    ("dockershim-v1-systemd", "d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98",
     "7d4424e6-bb13-42f4-a47a-45a4828bf54d"),
    ("k8s-1.5-besteffort-slice", "0c34bcd7d02f321d0df7aa6ea703285b02abebc9096c5128c14091fc43ea1f3b",
     "0d33f94b-ab1a-11e6-9e1a-68f7281d8004"),
    ("static-pod-config-hash", "2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5",
     "8daa50c3a64c9ff60bb9eab7b44b56fd"),
    ("private-cgroupns-relative", "a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e",
     "1e597579-417e-482f-bf65-5fe170c3aebd"),
    ("docker-v2-systemd", "d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98", None),
    ("docker-v1-cgroupfs", "611a8d133d2c636e777745e4dbb1d5866a068fe0f6cc87033e52fe139fca5ba1", None),
    ("host-user-session-v2", None, None),
    ("host-root-v2", None, None),
    ("host-containerd-service", None, None),
    ("host-v1-system-slice", None, None),
    ("firecracker-vm-hybrid", None, None),
]


@pytest.mark.parametrize(
    ("sample", "container_id", "pod_uid"), [pytest.param(*case, id=case[0]) for case in CGROUP_CASES]
)
def test_parse_cgroup_real_world_shapes(sample: str, container_id: str | None, pod_uid: str | None) -> None:
    text = (SAMPLES / "cgroup" / f"{sample}.txt").read_text()
    assert parse_cgroup(text) == (container_id, pod_uid)


def test_every_cgroup_sample_has_a_case() -> None:
    files = {p.stem for p in (SAMPLES / "cgroup").glob("*.txt")}
    assert files == {case[0] for case in CGROUP_CASES}


@pytest.mark.parametrize(
    ("text", "container_id", "pod_uid"),
    [
        pytest.param(f"0::/kubepods/burstable/pod{POD.upper()}/{CID}\n", CID, POD, id="uppercase-uid-lowered"),
        pytest.param("0::/system.slice/docker-short.scope\n", None, None, id="short-docker-id-is-not-a-container"),
        pytest.param(f"0::/system.slice/docker-{CID.upper()}.scope\n", None, None, id="uppercase-container-id"),
        pytest.param(f"0::/machine.slice/libpod-conmon-{CID}.scope\n", None, None, id="podman-conmon"),
        pytest.param(f"0::/machine.slice/libpod-{CID}.scope\n", CID, None, id="podman-container"),
        pytest.param(f"0::/pod{POD}/{CID}\n", CID, None, id="pod-dir-outside-kubepods-is-not-a-pod"),
        pytest.param(f"0::/kubepods/burstable/pod{POD}\n", None, POD, id="pod-level-cgroup-no-container"),
        pytest.param(f"0::/default/{CID}\n", CID, None, id="containerd-namespace-cgroupfs"),
        pytest.param(f"0::/kubepods/besteffort/pod{POD}/{CID}\r\n", CID, POD, id="crlf-line-end"),
        pytest.param(f"\n0::/kubepods/besteffort/pod{POD}/{CID}\n\n", CID, POD, id="blank-lines"),
    ],
)
def test_parse_cgroup_edge_cases(text: str, container_id: str | None, pod_uid: str | None) -> None:
    assert parse_cgroup(text) == (container_id, pod_uid)


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("\n\n", "empty", id="only-newlines"),
        pytest.param("hello world\n", "line 1", id="garbage"),
        pytest.param("0::/\n12:memory\n", "line 2", id="missing-path-field"),
        pytest.param("x:memory:/\n", "line 1", id="non-numeric-hierarchy"),
        pytest.param("0::relative/path\n", "line 1", id="path-not-absolute"),
        pytest.param(
            f"4:memory:/kubepods/pod{POD}/{CID}\n0::/kubepods/pod11111111-2222-4333-8444-555555555555/{CID}\n",
            "different pods", id="conflicting-pods",
        ),
        pytest.param(f"4:memory:/docker/{CID}\n0::/docker/{'b' * 64}\n", "different containers",
                     id="conflicting-containers"),
    ],
)
def test_parse_cgroup_rejects_bad_input_naming_the_culprit(text: str, culprit: str) -> None:
    with pytest.raises(ProcfsParseError, match=culprit):
        parse_cgroup(text)


# --------------------------------------------------------------------------- parse_stat


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        pytest.param("ipykernel", (48213, "python", 48190, 8812345), id="ipykernel"),
        pytest.param("web-content", (5120, "Web Content", 4977, 112233), id="comm-with-space"),
        pytest.param("sd-pam", (1843, "(sd-pam)", 1842, 2271), id="comm-with-parentheses"),
        pytest.param("comm-with-close-paren", (31337, "x) S 1 2 3", 4242, 999999), id="comm-with-close-paren"),
        pytest.param("zombie", (9594, "true", 9552, 90485), id="zombie"),
        pytest.param("kthreadd", (2, "kthreadd", 0, 30), id="kernel-thread-ppid-0"),
        pytest.param("firecracker-init", (1, "process_api", 0, 30), id="pid-1"),
    ],
)
def test_parse_stat_real_lines(sample: str, expected: tuple[int, str, int, int]) -> None:
    assert parse_stat((SAMPLES / "stat" / f"{sample}.txt").read_text()) == expected


def test_parse_stat_of_this_process() -> None:
    pid, comm, ppid, starttime = parse_stat(Path("/proc/self/stat").read_text())
    assert (pid, ppid) == (os.getpid(), os.getppid())
    assert starttime > 0 and comm


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        pytest.param("", "comm", id="empty"),
        pytest.param("1234 python S 1 2 3\n", "comm", id="no-parentheses"),
        pytest.param("(python) S 1\n", "comm", id="no-pid"),
        pytest.param("12a4 (python) S 1 " + "0 " * 30, "pid", id="non-numeric-pid"),
        pytest.param("1234 (python) S 1 2 3\n", "fields", id="truncated"),
        pytest.param("1234 (python) S x " + "0 " * 30, "ppid", id="non-numeric-ppid"),
        pytest.param("1234 (python) S 1 " + "0 " * 17 + "-5 " + "0 " * 10, "starttime", id="negative-starttime"),
    ],
)
def test_parse_stat_rejects_bad_input_naming_the_culprit(text: str, culprit: str) -> None:
    with pytest.raises(ProcfsParseError, match=culprit):
        parse_stat(text)


# --------------------------------------------------------------------------- cmdline and kernel ids


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"python\0-m\0ipykernel_launcher\0", ["python", "-m", "ipykernel_launcher"], id="nul-terminated"),
        pytest.param(b"python\0train.py", ["python", "train.py"], id="no-final-nul"),
        pytest.param(b"", [], id="kernel-thread-or-zombie"),
        pytest.param(b"python\0\0x\0", ["python", "", "x"], id="empty-argument"),
        pytest.param(b"jupyter-lab: worker 3", ["jupyter-lab: worker 3"], id="setproctitle-single-string"),
        pytest.param(b"caf\xe9\0", ["caf\ufffd"], id="undecodable-bytes-replaced"),
    ],
)
def test_parse_cmdline(raw: bytes, expected: list[str]) -> None:
    assert parse_cmdline(raw) == expected


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        pytest.param("jupyter-server-ipykernel", K, id="ipykernel-dash-f"),
        pytest.param("kernel-gateway-ipykernel-f-equals", K, id="ipykernel-f-equals"),
        pytest.param("ipykernel-connection-file-trait", K, id="KernelApp.connection_file"),
        pytest.param("irkernel-positional", K, id="irkernel-positional"),
        pytest.param("ijulia-positional", K, id="ijulia-positional"),
        pytest.param("vscode-kernel-v2-not-uuid", None, id="vscode-non-uuid-connection-file"),
        pytest.param("enterprise-gateway-launcher", None, id="eg-launcher-uses-pod-label-instead"),
        pytest.param("jupyter-console-existing", None, id="client-with-existing-is-not-the-kernel"),
        pytest.param("jupyter-lab-server", None, id="jupyter-server-itself"),
        pytest.param("train-script", None, id="plain-script"),
        pytest.param("kernel-thread", None, id="empty-cmdline"),
    ],
)
def test_kernel_id_from_real_cmdlines(sample: str, expected: str | None) -> None:
    args = parse_cmdline((SAMPLES / "cmdline" / f"{sample}.bin").read_bytes())
    assert kernel_id_from_cmdline(args) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["python", "-f", f"/r/kernel-{K.upper()}.json"], K, id="uppercase-uuid-lowered"),
        pytest.param(["python", "-f", "/r/kernel-abc.json"], None, id="not-a-uuid"),
        pytest.param(["python", "-f", f"/r/kernel-{K.replace('-', '')}.json"], None, id="uuid-without-dashes"),
        pytest.param(["python", "-f", f"/r/kernel-{K}.json.bak"], None, id="wrong-suffix"),
        pytest.param(["python", "-f", f"/r/xkernel-{K}.json"], None, id="prefix-in-basename"),
        pytest.param(["python", "-f", f"/r/kernel-{K}.json/other"], None, id="directory-not-basename"),
        pytest.param(["cat", f"kernel-{K}.json"], K, id="bare-relative-name"),
        pytest.param(["python", f"-f=C:\\Users\\a\\kernel-{K}.json"], K, id="backslash-path"),
        pytest.param(["jupyter", f"--existing=/r/kernel-{K}.json"], None, id="existing-equals"),
        pytest.param(["python", "-f", f"/a/kernel-{K}.json", f"/b/kernel-{K}.json"], K, id="same-id-twice"),
        pytest.param(["python", "-f", f"/a/kernel-{K}.json", "/b/kernel-11111111-2222-4333-8444-555555555555.json"],
                     None, id="two-different-ids-ambiguous"),
        pytest.param([], None, id="no-args"),
    ],
)
def test_kernel_id_from_cmdline_edge_cases(args: list[str], expected: str | None) -> None:
    assert kernel_id_from_cmdline(args) == expected


# --------------------------------------------------------------------------- read_process on a fake tree


def test_read_process_reads_stat_cmdline_and_cgroup(fake: FakeProc) -> None:
    fake.add(4242, ppid=4200, cmdline=kernel_cmdline(K), cgroup=pod_cgroup(POD, CID), starttime=777)
    info = read_process(fake.root, 4242)
    assert info is not None
    assert (info.pid, info.ppid, info.starttime, info.comm) == (4242, 4200, 777, "python")
    assert (info.container_id, info.pod_uid, info.kernel_id) == (CID, POD, K)


def test_read_process_never_opens_environ(fake: FakeProc) -> None:
    fake.add(4242, cmdline=kernel_cmdline(K))
    with recording_opens() as opened, capture_logs() as logs:
        info = read_process(fake.root, 4242)
    assert info is not None
    assert any(p.endswith("stat") for p in opened)  # the recorder does see our opens
    assert not [p for p in opened if "environ" in p]
    assert SECRET not in repr(info) + repr(logs)


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda f: f.remove(4242), id="no-such-pid"),
        pytest.param(lambda f: (f.root / "4242" / "cgroup").unlink(), id="vanished-mid-read-cgroup"),
        pytest.param(lambda f: (f.root / "4242" / "cmdline").unlink(), id="vanished-mid-read-cmdline"),
    ],
)
def test_read_process_returns_none_when_the_process_is_gone(fake: FakeProc, breakage) -> None:
    fake.add(4242)
    breakage(fake)
    with capture_logs() as logs:
        assert read_process(fake.root, 4242, warn=LogOnce()) is None
    assert logs == []  # a process exiting is normal: no warning
    with pytest.raises(ProcessGone):
        load_process(fake.root, 4242)


def _replace_with_directory(fake: FakeProc, pid: int, name: str) -> None:
    (fake.root / str(pid) / name).unlink()
    (fake.root / str(pid) / name).mkdir()


@pytest.mark.parametrize(
    ("breakage", "kind"),
    [
        pytest.param(lambda f, pid: f.write(pid, "stat", "garbage\n"), "bad-stat", id="garbage-stat"),
        pytest.param(lambda f, pid: f.write(pid, "stat", f"{pid + 1} (python) S 1 " + "0 " * 30), "bad-stat",
                     id="stat-names-other-pid"),
        pytest.param(lambda f, pid: f.write(pid, "cgroup", "not a cgroup\n"), "bad-cgroup", id="garbage-cgroup"),
        pytest.param(lambda f, pid: f.write(pid, "cgroup", ""), "bad-cgroup", id="empty-cgroup"),
        pytest.param(lambda f, pid: _replace_with_directory(f, pid, "cmdline"), "unreadable-cmdline",
                     id="cmdline-unreadable"),
    ],
)
def test_read_process_returns_none_and_warns_once_per_kind(fake: FakeProc, breakage, kind: str) -> None:
    pids = (4242, 4243, 4244)
    for pid in pids:
        fake.add(pid)
        breakage(fake, pid)
    warn = LogOnce()
    with capture_logs() as logs:
        for _ in range(3):
            for pid in pids:
                assert read_process(fake.root, pid, warn=warn) is None
    assert [entry["problem"] for entry in logs] == [kind]
    assert logs[0]["log_level"] == "warning" and logs[0]["pid"] == 4242
    with pytest.raises(ProcessUnreadable) as exc:
        load_process(fake.root, 4243)
    assert exc.value.kind == kind and "4243" in str(exc.value)


@pytest.mark.parametrize("pid", [pytest.param(0, id="zero"), pytest.param(-3, id="negative"),
                                 pytest.param(True, id="bool"), pytest.param("12", id="string")])
def test_read_process_rejects_invalid_pids(fake: FakeProc, pid: object) -> None:
    with pytest.raises(ValueError, match="pid must be a positive integer"):
        read_process(fake.root, pid)  # type: ignore[arg-type]


def test_in_initial_pid_namespace(fake: FakeProc) -> None:
    fake.root.mkdir(parents=True, exist_ok=True)
    assert procfs.in_initial_pid_namespace(fake.root) is None
    fake.set_pid_namespace("pid:[4026532555]")
    assert procfs.in_initial_pid_namespace(fake.root) is False
    fake.set_pid_namespace(procfs.INITIAL_PID_NAMESPACE)
    assert procfs.in_initial_pid_namespace(fake.root) is True
    assert procfs.in_initial_pid_namespace("/proc") is (os.readlink("/proc/self/ns/pid") == "pid:[4026531836]")


# --------------------------------------------------------------------------- the real /proc


@pytest.fixture
@e2e_fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_read_process_of_a_real_process(sleeper: subprocess.Popen[bytes]) -> None:
    with recording_opens() as opened:
        info = read_process("/proc", sleeper.pid)
    assert info is not None
    assert (info.pid, info.ppid, info.comm) == (sleeper.pid, os.getpid(), "sleep")
    assert info.starttime == real_starttime(sleeper.pid)
    assert info.kernel_id is None
    assert not [p for p in opened if "environ" in p]


def test_read_process_of_an_exited_real_process(sleeper: subprocess.Popen[bytes]) -> None:
    sleeper.kill()
    sleeper.wait()
    assert read_process("/proc", sleeper.pid) is None


def test_real_process_exiting_mid_read_is_gone_not_an_error(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read_at = procfs._read_at

    def read_then_kill(dir_fd: int, name: str, limit: int) -> bytes:
        data = real_read_at(dir_fd, name, limit)
        if name == "stat":  # the process dies between its stat and its cmdline: the kernel answers ESRCH
            sleeper.kill()
            sleeper.wait()
        return data

    monkeypatch.setattr(procfs, "_read_at", read_then_kill)
    with pytest.raises(ProcessGone, match="No such process"):
        load_process("/proc", sleeper.pid)
    with capture_logs() as logs:
        assert read_process("/proc", sleeper.pid, warn=LogOnce()) is None
    assert logs == []


@pytest.fixture(scope="module")
@e2e_fixture
def real_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, str]]:
    """A real ipykernel started the way Jupyter Server starts kernels: (kernel_id, kernel pid, connection file)."""
    mkm = MultiKernelManager(connection_dir=str(tmp_path_factory.mktemp("runtime")))
    kernel_id = mkm.start_kernel(kernel_name="python3")
    try:
        km = mkm.get_kernel(kernel_id)
        pid = km.provisioner.pid
        assert isinstance(pid, int)
        yield kernel_id, pid, km.connection_file
    finally:
        mkm.shutdown_all(now=True)


def test_real_ipykernel_connection_file_names_its_kernel_id(real_kernel: tuple[str, int, str]) -> None:
    kernel_id, pid, connection_file = real_kernel
    # jupyter_server's MappingKernelManager inherits this naming: the id in the file is what /api/kernels lists.
    assert os.path.basename(connection_file) == f"kernel-{kernel_id}.json"
    args = parse_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes())
    assert args[0] == sys.executable and "ipykernel_launcher" in args
    assert kernel_id_from_cmdline(args) == kernel_id
    info = read_process("/proc", pid)
    assert info is not None and info.kernel_id == kernel_id and info.ppid == os.getpid()


def test_kill_if_same_never_kills_a_reused_pid(sleeper: subprocess.Popen[bytes]) -> None:
    starttime = real_starttime(sleeper.pid)
    assert starttime is not None
    kill_if_same(sleeper.pid, starttime + 1)
    assert sleeper.poll() is None
    kill_if_same(sleeper.pid, starttime)
    assert sleeper.wait(timeout=10) == -9


def test_parse_listening_sockets_ipv4_and_ipv6() -> None:
    from reclaimer.observe.procfs import parse_listening_sockets

    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:22B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n"
        "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0\n"
        "   2: 0100007F:22B8 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1\n"
    )
    assert parse_listening_sockets(tcp, ipv6=False) == {111: ("127.0.0.1", 8888), 222: ("0.0.0.0", 8080)}
    tcp6 = (
        "  sl  local_address                         remote_address                        st tx_queue rx_queue tr "
        "tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000000000000000000001000000:22B8 00000000000000000000000000000000:0000 0A 00000000:00000000 "
        "00:00000000 00000000     0        0 444 1 0 100 0 0 10 0\n"
    )
    assert parse_listening_sockets(tcp6, ipv6=True) == {444: ("::1", 8888)}
    assert parse_listening_sockets("header\ngarbage line\n", ipv6=False) == {}
