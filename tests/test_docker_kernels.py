"""Docker kernels (issue 13 item 4): a kernelspec like ``docker run --rm -v {connection_file}:/connection-spec IMAGE
python -m ipykernel_launcher -f /connection-spec``. Inside the container the command line names no kernel id and the
process is not a descendant of anything that does: the kernel is found through the bind-mounted connection file,
which the container process's /proc/<pid>/mountinfo shows as the mount's root (the host path kernel-<uuid>.json).
No Docker socket. Tested with committed mountinfo samples (docker, containerd, podman, one captured here), a real
process in its own mount namespace (unshare -m + bind mount), and a real Jupyter Server whose kernelspec starts
every kernel that way, end to end through the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reclaimer.observe.attribution import Attributor
from reclaimer.core.config import parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.core.model import ProcessSample
from reclaimer.observe.procfs import (
    Mount,
    ProcessUnreadable,
    ProcfsParseError,
    connection_file_args,
    kernel_id_from_mounts,
    load_process,
    parse_mountinfo,
)
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    kernel_pid,
    shutdown_kernel,
    start_jupyter_server,
    start_kernel,
    wait_for_state,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.support.procfs_fixtures import SAMPLES, FakeProc, recording_opens
from tests.support.e2e import e2e_fixture

K = "0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90"
GIB = 1024**3
DOCKER_ARGS = ["python", "-m", "ipykernel_launcher", "-f", "/connection-spec"]

needs_unshare = pytest.mark.skipif(  # never skipped in CI (root there): a missing tool fails the test instead
    not os.environ.get("CI") and (os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None),
    reason="needs root, unshare and mount (a private mount namespace with a bind mount)",
)


# --------------------------------------------------------------------------- committed samples

MOUNTINFO_CASES = {
    # sample -> (the container process's command line, the kernel id its mounts name)
    "docker-overlay2-ext4": (DOCKER_ARGS, "5d2f1a7c-3b8e-4c9d-a0f1-2e3d4c5b6a78"),
    "containerd-nerdctl-tmpfs-runtime": (["/opt/conda/bin/python", "-m", "ipykernel_launcher",
                                          "--f=/var/run/kernel/conn.json"], "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"),
    "podman-rootless-fuse-overlayfs": (["python3", "-m", "ipykernel", "-f", "/connection-spec"],
                                       "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"),
    "unshare-bind-mount-captured": (["python", "-m", "ipykernel_launcher", "-f", "/tmp/mnt-try/spec"], K),
    "docker-space-in-path": (["python", "-m", "ipykernel_launcher", "-f", "/kernel spec/conn.json"],
                             "7e6d5c4b-3a2f-4e1d-9c8b-7a6f5e4d3c2b"),
    # The whole runtime directory mounted: a directory is no connection file (any kernel's file could be meant).
    "docker-runtime-dir-bind": (["python", "-m", "ipykernel_launcher", "-f",
                                 "/home/jovyan/.local/share/jupyter/runtime/conn.json"], None),
    # The host file was deleted under the running container: the root names it "//deleted"; never guessed.
    "docker-deleted-connection-file": (DOCKER_ARGS, None),
}


@pytest.mark.parametrize("sample", sorted(MOUNTINFO_CASES))
def test_kernel_id_from_committed_mountinfo_samples(sample: str) -> None:
    args, expected = MOUNTINFO_CASES[sample]
    mounts = parse_mountinfo((SAMPLES / "mountinfo" / f"{sample}.txt").read_text())
    assert mounts and mounts[0].mount_point == "/"
    assert kernel_id_from_mounts(args, mounts) == expected


def test_every_mountinfo_sample_has_a_case() -> None:
    assert sorted(p.stem for p in (SAMPLES / "mountinfo").glob("*.txt")) == sorted(MOUNTINFO_CASES)


def test_mountinfo_paths_are_unescaped() -> None:
    (mount,) = [m for m in parse_mountinfo((SAMPLES / "mountinfo" / "docker-space-in-path.txt").read_text())
                if m.mount_point != "/"]
    assert mount.mount_point == "/kernel spec/conn.json" and mount.root.startswith("/Users/Alice Smith/")


@pytest.mark.parametrize(
    "text, culprit",
    [
        pytest.param("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 ext3 /dev/root rw\n", "line 1 has no ' - '",
                     id="no-separator"),
        pytest.param("22 27 0:21 / /proc rw - proc proc rw\nx y z / / rw - tmpfs t rw\n", "line 2 is not a mount",
                     id="not-numbers"),
        pytest.param("22 27 0:21 relative /proc rw - proc proc rw\n", "line 1 is not a mount", id="relative-root"),
        pytest.param("22 27 0:21 / /proc rw -\n", "line 1 is not a mount", id="truncated"),
    ],
)
def test_parse_mountinfo_rejects_bad_input_naming_the_line(text: str, culprit: str) -> None:
    with pytest.raises(ProcfsParseError, match=culprit):
        parse_mountinfo(text)


@pytest.mark.parametrize(
    "args, expected",
    [
        pytest.param(["python", "-m", "ipykernel_launcher", "-f", "/c"], ["/c"], id="dash-f"),
        pytest.param(["python", "-m", "ipykernel_launcher", "--f=/c"], ["/c"], id="dash-dash-f-equals"),
        pytest.param(["python", "-m", "ipykernel", "--KernelApp.connection_file=/c"], ["/c"], id="traitlet"),
        pytest.param(["R", "--slave", "-e", "IRkernel::main()", "--args", "-f", "/c"], ["/c"], id="irkernel"),
        pytest.param(["jupyter", "console", "--existing", "/c"], [], id="client-not-kernel"),
        pytest.param(["python", "-m", "ipykernel_launcher", "-f"], [], id="flag-without-value"),
    ],
)
def test_connection_file_args(args: list[str], expected: list[str]) -> None:
    assert connection_file_args(args) == expected


def _bind(root: str, at: str) -> Mount:
    return Mount(root=root, mount_point=at, fstype="ext4")


@pytest.mark.parametrize(
    "args, mounts, expected",
    [
        pytest.param(DOCKER_ARGS, [_bind(f"/run/kernel-{K}.json", "/connection-spec")], K, id="positive-control"),
        pytest.param(DOCKER_ARGS, [_bind(f"/run/kernel-{K}.json", "/elsewhere.json")], None,
                     id="mounted-at-another-path"),
        pytest.param(["python", "-m", "ipykernel_launcher", "-f", "connection-spec"],
                     [_bind(f"/run/kernel-{K}.json", "/connection-spec")], None, id="relative-path"),
        pytest.param(DOCKER_ARGS, [_bind("/run/connection.json", "/connection-spec")], None, id="root-names-no-id"),
        pytest.param(["python", "-m", "ipykernel_launcher", "-f", "/a", "-f", "/b"],
                     [_bind(f"/run/kernel-{K}.json", "/a"),
                      _bind("/run/kernel-11111111-2222-4333-8444-555555555555.json", "/b")], None,
                     id="two-ids-ambiguous"),
        pytest.param(["python", "train.py"], [_bind(f"/run/kernel-{K}.json", "/connection-spec")], None,
                     id="not-a-kernel-command-line"),
        pytest.param(DOCKER_ARGS, [_bind(f"/run/kernel-{K.upper()}.json", "/connection-spec")], K, id="upper-case"),
    ],
)
def test_kernel_id_from_mounts(args: list[str], mounts: list[Mount], expected: str | None) -> None:
    assert kernel_id_from_mounts(args, mounts) == expected


# --------------------------------------------------------------------------- reading a fake /proc


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_mountinfo_is_read_only_for_kernels_with_an_unnamed_connection_file(fake: FakeProc) -> None:
    docker = (SAMPLES / "mountinfo" / "docker-overlay2-ext4.txt").read_text()
    fake.add(10, cmdline=DOCKER_ARGS)
    fake.write(10, "mountinfo", docker)
    fake.add(11, cmdline=["python", "-m", "ipykernel_launcher", "-f", f"/run/kernel-{K}.json"])
    fake.write(11, "mountinfo", docker)  # names another kernel: never read, the command line decides
    fake.add(12, cmdline=["python", "train.py"])
    fake.write(12, "mountinfo", docker)
    with recording_opens() as opened:
        infos = {pid: load_process(fake.root, pid) for pid in (10, 11, 12)}
    assert infos[10].kernel_id == "5d2f1a7c-3b8e-4c9d-a0f1-2e3d4c5b6a78"
    assert infos[11].kernel_id == K and infos[12].kernel_id is None
    assert [p for p in opened if p.endswith("mountinfo")] == ["mountinfo"]  # one read: pid 10's (relative open)
    assert not [p for p in opened if "environ" in p]


def test_a_garbled_mountinfo_is_unreadable_naming_the_file(fake: FakeProc) -> None:
    fake.add(10, cmdline=DOCKER_ARGS)
    fake.write(10, "mountinfo", "this is not mountinfo\n")
    with pytest.raises(ProcessUnreadable, match="mountinfo: mountinfo line 1") as err:
        load_process(fake.root, 10)
    assert err.value.kind == "bad-mountinfo"


# --------------------------------------------------------------------------- a real mount namespace


@pytest.fixture
@e2e_fixture
def docker_like(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real process in its own mount namespace whose /connection-spec-like path is a bind mount of the host file
    kernel-<K>.json, started with `-f <that path>` (as `docker run -v` does), plus a GPU child of it."""
    host_file = tmp_path / f"kernel-{K}.json"
    host_file.write_text(json.dumps({"shell_port": 0}))
    spec = tmp_path / "connection-spec"
    spec.write_text("")
    ready = tmp_path / "child.pid"
    child = f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); open({str(ready)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" -f "$2"'
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "-",
                             str(host_file), str(spec), sys.executable, child])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the namespaced process did not start"
            time.sleep(0.05)
        yield proc, ready
    finally:
        proc.kill()
        proc.wait()
        if ready.exists() and ready.read_text():
            subprocess.run(["kill", "-9", ready.read_text()], check=False, capture_output=True)


@needs_unshare
def test_a_process_in_its_own_mount_namespace_is_attributed_through_its_bind_mount(
    docker_like: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    proc, ready = docker_like
    kernel = load_process("/proc", proc.pid)
    args = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert not any(b"kernel-" in a for a in args)  # the command line names no kernel id
    assert kernel.kernel_id == K
    child_pid = int(ready.read_text())
    attributed = Attributor("/proc").attribute([("GPU-0", ProcessSample(child_pid, GIB)),
                                                ("GPU-1", ProcessSample(proc.pid, GIB))])
    # The GPU child (`!python train.py` style) belongs to the kernel through its parent; the kernel to itself.
    assert [(p.kernel_id, p.kernel_pid, p.reason) for p in attributed] == [(K, proc.pid, ""), (K, proc.pid, "")]
    # Positive control on the host side: the same command line outside that namespace sees no such mount.
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-f",
                                str(tmp_path / "connection-spec")])
    try:
        deadline = time.monotonic() + 10
        while b"-f" not in Path(f"/proc/{outside.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert load_process("/proc", outside.pid).kernel_id is None
    finally:
        outside.kill()
        outside.wait()


# --------------------------------------------------------------------------- end to end: a real "docker" kernelspec

# Every kernel is started the way the docker kernelspec starts it, with a private mount namespace instead of a
# container: the connection file is bind-mounted at a path that names no kernel id, and the kernel reads it there.
_DOCKER_LIKE_SCRIPT = (
    'spec="$(dirname "$1")/connection-spec-$$"; : > "$spec"; '
    'exec unshare -m --propagation private sh -c \'mount --bind "$1" "$2" && exec "$3" -m ipykernel_launcher -f "$2"\''
    ' - "$1" "$spec" "$2"'
)


def _docker_like_kernelspec(root: Path) -> Path:
    spec_dir = root / "kernels" / "docker-like"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": ["/bin/sh", "-c", _DOCKER_LIKE_SCRIPT, "-", "{connection_file}", sys.executable],
        "display_name": "Python 3 (docker-like)", "language": "python",
    }))
    return root


@needs_unshare
@pytest.mark.e2e
async def test_docker_kernel_is_found_through_its_bind_mount_and_shut_down_e2e(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = _docker_like_kernelspec(tmp_path / "share")
    js: JupyterProcess = await asyncio.to_thread(start_jupyter_server, tmp_path / "js", secrets.token_hex(16),
                                                 env={"JUPYTER_PATH": str(data)})
    try:
        kid = await start_kernel(js.url, js.token, name="docker-like")
        pid = await kernel_pid(js.url, js.token, kid)
        await wait_for_state(js.url, js.token, kid, "idle")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert kid.encode() not in cmdline and b"connection-spec-" in cmdline
        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[FakeProcess(pid=pid, gpu=0, memory=4 * GIB)])
        monkeypatch.setenv("DOCKER_E2E_TOKEN", js.token)
        settings = parse_settings(f"""
mode: enforce
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: false}}
gateways: [{{name: js, url: "{js.url}", token_env: DOCKER_E2E_TOKEN}}]
policies: [{{name: docker, idle_after: 3s, warn_before: 1s, action: shutdown-kernel}}]
""")
        daemon = Daemon(settings, build_adapters(settings))
        seen: list[Any] = []
        daemon.on_cycle = lambda snap, results: seen.append((snap, list(results)))
        task = asyncio.create_task(daemon.run(serve=False))
        try:
            deadline = time.monotonic() + 60
            while not any(r.result == "success" for _, rs in seen for r in rs):
                assert time.monotonic() < deadline and not task.done(), [d.reason for s, _ in seen[-1:]
                                                                          for d in s.decisions]
                await asyncio.sleep(0.1)
        finally:
            daemon.stop()
            await asyncio.wait_for(task, 20)
        (result,) = [r for _, rs in seen for r in rs if r.result == "success"]
        assert result.decision.candidate.kernel_id == kid and result.decision.candidate.gateway == "js"
        first = seen[0][0]
        assert [p.kernel_id for d in first.decisions for p in d.candidate.processes] == [kid]
        assert not first.unattributed
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "the kernel process did not exit"
            await asyncio.sleep(0.1)
    finally:
        await shutdown_kernel(js.url, js.token, kid) if "kid" in locals() else None
        await asyncio.to_thread(js.stop)
