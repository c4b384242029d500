"""The report: one decide cycle as JSON (``/report``, ``reclaimer report -o json``) and as a kubectl-like table.

Pure: renders a ``CycleSnapshot`` (or a report dict read back from a daemon); the views it shares with the metrics
are in ``reclaimer.core.views``. Unknown values stay ``None`` / JSON null, never 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from reclaimer.core import actionkinds
from reclaimer.core.errors import ReclaimerError
from reclaimer.core.model import (
    AttributedProcess,
    BreakerStatus,
    Candidate,
    CycleSnapshot,
    Decision,
    PodInfo,
    Recovers,
    SamplerSnapshot,
    Verdict,
)
from reclaimer.core.views import candidate_user, finite, kernel_gpu_usage

VERDICTS: tuple[str, ...] = tuple(v.value for v in Verdict)
RECOVERS: tuple[str, ...] = tuple(r.value for r in Recovers)
NOT_ATTRIBUTED_YET = "not attributed yet (appeared after the last decide cycle)"

_GIB = 1024**3
_MIB = 1024**2
_KIB = 1024


# --------------------------------------------------------------------------- JSON


def rfc3339(ts: float | datetime | None) -> str | None:
    """POSIX seconds or a datetime (naive = UTC) -> ``2024-05-01T12:00:00Z``; ``None`` stays ``None``."""
    if ts is None or (isinstance(ts, float) and not math.isfinite(ts)):
        return None
    if isinstance(ts, datetime):
        dt = ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)
    else:
        dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _pods_by_uid(snap: CycleSnapshot) -> dict[str, PodInfo]:
    return {d.candidate.pod.uid: d.candidate.pod for d in snap.decisions if d.candidate.pod is not None}


def _process_entry(proc: AttributedProcess, pods: Mapping[str, PodInfo], holder: Candidate | None) -> dict[str, Any]:
    pod = holder.pod if holder is not None and holder.pod is not None else pods.get(proc.pod_uid or "")
    return {
        "pid": proc.pid,
        "memory_bytes": proc.used_memory_bytes,
        "sm_utilization": finite(proc.sm_utilization),
        "kernel_id": proc.kernel_id or (holder.kernel_id if holder is not None else None),
        "pod": pod.name if pod is not None else None,
        "namespace": pod.namespace if pod is not None else None,
        "reason": None if holder is not None else (proc.reason or "unattributed"),
    }


def _gpu_entries(snap: CycleSnapshot) -> list[dict[str, Any]]:
    pods = _pods_by_uid(snap)
    attributed: dict[tuple[str, int], tuple[AttributedProcess, Candidate | None]] = {}
    for d in snap.decisions:
        for p in d.candidate.processes:
            attributed.setdefault((p.gpu_uuid, p.pid), (p, d.candidate))
    for p in snap.unattributed:
        attributed.setdefault((p.gpu_uuid, p.pid), (p, None))
    entries: list[dict[str, Any]] = []
    for dev in sorted(snap.sampler.devices, key=lambda d: d.index):
        latest = snap.sampler.latest(dev.uuid)
        up = latest.up if latest is not None else None
        live = latest if latest is not None and latest.up else None
        procs = [
            _process_entry(p, pods, holder)
            for (uuid, _pid), (p, holder) in sorted(attributed.items(), key=lambda kv: kv[0][1])
            if uuid == dev.uuid
        ]
        seen = {e["pid"] for e in procs}
        for sp in (live.processes or ()) if live is not None else ():
            if sp.pid not in seen:
                procs.append(
                    {
                        "pid": sp.pid,
                        "memory_bytes": sp.used_memory_bytes,
                        "sm_utilization": finite(sp.sm_utilization),
                        "kernel_id": None,
                        "pod": None,
                        "namespace": None,
                        "reason": NOT_ATTRIBUTED_YET,
                    }
                )
        total = live.memory_total_bytes if live is not None else None
        entries.append(
            {
                "index": dev.index,
                "uuid": dev.uuid,
                "model": dev.model,
                "up": up,
                "utilization": finite(live.utilization) if live is not None else None,
                "memory_used_bytes": live.memory_used_bytes if live is not None else None,
                "memory_total_bytes": total if total is not None else dev.memory_total_bytes,
                "idle_seconds": finite(snap.gpu_idle_seconds.get(dev.uuid)),
                "processes": procs,
            }
        )
    return entries


def _kernel_entry(d: Decision, sampler: SamplerSnapshot) -> dict[str, Any]:
    c = d.candidate
    act = c.activity
    return {
        "kernel_id": c.kernel_id,
        "key": c.key,
        "gateway": c.gateway or (act.gateway if act is not None else None),
        "namespace": c.pod.namespace if c.pod is not None else None,
        "pod": c.pod.name if c.pod is not None else None,
        "user": candidate_user(c),
        "kernel_name": c.kernel_name,
        "gpus": [
            {"uuid": u.uuid, "memory_bytes": u.memory_bytes, "utilization": finite(u.utilization)}
            for u in kernel_gpu_usage(c, sampler)
        ],
        "allocated": c.allocated,
        "allocated_gpus": list(actionkinds.allocated_gpus(c)),
        "shared_gpu": c.shared_gpu,
        "recovers": actionkinds.recovers(d.action, c).value,
        "execution_state": act.execution_state if act is not None else None,
        "last_activity": rfc3339(act.last_activity) if act is not None else None,
        "connections": act.connections if act is not None else None,
        "idle_seconds": finite(d.idle_seconds),
        "verdict": d.verdict.value,
        "reason": d.reason,
        "action": d.action.value,
        "eta_seconds": finite(d.eta_seconds),
        "policy": d.policy,
    }


def build_report(snap: CycleSnapshot) -> dict[str, Any]:
    """The report JSON for one cycle, per docs/interface.md "Report JSON" (with ``summary``, ``unattributed``, ...).

    One ``kernels`` entry per Decision (pod candidates without a kernel have ``kernel_id`` null). JSON-safe:
    unknown values are null, never 0; no NaN.
    """
    gpus = _gpu_entries(snap)
    index_of = {g["uuid"]: g["index"] for g in gpus}
    pods = _pods_by_uid(snap)
    report: dict[str, Any] = {
        "node": snap.node,
        "generated_at": rfc3339(snap.generated_at),
        "mode": snap.mode,
        "last_sample_at": rfc3339(snap.sampler.last_sample_at),
        "observed_at": rfc3339(snap.observed_at),
        "gateways": [{"name": name, "up": up} for name, up in sorted(snap.gateway_up.items())],
        "breaker": breaker_entry(snap.breaker),
        "halted": snap.halted,  # why no action is taken at all now (a refused credential), or null
        "credentials": [{"source": source, "rejected": reason} for source, reason in sorted(snap.credentials.items())],
        "gpus": gpus,
        "kernels": [_kernel_entry(d, snap.sampler) for d in snap.decisions],
        "unattributed": [
            {**_process_entry(p, pods, None), "gpu_uuid": p.gpu_uuid, "gpu": index_of.get(p.gpu_uuid)}
            for p in snap.unattributed
        ],
    }
    report["summary"] = summarize(report)
    return report


def breaker_entry(status: BreakerStatus) -> dict[str, Any]:
    """The circuit breaker as the report shows it (top-level ``breaker``)."""
    return {
        "tripped": status.tripped,
        "cause": status.cause,
        "reclaimable": status.reclaimable,
        "total": status.total,
        "since": rfc3339(status.since),
        "released": status.released,
        "reason": status.reason,
    }


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """Counts over a report's kernels: GPUs held idle (distinct), VRAM those idle holders use, verdict counts."""
    idle_gpus: set[str] = set()
    idle_allocations: set[str] = set()
    idle_bytes = 0
    verdicts = dict.fromkeys(VERDICTS, 0)
    plan = dict.fromkeys(RECOVERS, 0)
    for k in report["kernels"]:
        verdicts[k["verdict"]] = verdicts.get(k["verdict"], 0) + 1
        if k["verdict"] != Verdict.UNKNOWN.value and (k["idle_seconds"] or 0) > 0:
            for g in k["gpus"]:
                idle_gpus.add(g["uuid"])
                idle_bytes += g["memory_bytes"] or 0
            idle_allocations.update(allocated_gpus(k))
        if k["verdict"] in (Verdict.RECLAIM.value, Verdict.WARN.value) and k.get("recovers") in plan:
            plan[k["recovers"]] += 1
    return {
        "gpus_held_idle": len(idle_gpus),
        "memory_held_idle_bytes": idle_bytes,
        "allocated_gpus_held_idle": len(idle_allocations),
        "planned_recovers": plan,
        "reclaimable_now": verdicts[Verdict.RECLAIM.value],
        "warned": verdicts[Verdict.WARN.value],
        "verdicts": verdicts,
    }


def allocated_gpus(kernel: Mapping[str, Any]) -> list[str]:
    """The GPUs a report entry's pod holds by allocation (a report from an older daemon: its GPUs when allocated)."""
    listed = kernel.get("allocated_gpus")
    if isinstance(listed, list):
        return [u for u in listed if isinstance(u, str)]
    return [g["uuid"] for g in kernel["gpus"]] if kernel.get("allocated") else []


# --------------------------------------------------------------------------- validating a report read back


class ReportSchemaError(ReclaimerError, ValueError):
    """A payload that is not a gpu-reclaimer report; the message names the offending path."""


_NUM = (int, float)


def _check(obj: Any, path: str, types: tuple[type, ...], nullable: bool) -> None:
    if obj is None and nullable:
        return
    # bool is an int subclass but never a valid number here.
    if isinstance(obj, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(obj, types)
    if not ok:
        want = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
        raise ReportSchemaError(f"{path}: expected {want}, got {type(obj).__name__} {obj!r:.60}")


def _check_fields(obj: Any, path: str, fields: Mapping[str, tuple[tuple[type, ...], bool]]) -> None:
    _check(obj, path, (dict,), False)
    for name, (types, nullable) in fields.items():
        if name not in obj:
            raise ReportSchemaError(f"{path}.{name}: required field is missing")
        _check(obj[name], f"{path}.{name}", types, nullable)


_TOP = {"node": ((str,), False), "generated_at": ((str,), False), "mode": ((str,), False),
        "gpus": ((list,), False), "kernels": ((list,), False)}  # fmt: skip
_GPU = {"index": ((int,), False), "uuid": ((str,), False), "model": ((str,), True), "utilization": (_NUM, True),
        "memory_used_bytes": (_NUM, True), "memory_total_bytes": (_NUM, True), "processes": ((list,), False)}  # fmt: skip
_PROC = {"pid": ((int,), False), "memory_bytes": (_NUM, True), "sm_utilization": (_NUM, True),
         "kernel_id": ((str,), True), "pod": ((str,), True), "namespace": ((str,), True)}  # fmt: skip
_KERNEL = {"kernel_id": ((str,), True), "gateway": ((str,), True), "namespace": ((str,), True), "pod": ((str,), True),
           "user": ((str,), True), "kernel_name": ((str,), True), "gpus": ((list,), False),
           "execution_state": ((str,), True), "last_activity": ((str,), True), "connections": ((int,), True),
           "idle_seconds": (_NUM, True), "verdict": ((str,), False), "reason": ((str,), False),
           "action": ((str,), False), "eta_seconds": (_NUM, True)}  # fmt: skip
_BREAKER = {"tripped": ((bool,), False), "cause": ((str,), True), "reclaimable": ((int,), False),
            "total": ((int,), False), "since": ((str,), True), "released": ((str,), True),
            "reason": ((str,), False)}  # fmt: skip
_KERNEL_GPU = {"uuid": ((str,), False), "memory_bytes": (_NUM, True), "utilization": (_NUM, True)}


def report_from_json(payload: Any) -> dict[str, Any]:
    """Validate a decoded ``/report`` payload well enough to render it; returns it (with ``summary`` filled in).

    Raises ``ReportSchemaError`` naming the first offending path (``kernels[2].verdict: ...``).
    """
    _check_fields(payload, "report", _TOP)
    for i, gpu in enumerate(payload["gpus"]):
        _check_fields(gpu, f"gpus[{i}]", _GPU)
        for j, proc in enumerate(gpu["processes"]):
            _check_fields(proc, f"gpus[{i}].processes[{j}]", _PROC)
            _check(proc.get("reason"), f"gpus[{i}].processes[{j}].reason", (str,), True)
    for i, kernel in enumerate(payload["kernels"]):
        _check_fields(kernel, f"kernels[{i}]", _KERNEL)
        if kernel["verdict"] not in VERDICTS:
            raise ReportSchemaError(
                f"kernels[{i}].verdict: expected one of {', '.join(VERDICTS)}, got {kernel['verdict']!r:.60}"
            )
        for j, g in enumerate(kernel["gpus"]):
            _check_fields(g, f"kernels[{i}].gpus[{j}]", _KERNEL_GPU)
        # Added in round 2 (a daemon from before has neither): optional, but checked when present.
        _check(kernel.get("allocated"), f"kernels[{i}].allocated", (bool,), True)
        _check(kernel.get("allocated_gpus", []), f"kernels[{i}].allocated_gpus", (list,), False)
        if kernel.get("recovers") is not None and kernel["recovers"] not in RECOVERS:
            raise ReportSchemaError(
                f"kernels[{i}].recovers: expected one of {', '.join(RECOVERS)}, got {kernel['recovers']!r:.60}"
            )
    breaker = payload.get("breaker")  # absent from older daemons' reports
    if breaker is not None:
        _check_fields(breaker, "report.breaker", _BREAKER)
    unattributed = payload.get("unattributed", [])
    _check(unattributed, "report.unattributed", (list,), False)
    for i, proc in enumerate(unattributed):
        _check_fields(proc, f"unattributed[{i}]", _PROC)
    return {**payload, "unattributed": unattributed, "summary": summarize(payload)}


# --------------------------------------------------------------------------- the table


def human_bytes(n: float | None) -> str:
    """1.5 GiB -> ``1.5 GiB``; unknown -> ``?``."""
    if n is None:
        return "?"
    if n >= _GIB:
        return f"{n / _GIB:.1f} GiB"
    if n >= _MIB:
        return f"{n / _MIB:.0f} MiB"
    if n >= _KIB:
        return f"{n / _KIB:.0f} KiB"
    return f"{int(n)} B"


def human_duration(seconds: float | None) -> str:
    """2820 -> ``47m``, 7500 -> ``2h5m``, 190000 -> ``2d4h``; unknown -> ``?``."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))  # rounded like config.format_duration, which writes the reasons
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def human_ratio(r: float | None) -> str:
    """0.031 -> ``3%``; unknown -> ``?``."""
    return "?" if r is None else f"{r * 100:.0f}%"


def _gpu_bytes(kernel: Mapping[str, Any], totals: Mapping[str, float | None]) -> float:
    # Waste weight: VRAM used; a GPU allocated to a pod with no process weighs its whole memory.
    held = 0.0
    for g in kernel["gpus"]:
        if g["memory_bytes"]:
            held += g["memory_bytes"]
        elif kernel.get("allocated"):
            held += totals.get(g["uuid"]) or 0
    return held


def waste(kernel: Mapping[str, Any], totals: Mapping[str, float | None]) -> float:
    """Sort key for the table: GPU memory held × idle seconds (unknowns weigh 0)."""
    idle = kernel["idle_seconds"] if kernel["verdict"] != Verdict.UNKNOWN.value else None
    return _gpu_bytes(kernel, totals) * (idle or 0)


def _sum_known(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    return None if not vals or any(v is None for v in vals) else sum(v for v in vals if v is not None)


# The columns of _kernel_row, for the node table and (after NODE) the cluster table.
# ALLOC: the pod holds the GPU allocation; FREES: what the action gives back (alloc = the GPU, mem = its memory).
KERNEL_COLUMNS = ("NAMESPACE", "POD/KERNEL", "USER", "GPU", "MEM", "UTIL", "STATE", "IDLE", "ALLOC", "VERDICT", "ACTION",
                  "FREES", "ETA", "REASON")  # fmt: skip


def _kernel_row(k: Mapping[str, Any], index_of: Mapping[str, int]) -> list[str]:
    short = (k["kernel_id"] or "")[:8]
    who = f"{k['pod']}/{short}" if k["pod"] and short else (k["pod"] or short or "?")
    gpus = ",".join(str(index_of.get(g["uuid"], g["uuid"][:12])) for g in k["gpus"]) or "-"
    util = _sum_known(g["utilization"] for g in k["gpus"])
    eta = k["eta_seconds"]
    # A countdown only means something while the holder is idle: a busy kernel's "earliest" ETA is not one.
    counting = k["verdict"] in (Verdict.WARN.value, Verdict.RECLAIM.value) or (k["idle_seconds"] or 0) > 0
    idle = (
        "-" if k["verdict"] == Verdict.EXEMPT.value and k["idle_seconds"] is None else human_duration(k["idle_seconds"])
    )
    return [
        k["namespace"] or "-",
        who,
        k["user"] or "-",
        gpus,
        human_bytes(_sum_known(g["memory_bytes"] for g in k["gpus"])),
        human_ratio(min(util, 1.0) if util is not None else None),
        (k["execution_state"] or "?") if k["kernel_id"] else "-",
        idle,
        "yes" if k.get("allocated") else "-",
        k["verdict"],
        k["action"],
        _FREES.get(k.get("recovers") or "", "?"),
        "-" if eta is None or not counting else ("now" if eta <= 0 else human_duration(eta)),
        k["reason"],
    ]


_FREES = {Recovers.ALLOCATION.value: "alloc", Recovers.MEMORY.value: "mem", Recovers.NONE.value: "-"}
_MIN_FLEXIBLE = 24  # a REASON cut shorter than this says nothing
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _cell(value: str) -> str:
    # Names and reasons come from pods, gateways or a remote /report: no terminal escapes, one line per row.
    return _CONTROL.sub(" ", value)


def _format_table(headers: list[str], rows: list[list[str]], width: int | None, flexible: str | None) -> list[str]:
    """Left-aligned columns two spaces apart. Over ``width``, only the ``flexible`` column is shortened (with …),
    never below ``_MIN_FLEXIBLE`` characters; every other column stays whole (lines may then run long, as kubectl's).
    """
    rows = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    if width is not None and flexible in headers:
        i = headers.index(flexible)
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        if excess > 0:
            widths[i] = max(min(widths[i], _MIN_FLEXIBLE), widths[i] - excess)
            rows = [
                [*r[:i], r[i] if len(r[i]) <= widths[i] else r[i][: widths[i] - 1] + "…", *r[i + 1 :]] for r in rows
            ]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def summary_line(summary: Mapping[str, Any]) -> str:
    """``3 GPUs held idle, 60.0 GiB; 1 reclaimable now; 2 warned`` (+ exempt / unknown counts when any)."""
    n = summary["gpus_held_idle"]
    a = summary.get("allocated_gpus_held_idle", 0)
    parts = [
        f"{n} GPU{'s' if n != 1 else ''} held idle: {human_bytes(summary['memory_held_idle_bytes'])} GPU memory, "
        f"{a} GPU allocation{'s' if a != 1 else ''}",
        f"{summary['reclaimable_now']} reclaimable now",
        f"{summary['warned']} warned",
    ]
    plan = summary.get("planned_recovers") or {}
    if plan.get(Recovers.ALLOCATION.value) or plan.get(Recovers.MEMORY.value):
        parts.append(
            f"planned actions release {plan.get(Recovers.ALLOCATION.value, 0)} allocation(s), "
            f"free memory only for {plan.get(Recovers.MEMORY.value, 0)}"
        )
    for verdict in (Verdict.EXEMPT.value, Verdict.UNKNOWN.value):
        if summary["verdicts"].get(verdict):
            parts.append(f"{summary['verdicts'][verdict]} {verdict}")
    return "; ".join(parts)


def render_table(report: Mapping[str, Any], width: int | None = None) -> str:
    """A plain kubectl-like text table of the report: kernels by waste (GPU memory × idle time, descending), a
    summary line, the GPUs, unattributed processes. No colours. ``width``: shorten REASON / UUID to fit it.
    """
    report = report if "summary" in report else {**report, "summary": summarize(report)}
    index_of = {g["uuid"]: g["index"] for g in report["gpus"]}
    totals = {g["uuid"]: g["memory_total_bytes"] for g in report["gpus"]}
    kernels = sorted(
        report["kernels"],
        key=lambda k: (-waste(k, totals), k["namespace"] or "", k["pod"] or "", k["kernel_id"] or ""),
    )
    note = " (verdicts show what enforce would do)" if report["mode"] == "dry-run" else ""
    lines = [_cell(f"node {report['node']}  mode {report['mode']}{note}  at {report['generated_at']}"), ""]
    if kernels:
        lines += _format_table(list(KERNEL_COLUMNS), [_kernel_row(k, index_of) for k in kernels], width, "REASON")
    else:
        lines.append("No kernels or pods hold a GPU on this node.")
    lines += ["", summary_line(report["summary"])]
    breaker = report.get("breaker")
    if breaker and breaker.get("tripped"):
        lines.append(_cell(f"Circuit breaker {breaker['reason']}"))
    if report.get("halted"):
        lines.append(_cell(f"Actions halted: {report['halted']}"))
    lines.append("")
    gpu_rows = [
        [
            str(g["index"]),
            g["model"] or "?",
            human_ratio(g["utilization"]),
            f"{human_bytes(g['memory_used_bytes'])} / {human_bytes(g['memory_total_bytes'])}",
            human_duration(g.get("idle_seconds")),
            str(len(g["processes"])),
            g["uuid"],
        ]
        for g in sorted(report["gpus"], key=lambda g: g["index"])
    ]
    lines += _format_table(["GPU", "MODEL", "UTIL", "MEM", "IDLE", "PROCS", "UUID"], gpu_rows, width, "UUID")
    if report.get("unattributed"):
        rows = [
            [
                str(p["gpu"]) if p.get("gpu") is not None else str(p.get("gpu_uuid") or "?"),
                str(p["pid"]),
                human_bytes(p["memory_bytes"]),
                p["namespace"] or "-",
                p["pod"] or "-",
                p.get("reason") or "unattributed",
            ]
            for p in report["unattributed"]
        ]
        lines += ["", "Unattributed GPU processes:"]
        lines += _format_table(["GPU", "PID", "MEM", "NAMESPACE", "POD", "REASON"], rows, width, "REASON")
    return "\n".join(lines)


def render_json(report: Mapping[str, Any]) -> str:
    """The report as indented JSON text (no trailing newline); strict: NaN/Infinity are rejected, never emitted."""
    return json.dumps(report, indent=2, allow_nan=False)


# --------------------------------------------------------------------------- the cluster view (`report --cluster`)


def merge_reports(
    reports: Iterable[Mapping[str, Any]],
    unanswered: Iterable[Mapping[str, str]],
    generated_at: float,
    notes: Iterable[str] = (),
) -> dict[str, Any]:
    """One report over many nodes' reports (each validated by ``report_from_json``): every kernel and GPU tagged with
    its node, kernels sorted by waste (GPU memory held × idle time, descending), the nodes that did not answer and
    why. ``summary`` counts over all answered nodes; GPU UUIDs are unique cluster-wide.
    """
    nodes: list[dict[str, Any]] = []
    kernels: list[dict[str, Any]] = []
    gpus: list[dict[str, Any]] = []
    for r in sorted(reports, key=lambda r: r["node"]):
        summary = r.get("summary") or summarize(r)
        nodes.append({"node": r["node"], "mode": r["mode"], "generated_at": r["generated_at"], "summary": summary})
        kernels += [{**k, "node": r["node"], "mode": r["mode"]} for k in r["kernels"]]
        gpus += [{**g, "node": r["node"]} for g in r["gpus"]]
    totals = {g["uuid"]: g["memory_total_bytes"] for g in gpus}
    kernels.sort(
        key=lambda k: (-waste(k, totals), k["node"], k["namespace"] or "", k["pod"] or "", k["kernel_id"] or "")
    )
    missing = sorted(
        ({"node": u["node"], "pod": u["pod"], "reason": u["reason"]} for u in unanswered),
        key=lambda u: (u["node"], u["pod"]),
    )
    merged: dict[str, Any] = {
        "generated_at": rfc3339(generated_at),
        "nodes": nodes,
        "unanswered": missing,
        "notes": list(notes),
        "kernels": kernels,
        "gpus": gpus,
    }
    merged["summary"] = {**summarize(merged), "nodes_answered": len(nodes), "nodes_unanswered": len(missing)}
    return merged


def render_cluster_table(merged: Mapping[str, Any], width: int | None = None) -> str:
    """The merged report as one kubectl-like table (a NODE column first, the worst waste first), the summary, the
    nodes by mode, and every node that did not answer with the reason."""
    index_of: dict[str, dict[str, int]] = {}  # node -> GPU UUID -> index
    for g in merged["gpus"]:
        index_of.setdefault(g["node"], {})[g["uuid"]] = g["index"]
    modes: dict[str, int] = {}
    for n in merged["nodes"]:
        modes[n["mode"]] = modes.get(n["mode"], 0) + 1
    answered = len(merged["nodes"])
    total = answered + len(merged["unanswered"])
    by_mode = ", ".join(f"{count} {mode}" for mode, count in sorted(modes.items()))
    note = "; dry-run verdicts show what enforce would do" if modes.get("dry-run") else ""
    lines = [
        _cell(
            f"cluster  {answered} of {total} nodes answered"
            + (f" ({by_mode}{note})" if by_mode else "")
            + f"  at {merged['generated_at']}"
        ),
        "",
    ]
    if merged["kernels"]:
        rows = [[k["node"], *_kernel_row(k, index_of.get(k["node"], {}))] for k in merged["kernels"]]
        lines += _format_table(["NODE", *KERNEL_COLUMNS], rows, width, "REASON")
    else:
        lines.append("No kernels or pods hold a GPU on the nodes that answered.")
    lines += ["", summary_line(merged["summary"])]
    if merged["unanswered"]:
        lines += ["", f"Nodes that did not answer ({len(merged['unanswered'])}): their kernels are not in this report."]
        lines += _format_table(
            ["NODE", "POD", "REASON"],
            [[u["node"], u["pod"], u["reason"]] for u in merged["unanswered"]],
            width,
            "REASON",
        )
    if merged.get("notes"):
        lines += [""] + [_cell(f"Note: {note}") for note in merged["notes"]]
    return "\n".join(lines)
