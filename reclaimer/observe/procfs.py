"""Read what /proc says about a process: identity (stat), pod and container (cgroup), kernel id (cmdline, or the
bind-mounted connection file in mountinfo).

Plain file reads under a ``root`` directory (``/proc`` or a test tree), no I/O libraries.
``/proc/<pid>/environ`` is never opened: it holds tokens.

The ``parse_*`` functions take file contents and raise ``ProcfsParseError`` naming the culprit on malformed
input. ``load_process`` raises ``ProcessGone`` / ``ProcessUnreadable``; ``read_process`` turns both into None
and warns once per kind of problem.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from reclaimer.core.kernelids import UUID_PATTERN, canonical_kernel_id
from reclaimer.core.model import ProcessInfo

log = structlog.get_logger(__name__)

# The initial PID namespace has this fixed inode (PROC_PID_INIT_INO) on every Linux since 3.8.
INITIAL_PID_NAMESPACE = "pid:[4026531836]"

_STAT_MAX_BYTES = 64 * 1024
_CGROUP_MAX_BYTES = 64 * 1024
_CMDLINE_MAX_BYTES = 256 * 1024  # a kernel's connection file comes early; a cut-off argument just won't match
_MOUNTINFO_MAX_BYTES = 1024 * 1024  # a container has tens of mounts; a host with thousands is cut, never misread

_HEX64 = r"[0-9a-f]{64}"
_UUID_ANY_SEP = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"
_STATIC_POD_HASH = r"[0-9a-f]{32}"  # static pods: the kubelet uses the config hash as the pod uid
_POD_SLICE_RE = re.compile(rf"^(?:.*-)?pod(?P<uid>{_UUID_ANY_SEP}|{_STATIC_POD_HASH})\.slice$")
_POD_DIR_RE = re.compile(rf"^pod(?P<uid>{_UUID_ANY_SEP}|{_STATIC_POD_HASH})$")
# crio-conmon-<id>.scope and libpod-conmon-<id>.scope are the runtime's monitor, not the container: no match.
_CONTAINER_SCOPE_RE = re.compile(rf"^(?:cri-containerd|crio|docker|libpod)-(?P<id>{_HEX64})\.scope$")
_CONTAINER_BARE_RE = re.compile(rf"^(?P<id>{_HEX64})$")
_COLON_RUNTIMES = frozenset({"cri-containerd", "crio", "docker"})  # "<pod slice>:<runtime>:<id>" (systemd driver)
_CONNECTION_FILE_RE = re.compile(rf"kernel-(?P<id>{UUID_PATTERN})\.json")
_EXISTING_FLAG = "--existing"  # `jupyter console --existing kernel-<id>.json` is a client, not the kernel
# How a kernel is told its connection file (ipykernel, IRkernel's ``-f``, traitlets' long forms).
_CONNECTION_FILE_FLAGS = (
    "-f",
    "--f",
    "--KernelApp.connection_file",
    "--IPKernelApp.connection_file",
    "--connection-file",
    "--connection_file",
)
_MOUNTINFO_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


class ProcfsParseError(ValueError):
    """A /proc file's content does not have the expected shape; the message names the file and the problem."""


class ProcfsError(Exception):
    """Reading one process failed. ``kind`` is a short, bounded problem name (for log-once and reasons)."""

    kind = "error"

    def __init__(self, pid: int, detail: str, kind: str | None = None):
        self.pid = pid
        self.detail = detail
        if kind is not None:
            self.kind = kind
        super().__init__(f"pid {pid}: {detail}")


class ProcessGone(ProcfsError):
    """The process does not exist (never did in this PID namespace, or exited: ENOENT / ESRCH)."""

    kind = "gone"


class ProcessUnreadable(ProcfsError):
    """The process exists but a file could not be read (permissions, I/O) or made no sense (``kind`` says which)."""

    kind = "unreadable"


@dataclass(frozen=True, slots=True)
class StatFields:
    pid: int
    comm: str
    ppid: int
    starttime: int  # clock ticks after boot (field 22)
    state: str


# --------------------------------------------------------------------------- log once


class LogOnce:
    """Warn once per kind of problem (not once per process per tick). Thread-safe."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warning(self, kind: str, event: str, **context: object) -> bool:
        """Log ``event`` at warning level the first time ``kind`` is seen; returns whether it logged."""
        with self._lock:
            if kind in self._seen:
                return False
            self._seen.add(kind)
        log.warning(event, problem=kind, **context, note="logged once per kind of problem")
        return True

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


_warn_once = LogOnce()


# --------------------------------------------------------------------------- parsing (pure)


def _canonical_pod_uid(raw: str) -> str:
    return raw.replace("_", "-").lower()


def _parse_cgroup_path(path: str) -> tuple[str | None, str | None]:
    """(container_id, pod_uid) named by one cgroup path; the innermost container wins (nested kind / dind)."""
    container_id: str | None = None
    pod_uid: str | None = None
    under_kubepods = False
    for component in path.split("/"):
        if not component or component in (".", ".."):  # ".." appears when read from a private cgroup namespace
            continue
        parts = component.split(":")
        if len(parts) == 3 and parts[1] in _COLON_RUNTIMES and re.fullmatch(_HEX64, parts[2]):
            slice_match = _POD_SLICE_RE.match(parts[0])
            if slice_match:
                pod_uid = _canonical_pod_uid(slice_match["uid"])
            container_id = parts[2]
            continue
        if "kubepods" in component:
            under_kubepods = True
        if (m := _POD_SLICE_RE.match(component)) or (under_kubepods and (m := _POD_DIR_RE.match(component))):
            pod_uid = _canonical_pod_uid(m["uid"])
        elif m := (_CONTAINER_SCOPE_RE.match(component) or _CONTAINER_BARE_RE.match(component)):
            container_id = m["id"]
    return container_id, pod_uid


def parse_cgroup(text: str) -> tuple[str | None, str | None]:
    """``/proc/<pid>/cgroup`` (v1, v2 or hybrid) -> (container_id, pod_uid); (None, None) for non-pod processes.

    Understands the systemd and cgroupfs drivers, containerd, cri-o, docker, nested paths and the
    ``slice:runtime:id`` form. The pod uid comes back dashed and lowercase. Raises ``ProcfsParseError`` for
    text that is not a cgroup file, or whose lines name different pods or containers (never guess).
    """
    paths: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[0].isdigit() or not fields[2].startswith("/"):
            raise ProcfsParseError(f"cgroup line {lineno} is not 'ID:CONTROLLERS:/PATH': {line[:120]!r}")
        paths.append((lineno, fields[2]))
    if not paths:
        raise ProcfsParseError("cgroup file is empty")
    parsed = [(lineno, *_parse_cgroup_path(path)) for lineno, path in paths]
    pods = {pod for _, _, pod in parsed if pod is not None}
    if len(pods) > 1:
        raise ProcfsParseError(f"cgroup lines name different pods: {', '.join(sorted(pods))}")
    pod_uid = next(iter(pods), None)
    # A line that names no pod (e.g. name=systemd pointing at an outer kind node) says nothing about the container.
    cids = {cid for _, cid, pod in parsed if cid is not None and (pod_uid is None or pod == pod_uid)}
    if len(cids) > 1:
        raise ProcfsParseError(f"cgroup lines name different containers: {', '.join(sorted(c[:12] for c in cids))}")
    return next(iter(cids), None), pod_uid


def parse_stat(text: str) -> tuple[int, str, int, int]:
    """``/proc/<pid>/stat`` -> (pid, comm, ppid, starttime). comm may hold spaces and ')': split on the last ')'."""
    fields = _parse_stat_fields(text)
    return fields.pid, fields.comm, fields.ppid, fields.starttime


def _parse_stat_fields(text: str) -> StatFields:
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 1 or close_paren < open_paren:
        raise ProcfsParseError(f"stat has no '(comm)': {text[:80]!r}")
    pid_text = text[:open_paren].strip()
    rest = text[close_paren + 1 :].split()
    if not pid_text.isdigit():
        raise ProcfsParseError(f"stat pid is not a number: {pid_text[:20]!r}")
    if len(rest) < 20:  # fields 3..22 follow the comm
        raise ProcfsParseError(f"stat has {len(rest) + 2} fields, expected at least 22")
    ppid_text, starttime_text = rest[1], rest[19]
    if not ppid_text.isdigit():
        raise ProcfsParseError(f"stat ppid (field 4) is not a number: {ppid_text[:20]!r}")
    if not starttime_text.isdigit():
        raise ProcfsParseError(f"stat starttime (field 22) is not a number: {starttime_text[:20]!r}")
    return StatFields(int(pid_text), text[open_paren + 1 : close_paren], int(ppid_text), int(starttime_text), rest[0])


def parse_cmdline(raw: bytes) -> list[str]:
    """``/proc/<pid>/cmdline`` (NUL-separated, usually NUL-terminated) -> arguments; undecodable bytes replaced."""
    if not raw:
        return []
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return [arg.decode("utf-8", errors="replace") for arg in raw.split(b"\0")]


def _connection_file_id(arg: str) -> str | None:
    basename = re.split(r"[/\\]", arg)[-1]
    m = _CONNECTION_FILE_RE.fullmatch(basename)
    return canonical_kernel_id(m["id"]) if m else None


def kernel_id_from_cmdline(args: Sequence[str]) -> str | None:
    """The kernel id named by a ``kernel-<uuid>.json`` connection file argument, lowercased; else None.

    Accepts ``-f PATH``, ``--f=PATH``, ``--KernelApp.connection_file=PATH`` and positional paths (IRkernel,
    IJulia, ...). Only canonical UUIDs count. A client's ``--existing FILE`` is not a kernel. Two different ids
    on one command line are ambiguous: None.
    """
    found: set[str] = set()
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg == _EXISTING_FLAG:
            skip_next = True
            continue
        if arg.startswith(_EXISTING_FLAG + "="):
            continue
        candidates = [arg]
        if "=" in arg:
            candidates.append(arg.split("=", 1)[1])
        for candidate in candidates:
            if kernel_id := _connection_file_id(candidate):
                found.add(kernel_id)
    return next(iter(found)) if len(found) == 1 else None


def connection_file_args(args: Sequence[str]) -> list[str]:
    """The paths a command line passes as a kernel's connection file (``-f PATH``, ``--f=PATH``,
    ``--KernelApp.connection_file=PATH``, ...), in order; a client's ``--existing FILE`` is not one."""
    out: list[str] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in _CONNECTION_FILE_FLAGS:
            continue
        if eq:
            out.append(value)
        elif i + 1 < len(args):
            out.append(args[i + 1])
    return out


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/<pid>/mountinfo``: ``root`` is the path inside its filesystem that is mounted (for a bind
    mount of a file: the host file), ``mount_point`` where the process sees it."""

    root: str
    mount_point: str
    fstype: str


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012 and \134.
    return _MOUNTINFO_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """``/proc/<pid>/mountinfo`` (proc(5)) -> mounts. Raises ``ProcfsParseError`` naming the line that is not
    ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``."""
    mounts: list[Mount] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            raise ProcfsParseError(f"mountinfo line {lineno} has no ' - ' separator: {line[:120]!r}") from None
        if (
            len(fields) < sep + 3
            or not fields[0].isdigit()
            or not fields[1].isdigit()
            or ":" not in fields[2]
            or not fields[3].startswith("/")
            or not fields[4].startswith("/")
        ):
            raise ProcfsParseError(f"mountinfo line {lineno} is not a mount: {line[:120]!r}")
        mounts.append(Mount(_unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4]), fields[sep + 1]))
    return mounts


def kernel_id_from_mounts(args: Sequence[str], mounts: Sequence[Mount]) -> str | None:
    """The kernel id of a process started with a connection file that is a bind mount of a host file named
    ``kernel-<uuid>.json`` (a docker/podman kernel: ``docker run -v {connection_file}:/connection-spec ...
    ipykernel_launcher -f /connection-spec``). The mount must sit exactly at the path the command line passes,
    and that path must be absolute; two different ids, or none, give None."""
    wanted = {a for a in connection_file_args(args) if a.startswith("/")}
    found = {kid for m in mounts if m.mount_point in wanted and (kid := _connection_file_id(m.root))}
    return next(iter(found)) if len(found) == 1 else None


def _needs_mountinfo(args: Sequence[str]) -> bool:
    """Whether a process's mounts could name its kernel: it passes an absolute connection file that is not itself
    named ``kernel-<uuid>.json``. Only such processes pay for reading mountinfo."""
    return any(a.startswith("/") and _connection_file_id(a) is None for a in connection_file_args(args))


# --------------------------------------------------------------------------- reading


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive integer, got {pid!r}")


def _open_process_dir(root: str | Path, pid: int) -> int:
    try:
        return os.open(os.path.join(root, str(pid)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _classify(pid, "directory", exc) from None


def _classify(pid: int, name: str, exc: OSError) -> ProcfsError:
    if exc.errno in (errno.ENOENT, errno.ESRCH, errno.ENOTDIR):
        return ProcessGone(pid, f"{name}: {os.strerror(exc.errno)}")
    return ProcessUnreadable(pid, f"cannot read {name}: {exc.strerror or exc}", kind=f"unreadable-{name}")


def _read_at(dir_fd: int, name: str, limit: int) -> bytes:
    """Read up to ``limit`` bytes of ``name`` relative to an open /proc/<pid> directory."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_text(dir_fd: int, pid: int, name: str, limit: int) -> str:
    try:
        return _read_at(dir_fd, name, limit).decode("utf-8", errors="replace")
    except OSError as exc:
        raise _classify(pid, name, exc) from None


def load_stat(root: str | Path, pid: int) -> StatFields:
    """Fresh (pid, comm, ppid, starttime, state) of one process. Raises ``ProcessGone`` / ``ProcessUnreadable``."""
    _check_pid(pid)
    dir_fd = _open_process_dir(root, pid)
    try:
        return _stat_at(dir_fd, pid)
    finally:
        os.close(dir_fd)


def _stat_at(dir_fd: int, pid: int) -> StatFields:
    text = _read_text(dir_fd, pid, "stat", _STAT_MAX_BYTES)
    try:
        fields = _parse_stat_fields(text)
    except ProcfsParseError as exc:
        raise ProcessUnreadable(pid, f"stat: {exc}", kind="bad-stat") from None
    if fields.pid != pid:
        raise ProcessUnreadable(pid, f"stat names pid {fields.pid}", kind="bad-stat")
    return fields


def load_process(root: str | Path, pid: int) -> ProcessInfo:
    """Everything /proc says about ``pid``, read through one directory handle so every file is the same process.

    Raises ``ProcessGone`` (ENOENT/ESRCH, also mid-read) or ``ProcessUnreadable`` (with a ``kind``).
    """
    _check_pid(pid)
    dir_fd = _open_process_dir(root, pid)
    try:
        stat = _stat_at(dir_fd, pid)
        try:
            cmdline = _read_at(dir_fd, "cmdline", _CMDLINE_MAX_BYTES)
        except OSError as exc:
            raise _classify(pid, "cmdline", exc) from None
        cgroup_text = _read_text(dir_fd, pid, "cgroup", _CGROUP_MAX_BYTES)
        args = parse_cmdline(cmdline)
        kernel_id = kernel_id_from_cmdline(args)
        mountinfo_text = (
            _read_text(dir_fd, pid, "mountinfo", _MOUNTINFO_MAX_BYTES)
            if kernel_id is None and _needs_mountinfo(args)
            else None
        )
    finally:
        os.close(dir_fd)
    try:
        container_id, pod_uid = parse_cgroup(cgroup_text)
    except ProcfsParseError as exc:
        raise ProcessUnreadable(pid, f"cgroup: {exc}", kind="bad-cgroup") from None
    if mountinfo_text is not None:
        try:
            kernel_id = kernel_id_from_mounts(args, parse_mountinfo(mountinfo_text))
        except ProcfsParseError as exc:
            raise ProcessUnreadable(pid, f"mountinfo: {exc}", kind="bad-mountinfo") from None
    return ProcessInfo(
        pid=stat.pid,
        ppid=stat.ppid,
        starttime=stat.starttime,
        comm=stat.comm,
        container_id=container_id,
        pod_uid=pod_uid,
        kernel_id=kernel_id,
    )


def read_process(root: str | Path, pid: int, *, warn: LogOnce | None = None) -> ProcessInfo | None:
    """``load_process`` that returns None when the process is gone or unreadable (warned once per kind)."""
    try:
        return load_process(root, pid)
    except ProcessGone:
        return None
    except ProcessUnreadable as exc:
        (warn or _warn_once).warning(
            exc.kind, "cannot use a process's /proc files", pid=pid, detail=exc.detail, procfs_root=str(root)
        )
        return None


def in_initial_pid_namespace(root: str | Path) -> bool | None:
    """Whether ``root`` shows the initial (host) PID namespace: True, False, or None when it cannot be told."""
    try:
        return os.readlink(os.path.join(root, "self", "ns", "pid")) == INITIAL_PID_NAMESPACE
    except OSError:
        return None


# --------------------------------------------------------------------------- listening sockets (JupyterHub servers)

_TCP_LISTEN = "0A"


def parse_listening_sockets(text: str, ipv6: bool) -> dict[int, tuple[str, int]]:
    """``/proc/<pid>/net/tcp`` (or ``tcp6``) text -> {socket inode: (IP, port)} of the sockets in LISTEN state."""
    import ipaddress

    out: dict[int, tuple[str, int]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN:
            continue
        try:
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed) if len(packed) in (4, 16) else None
            inode = int(fields[9])
            port = int(hex_port, 16)
        except ValueError:
            continue
        if ip is None or inode <= 0 or (ip.version == 6) != ipv6:
            continue
        out[inode] = (str(ip), port)
    return out


def listening_addresses(root: str | Path, pid: int) -> list[tuple[str, int]]:
    """The TCP (IP, port) pairs process ``pid`` itself listens on, seen in its own network namespace.

    Raises ``ProcessGone`` / ``ProcessUnreadable``; [] when it listens on nothing.
    """
    _check_pid(pid)
    base = os.path.join(root, str(pid))
    try:
        fds = os.listdir(os.path.join(base, "fd"))
    except OSError as exc:
        raise _classify(pid, "fd", exc) from None
    inodes: set[int] = set()
    for fd in fds[:65536]:
        try:
            target = os.readlink(os.path.join(base, "fd", fd))
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[8:-1]))
    found: dict[int, tuple[str, int]] = {}
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(os.path.join(base, "net", name), encoding="ascii", errors="replace") as fh:
                found.update(parse_listening_sockets(fh.read(4 * 1024 * 1024), ipv6))
        except FileNotFoundError:
            continue  # no IPv6
        except OSError as exc:
            raise _classify(pid, f"net/{name}", exc) from None
    return sorted({found[i] for i in inodes if i in found})


def same_network_namespace(root: str | Path, pid: int) -> bool:
    """Whether ``pid`` shares this process's network namespace (so its loopback address is ours)."""
    try:
        return os.readlink(os.path.join(root, str(pid), "ns", "net")) == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def ancestors(root: str | Path, pid: int, depth: int) -> list[int]:
    """``pid``'s parent, grandparent, ... (at most ``depth``), stopping at init or at a process that is gone."""
    out: list[int] = []
    current = pid
    for _ in range(depth):
        try:
            ppid = load_stat(root, current).ppid
        except ProcfsError:
            break
        if ppid <= 1:
            break
        out.append(ppid)
        current = ppid
    return out
