"""The replay trace format, version 1: what users did, independent of how the cluster runs their kernels.

A trace is a UTF-8 JSON-lines file. The first line is the header, every other line one record; records are
sorted by ``t`` (seconds since the header's ``start``, non-decreasing). A trace says what the users *meant* to
do; the simulator decides what actually happens when a strategy shuts something down (a killed kernel stays dead
until its user next touches it, and its later GPU records only count once it is running again).

Header::

    {"format": "gpu-reclaimer-replay-trace", "version": 1, "start": "2026-11-30T00:00:00Z",
     "duration": 604800, "description": "...", "generator": {...} or null}

Records (``ev`` names the kind; ids are free text except kernel ids, which are canonical UUIDs as Jupyter's)::

    {"t": 32400, "ev": "server_start", "server": "alice", "user": "alice", "gpus": 1, "gpu_memory": 85899345920}
    {"t": 32410, "ev": "tab", "server": "alice", "open": true}         browser tab opened (user) or closed
    {"t": 32415, "ev": "kernel_start", "kernel": "<uuid>", "server": "alice", "name": "python3", "gpu": true}
    {"t": 32420, "ev": "cell", "kernel": "<uuid>", "duration": 1800, "output_every": 60}   a cell runs (busy);
                                 output_every: seconds between outputs while it runs, null for a silent cell
    {"t": 32420, "ev": "gpu", "kernel": "<uuid>", "proc": "main", "util": 0.9, "mem": 12884901888}
                                 a GPU process of the kernel ("main": the kernel itself; any other name: a child
                                 process it started) has this SM utilisation (0..1) and memory from t on;
                                 mem 0 ends the process
    {"t": 70000, "ev": "reconnect", "server": "alice"}   the open tab's websockets dropped and came back (automatic)
    {"t": 90000, "ev": "kernel_stop", "kernel": "<uuid>"}   the user shut the kernel down
    {"t": 99000, "ev": "server_stop", "server": "alice"}    the user stopped the server

``gpus`` is what the user's profile asks for: the notebook pod's GPUs when kernels run inside it, or what each
``gpu: true`` kernel's own pod gets when kernels run as pods. User-initiated records (``server_start``,
``kernel_start``, ``cell``, ``tab`` with open true) are what "the user came back" means.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

FORMAT = "gpu-reclaimer-replay-trace"
VERSION = 1
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$")
MAX_GPUS = 8


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class Header:
    start: float  # POSIX seconds of t = 0
    duration: float
    description: str = ""
    generator: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ServerStart:
    t: float
    server: str
    user: str
    gpus: int
    gpu_memory: int
    ev: str = "server_start"


@dataclass(frozen=True, slots=True)
class ServerStop:
    t: float
    server: str
    ev: str = "server_stop"


@dataclass(frozen=True, slots=True)
class Tab:
    t: float
    server: str
    open: bool
    ev: str = "tab"


@dataclass(frozen=True, slots=True)
class Reconnect:
    t: float
    server: str
    ev: str = "reconnect"


@dataclass(frozen=True, slots=True)
class KernelStart:
    t: float
    kernel: str
    server: str
    name: str
    gpu: bool
    ev: str = "kernel_start"


@dataclass(frozen=True, slots=True)
class KernelStop:
    t: float
    kernel: str
    ev: str = "kernel_stop"


@dataclass(frozen=True, slots=True)
class Cell:
    t: float
    kernel: str
    duration: float
    output_every: float | None
    ev: str = "cell"


@dataclass(frozen=True, slots=True)
class Gpu:
    t: float
    kernel: str
    proc: str
    util: float
    mem: int
    ev: str = "gpu"


Record = ServerStart | ServerStop | Tab | Reconnect | KernelStart | KernelStop | Cell | Gpu
USER_INITIATED = (ServerStart, KernelStart, Cell)  # plus Tab(open=True)


def user_initiated(r: Record) -> bool:
    return isinstance(r, USER_INITIATED) or (isinstance(r, Tab) and r.open)


@dataclass
class Trace:
    header: Header
    records: list[Record] = field(default_factory=list)

    @property
    def users(self) -> list[str]:
        return sorted({r.user for r in self.records if isinstance(r, ServerStart)})


# --------------------------------------------------------------------------- reading


_KINDS: dict[str, tuple[type, dict[str, tuple[type, ...]]]] = {
    "server_start": (ServerStart, {"server": (str,), "user": (str,), "gpus": (int,), "gpu_memory": (int,)}),
    "server_stop": (ServerStop, {"server": (str,)}),
    "tab": (Tab, {"server": (str,), "open": (bool,)}),
    "reconnect": (Reconnect, {"server": (str,)}),
    "kernel_start": (KernelStart, {"kernel": (str,), "server": (str,), "name": (str,), "gpu": (bool,)}),
    "kernel_stop": (KernelStop, {"kernel": (str,)}),
    "cell": (Cell, {"kernel": (str,), "duration": (int, float), "output_every": (int, float, type(None))}),
    "gpu": (Gpu, {"kernel": (str,), "proc": (str,), "util": (int, float), "mem": (int,)}),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_start(value: Any, where: str) -> float:
    if _number(value):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    raise TraceError(f"{where}: start must be an ISO 8601 time or POSIX seconds, got {value!r}")


def _header(obj: Any, where: str) -> Header:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TraceError(f"{where}: not a replay trace (the first line must be a header with format {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise TraceError(f"{where}: trace version {obj.get('version')!r} is not supported (this reader knows {VERSION})")
    duration = obj.get("duration")
    if not _number(duration) or duration <= 0:
        raise TraceError(f"{where}: duration must be a positive number of seconds, got {duration!r}")
    generator = obj.get("generator")
    if generator is not None and not isinstance(generator, dict):
        raise TraceError(f"{where}: generator must be an object or null")
    return Header(_parse_start(obj.get("start"), where), float(duration), str(obj.get("description", "")), generator)


def _record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: a record must be a JSON object")
    ev = obj.get("ev")
    if ev not in _KINDS:
        raise TraceError(f"{where}: unknown ev {ev!r} (one of {', '.join(sorted(_KINDS))})")
    cls, fields = _KINDS[ev]
    t = obj.get("t")
    if not _number(t) or t < 0:
        raise TraceError(f"{where}: {ev}.t must be a non-negative number, got {t!r}")
    unknown = set(obj) - set(fields) - {"t", "ev"}
    if unknown:
        raise TraceError(f"{where}: {ev} has unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {"t": float(t)}
    for name, types in fields.items():
        if name not in obj:
            raise TraceError(f"{where}: {ev} lacks {name!r}")
        value = obj[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise TraceError(f"{where}: {ev}.{name} has the wrong type ({value!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise TraceError(f"{where}: {ev}.{name} is not finite")
        values[name] = value
    problem = _check(ev, values)
    if problem:
        raise TraceError(f"{where}: {ev}.{problem}")
    return cls(**values)


def _check(ev: str, v: dict[str, Any]) -> str | None:
    for key in ("server", "user"):
        if key in v and not _NAME.match(v[key]):
            return f"{key} {v[key]!r} is not a valid name ([A-Za-z0-9._@-], at most 63 characters)"
    if "kernel" in v and not _UUID.match(v["kernel"]):
        return f"kernel {v['kernel']!r} is not a canonical lower-case UUID"
    if ev == "server_start" and not 0 <= v["gpus"] <= MAX_GPUS:
        return f"gpus must be 0..{MAX_GPUS}, got {v['gpus']}"
    if ev == "server_start" and v["gpu_memory"] <= 0:
        return f"gpu_memory must be positive bytes, got {v['gpu_memory']}"
    if ev == "cell" and not v["duration"] >= 0:
        return f"duration must be >= 0, got {v['duration']}"
    if ev == "cell" and v["output_every"] is not None and not v["output_every"] > 0:
        return f"output_every must be positive or null, got {v['output_every']}"
    if ev == "gpu" and not 0.0 <= v["util"] <= 1.0:
        return f"util must be a ratio 0..1, got {v['util']}"
    if ev == "gpu" and v["mem"] < 0:
        return f"mem must be >= 0 bytes, got {v['mem']}"
    return None


def parse(lines: Iterable[str], source: str = "<trace>") -> Trace:
    """A validated trace. Raises TraceError naming the source, the line and the field."""
    header: Header | None = None
    records: list[Record] = []
    servers: dict[str, ServerStart] = {}
    kernels: dict[str, str] = {}
    last_t = 0.0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON ({exc.msg})") from None
        if header is None:
            header = _header(obj, where)
            continue
        r = _record(obj, where)
        if r.t < last_t:
            raise TraceError(f"{where}: records must be sorted by t ({r.t} after {last_t})")
        if r.t > header.duration:
            raise TraceError(f"{where}: t {r.t} is after the trace's duration {header.duration}")
        last_t = r.t
        if isinstance(r, ServerStart):
            known = servers.get(r.server)
            if known is not None and known.user != r.user:
                raise TraceError(f"{where}: server {r.server!r} belonged to user {known.user!r}, not {r.user!r}")
            servers[r.server] = r
        elif isinstance(r, KernelStart):
            if r.server not in servers:
                raise TraceError(f"{where}: kernel {r.kernel} starts in server {r.server!r} before it ever started")
            if r.kernel in kernels:
                raise TraceError(f"{where}: kernel {r.kernel} started twice (kernel ids are never reused)")
            kernels[r.kernel] = r.server
        elif isinstance(r, (KernelStop, Cell, Gpu)):
            if r.kernel not in kernels:
                raise TraceError(f"{where}: {r.ev} for kernel {r.kernel} before its kernel_start")
        elif r.server not in servers:
            raise TraceError(f"{where}: {r.ev} for server {r.server!r} before its first server_start")
        records.append(r)
    if header is None:
        raise TraceError(f"{source}: empty trace (no header line)")
    return Trace(header, records)


def load(path: str | Path) -> Trace:
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        return parse(f, str(p))


# --------------------------------------------------------------------------- writing


def _header_json(h: Header) -> dict[str, Any]:
    start = datetime.fromtimestamp(h.start, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"format": FORMAT, "version": VERSION, "start": start, "duration": h.duration,
            "description": h.description, "generator": dict(h.generator) if h.generator is not None else None}


def record_json(r: Record) -> dict[str, Any]:
    d = asdict(r)
    ev = d.pop("ev")
    t = d.pop("t")
    return {"t": round(t, 3), "ev": ev, **d}


def lines(trace: Trace) -> Iterator[str]:
    yield json.dumps(_header_json(trace.header), sort_keys=False)
    for r in trace.records:
        yield json.dumps(record_json(r), sort_keys=False)


def dump(trace: Trace, out: TextIO) -> None:
    for line in lines(trace):
        out.write(line + "\n")


def save(trace: Trace, path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        dump(trace, f)
