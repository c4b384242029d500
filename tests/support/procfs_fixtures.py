"""Builders of fake /proc trees, and helpers for tests that use the real /proc (procfs / attribution tests).

A fake tree holds, per pid, ``stat`` (52 fields, real shape), ``cmdline`` (NUL-separated), ``cgroup`` and an
``environ`` full of secrets that must never be opened. ``self/ns/pid`` can say which PID namespace it shows.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from reclaimer.observe.procfs import INITIAL_PID_NAMESPACE

SAMPLES = Path(__file__).parent / "proc"
SECRET = "s3cr3t-jupyter-token-do-not-log"
OTHER_PID_NAMESPACE = "pid:[4026532555]"
HOST_CGROUP = "0::/system.slice/containerd.service\n"


def kernel_cmdline(kernel_id: str, style: str = "-f") -> list[str]:
    """An ipykernel command line naming ``kernel-<kernel_id>.json`` the way Jupyter launches it."""
    path = f"/home/jovyan/.local/share/jupyter/runtime/kernel-{kernel_id}.json"
    if style == "-f":
        return ["/opt/conda/bin/python", "-m", "ipykernel_launcher", "-f", path]
    return ["/opt/conda/bin/python", "-m", "ipykernel_launcher", f"{style}={path}"]


def pod_cgroup(pod_uid: str, container_id: str) -> str:
    """cgroup v2, systemd driver, containerd: the shape on EKS AL2023 / AKS Ubuntu 22.04 / GKE COS."""
    slice_uid = pod_uid.replace("-", "_")
    return (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{container_id}.scope\n"
    )


def stat_line(pid: int, comm: str, ppid: int, starttime: int, state: str = "S") -> str:
    """A /proc/<pid>/stat line with all 52 fields, starttime in field 22."""
    after_comm = [state, str(ppid), str(pid), str(pid), "0", "-1", "4194560", "1234", "0", "5", "0",
                  "12", "3", "0", "0", "20", "0", "1", "0", str(starttime), "12345678", "2048",
                  "18446744073709551615", "1", "1", "0", "0", "0", "0", "0", "16781312", "17","0", "0",
                  "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"]
    return f"{pid} ({comm}) {' '.join(after_comm)}\n"


@dataclass
class FakeProc:
    """A fake procfs root. ``add`` writes one process; everything else edits or breaks it."""

    root: Path
    pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # A machine up for ~11.6 days: process start times (boot time + starttime ticks) lie in the past.
        self.root.mkdir(parents=True, exist_ok=True)
        self.set_uptime(1_000_000.0)

    def set_uptime(self, seconds: float) -> None:
        """``/proc/uptime``: with the clock, it dates each process's start (pid reuse is checked against it)."""
        (self.root / "uptime").write_text(f"{seconds:.2f} 0.00\n")

    def add(
        self,
        pid: int,
        *,
        ppid: int = 1,
        cmdline: Sequence[str] = ("python",),
        comm: str | None = None,
        cgroup: str = HOST_CGROUP,
        starttime: int = 100,
    ) -> Path:
        d = self.root / str(pid)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        name = comm if comm is not None else (os.path.basename(cmdline[0])[:15] if cmdline else "kworker/0:1")
        (d / "stat").write_text(stat_line(pid, name, ppid, starttime))
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
        (d / "cgroup").write_text(cgroup)
        (d / "environ").write_bytes(f"JUPYTER_TOKEN={SECRET}\0HOME=/root\0".encode())
        self.pids.add(pid)
        return d

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))
        self.pids.discard(pid)

    def write(self, pid: int, name: str, content: str | bytes) -> None:
        path = self.root / str(pid) / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    def set_pid_namespace(self, link: str) -> None:
        ns = self.root / "self" / "ns"
        ns.mkdir(parents=True, exist_ok=True)
        target = ns / "pid"
        if target.is_symlink():
            target.unlink()
        target.symlink_to(link)  # dangling, like the real magic link when read with readlink

    def host_init(self) -> None:
        """pid 1 = systemd in the host PID namespace."""
        self.set_pid_namespace(INITIAL_PID_NAMESPACE)
        self.add(1, ppid=0, cmdline=["/sbin/init", "splash"], comm="systemd", cgroup="0::/init.scope\n", starttime=1)


# --------------------------------------------------------------------------- "environ is never opened"


_recorders: list[list[str]] = []
_recorders_lock = threading.Lock()
_hook_installed = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _recorders and args:
        path = args[0]
        name = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        with _recorders_lock:
            for rec in _recorders:
                rec.append(name)


@contextmanager
def recording_opens() -> Iterator[list[str]]:
    """Every path opened (builtins.open, os.open, ...) in this process while inside, via an audit hook."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)  # audit hooks cannot be removed: one for the session, gated by _recorders
        _hook_installed = True
    opened: list[str] = []
    with _recorders_lock:
        _recorders.append(opened)
    try:
        yield opened
    finally:
        with _recorders_lock:
            _recorders.remove(opened)


# --------------------------------------------------------------------------- real processes


def real_starttime(pid: int) -> int | None:
    """Starttime of a live pid from the real /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2 :].split()[19])


def kill_if_same(pid: int, starttime: int | None) -> None:
    """SIGKILL ``pid`` only if it is still the process we started (same starttime): never a reused pid."""
    if starttime is not None and real_starttime(pid) == starttime:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
