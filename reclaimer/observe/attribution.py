"""GPU process -> pod -> Jupyter kernel, read from a procfs root directory (/proc or a test tree) through procfs.

A GPU process belongs to the first process up its parent chain whose cmdline names a ``kernel-<uuid>.json``
connection file (the kernel itself, or e.g. ``!python train.py`` and its DataLoader workers), or whose connection file
is a bind mount of a host ``kernel-<uuid>.json`` (a docker/podman kernel: ``procfs.kernel_id_from_mounts``). The walk
never crosses a pod or container boundary. A kernel pod (Enterprise Gateway, elastic-jupyter-operator) may name
its kernel through a ``kernel_id`` pod label instead. Anything else comes out unattributed with a reason:
never a guess.

Identity is (pid, starttime): what /proc says about an identity is parsed once and cached; every call still
re-reads each walked process's ``stat``, so PID reuse and re-parenting are seen at once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import structlog

from reclaimer.core.kernelids import canonical_kernel_id
from reclaimer.core.model import AttributedProcess, ProcessInfo, ProcessSample
from reclaimer.observe import procfs

log = structlog.get_logger(__name__)

Identity = tuple[int, int]  # (pid, starttime)
# A process that started this much after the sample that listed its pid is another process (the pid was reused).
# Boot time from /proc/uptime (10 ms) and starttime (1 tick) are both that precise; a real GPU process needs far longer
# than this between starting and being listed (it must first create a CUDA context).
PID_REUSE_TOLERANCE = 0.05


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why a pid could not be read this call."""

    pid: int
    gone: bool
    kind: str
    detail: str


@dataclass(slots=True)
class _CacheEntry:
    info: ProcessInfo
    last_seen_call: int


@dataclass(frozen=True, slots=True)
class _Chain:
    kernel_id: str | None
    kernel_pid: int | None
    reason: str


class Attributor:
    """Attributes GPU processes to kernels through /proc; keeps a bounded per-identity cache between calls.

    ``cache_size``, ``parsed_total`` (identities fully parsed) and ``cache_hits_total`` (identities served from
    the cache) let a benchmark compare cold and warm calls. Safe to call from one thread at a time (serialised).
    """

    def __init__(
        self,
        procfs_root: str | Path = "/proc",
        max_depth: int = 32,
        *,
        evict_after_calls: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be a positive integer, got {max_depth!r}")
        if isinstance(evict_after_calls, bool) or not isinstance(evict_after_calls, int) or evict_after_calls < 1:
            raise ValueError(f"evict_after_calls must be a positive integer, got {evict_after_calls!r}")
        if not os.path.isdir(procfs_root):
            raise ValueError(f"procfs_root {str(procfs_root)!r} is not a directory")
        self.procfs_root = str(procfs_root)
        self.max_depth = max_depth
        self.evict_after_calls = evict_after_calls
        self.parsed_total = 0
        self.cache_hits_total = 0
        self._cache: dict[Identity, _CacheEntry] = {}
        self._calls = 0
        self._lock = threading.Lock()
        self._warn = procfs.LogOnce()
        self._initial_pid_ns: bool | None = procfs.in_initial_pid_namespace(self.procfs_root)
        self._log = log.bind(procfs_root=self.procfs_root)
        self._clock = clock
        self._ticks = _clock_ticks()

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def attribute(
        self,
        processes: Iterable[tuple[str, ProcessSample]],
        pod_kernel_ids: Mapping[str, str] | None = None,
        listed_at: Mapping[str, float] | None = None,
    ) -> list[AttributedProcess]:
        """One ``AttributedProcess`` per (gpu_uuid, ProcessSample) input, in input order.

        ``pod_kernel_ids`` maps pod uid -> the pod's ``kernel_id`` label; it names the kernel of a process in
        that pod when no connection file is found up its chain (a conflicting connection file wins nothing:
        the process stays unattributed). ``listed_at`` maps GPU uuid -> when the sample listing its processes was
        taken: a process that started after that is not the one listed (its pid was reused in between) and stays
        unattributed (invariant 19). Raises TypeError naming the culprit for malformed input.
        """
        items = _validated(processes)
        labels = dict(pod_kernel_ids or {})
        with self._lock:
            self._calls += 1
            call = _Call(self, self._boot_time())
            out = [call.attribute_one(uuid, sample, labels, (listed_at or {}).get(uuid)) for uuid, sample in items]
            self._evict()
        self._log.debug(
            "attributed GPU processes",
            processes=len(out),
            attributed=sum(1 for p in out if p.kernel_id),
            parsed_total=self.parsed_total,
            cache_hits_total=self.cache_hits_total,
            cache_size=self.cache_size,
        )
        return out

    def _boot_time(self) -> float | None:
        """When this procfs root's machine booted, on our clock (now minus ``uptime``), to turn starttime ticks into
        wall-clock time; None (logged once) when unreadable."""
        try:
            with open(os.path.join(self.procfs_root, "uptime"), encoding="ascii") as fh:
                uptime = float(fh.read(64).split()[0])
        except (OSError, ValueError, IndexError) as exc:
            self._warn.warning(
                "uptime", "cannot read uptime: process start times (pid reuse) are not checked", error=str(exc)
            )
            return None
        return self._clock() - uptime if self._ticks else None

    # ------------------------------------------------------------------ cache

    def _lookup(self, pid: int) -> ProcessInfo | _Failure:
        """Fresh identity from stat; the rest from the cache, or parsed when the identity is new."""
        try:
            stat = procfs.load_stat(self.procfs_root, pid)
            entry = self._cache.get((pid, stat.starttime))
            if entry is not None:
                self.cache_hits_total += 1
                entry.last_seen_call = self._calls
                if entry.info.ppid != stat.ppid:  # re-parented since (its parent exited)
                    entry.info = replace(entry.info, ppid=stat.ppid)
                return entry.info
            info = procfs.load_process(self.procfs_root, pid)
        except procfs.ProcessGone as exc:
            return _Failure(pid, True, exc.kind, exc.detail)
        except procfs.ProcessUnreadable as exc:
            self._warn.warning(exc.kind, "cannot use a process's /proc files", pid=pid, detail=exc.detail)
            return _Failure(pid, False, exc.kind, exc.detail)
        self.parsed_total += 1
        self._cache[(info.pid, info.starttime)] = _CacheEntry(info, self._calls)
        return info

    def _evict(self) -> None:
        stale = [key for key, e in self._cache.items() if self._calls - e.last_seen_call >= self.evict_after_calls]
        for key in stale:
            del self._cache[key]

    def _missing_reason(self) -> str:
        if self._initial_pid_ns is True:
            return "process exited"
        if self._initial_pid_ns is False:
            self._warn.warning(
                "not-host-pid-namespace",
                "GPU process pids are not visible: procfs_root is not the host PID namespace (is hostPID enabled?)",
            )
            return "pid not visible (is hostPID enabled?)"
        return "process exited or pid not visible (is hostPID enabled?)"


class _Call:
    """State of one ``attribute`` call: each pid is read once, each identity's chain is walked once."""

    def __init__(self, attributor: Attributor, boot_time: float | None = None) -> None:
        self.a = attributor
        self.boot_time = boot_time
        self.infos: dict[int, ProcessInfo | _Failure] = {}
        self.chains: dict[Identity, _Chain] = {}

    def lookup(self, pid: int) -> ProcessInfo | _Failure:
        if pid not in self.infos:
            self.infos[pid] = self.a._lookup(pid)
        return self.infos[pid]

    def attribute_one(
        self, gpu_uuid: str, sample: ProcessSample, labels: Mapping[str, str], listed_at: float | None = None
    ) -> AttributedProcess:
        base = AttributedProcess(
            pid=sample.pid,
            starttime=None,
            gpu_uuid=gpu_uuid,
            used_memory_bytes=sample.used_memory_bytes,
            sm_utilization=sample.sm_utilization,
        )
        if isinstance(sample.pid, bool) or not isinstance(sample.pid, int) or sample.pid <= 0:
            return replace(base, reason=f"invalid pid {sample.pid!r} reported for this GPU")
        info = self.lookup(sample.pid)
        if isinstance(info, _Failure):
            reason = self.a._missing_reason() if info.gone else f"process unreadable ({info.kind}: {info.detail})"
            return replace(base, reason=reason)
        started_at = None  # dated only where the caller asks for the pid-reuse check
        if listed_at is not None and self.boot_time is not None and self.a._ticks:
            started_at = self.boot_time + info.starttime / self.a._ticks
        base = replace(
            base, starttime=info.starttime, pod_uid=info.pod_uid, container_id=info.container_id, started_at=started_at
        )
        if started_at is not None and listed_at is not None and started_at > listed_at + PID_REUSE_TOLERANCE:
            return replace(
                base,
                reason=f"pid {sample.pid} was reused: the process there now started at "
                f"{_clock_text(started_at)}, after the GPU sample of {_clock_text(listed_at)} "
                f"listed that pid",
            )
        identity = (info.pid, info.starttime)
        if identity not in self.chains:
            self.chains[identity] = self.walk(info)
        chain = _with_pod_label(self.chains[identity], info, labels)
        return replace(base, kernel_id=chain.kernel_id, kernel_pid=chain.kernel_pid, reason=chain.reason)

    def walk(self, start: ProcessInfo) -> _Chain:
        """Up the parent chain from ``start`` to the first process naming a kernel connection file."""
        if start.kernel_id is not None:
            return _Chain(start.kernel_id, start.pid, "")
        visited = {start.pid}
        child = start
        for examined in range(self.a.max_depth):
            if child.ppid == 0 or child.pid == 1:
                return _Chain(None, None, f"no kernel connection file among {examined} ancestors")
            parent = self.lookup(child.ppid)
            if isinstance(parent, _Failure):
                what = "exited" if parent.gone else f"unreadable ({parent.kind})"
                return _Chain(None, None, f"ancestor pid {child.ppid} {what} during the walk")
            if parent.pid in visited:
                return _Chain(None, None, f"parent chain has a cycle at pid {parent.pid}")
            if parent.starttime > child.starttime:  # a parent never starts after its child: the pid was reused
                return _Chain(None, None, f"ancestor pid {parent.pid} was replaced by a newer process during the walk")
            if parent.pod_uid != start.pod_uid:
                return _Chain(
                    None,
                    None,
                    f"no kernel connection file among {examined} ancestors; "
                    f"parent chain crosses pod boundary at pid {parent.pid}",
                )
            if start.container_id is not None and parent.container_id != start.container_id:
                return _Chain(
                    None,
                    None,
                    f"no kernel connection file among {examined} ancestors; "
                    f"parent chain crosses container boundary at pid {parent.pid}",
                )
            if parent.kernel_id is not None:
                return _Chain(parent.kernel_id, parent.pid, "")
            visited.add(parent.pid)
            child = parent
        if child.ppid == 0 or child.pid == 1:
            return _Chain(None, None, f"no kernel connection file among {self.a.max_depth} ancestors")
        return _Chain(None, None, f"no kernel connection file among {self.a.max_depth} ancestors (max_depth reached)")


def _clock_ticks() -> int | None:
    """Clock ticks per second (``starttime``'s unit); None when the system will not say."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return None
    return ticks if ticks > 0 else None


def _clock_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S.%f")[:-4] + " UTC"


def _with_pod_label(chain: _Chain, info: ProcessInfo, labels: Mapping[str, str]) -> _Chain:
    """Apply the pod's ``kernel_id`` label when the process is in a kernel pod."""
    if info.pod_uid is None or info.pod_uid not in labels:
        return chain
    label = canonical_kernel_id(str(labels[info.pod_uid]))
    if label is None:
        if chain.kernel_id is not None:
            return chain
        return _Chain(None, None, f"{chain.reason}; pod label kernel_id {labels[info.pod_uid]!r} is not a UUID")
    if chain.kernel_id is None:
        return _Chain(label, None, "")
    if chain.kernel_id != label:
        return _Chain(
            None,
            None,
            f"kernel connection file names kernel {chain.kernel_id} but the pod's kernel_id label names {label}",
        )
    return chain


def _validated(processes: Iterable[tuple[str, ProcessSample]]) -> list[tuple[str, ProcessSample]]:
    items: list[tuple[str, ProcessSample]] = []
    for index, item in enumerate(processes):
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"processes[{index}] must be a (gpu_uuid, ProcessSample) pair, got {type(item).__name__}")
        uuid, sample = item
        if not isinstance(uuid, str):
            raise TypeError(f"processes[{index}]: gpu_uuid must be a str, got {type(uuid).__name__}")
        if not isinstance(sample, ProcessSample):
            raise TypeError(f"processes[{index}]: expected a ProcessSample, got {type(sample).__name__}")
        items.append((uuid, sample))
    return items
