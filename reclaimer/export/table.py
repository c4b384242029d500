"""The report as a plain kubectl-like text table (``reclaimer report``, ``report --cluster``), rendered from the model.

Pure. No colours; text from pods, gateways or a remote ``/report`` cannot put terminal escapes on the screen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from reclaimer.core.actions import Recovers
from reclaimer.core.modes import DRY_RUN
from reclaimer.core.verdicts import Verdict
from reclaimer.export.report import ClusterReport, KernelEntry, Report, Summary, summarize, waste

_GIB = 1024**3
_MIB = 1024**2
_KIB = 1024


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
    s = max(0, round(seconds))  # rounded like config.format_duration, which writes the reasons
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


def _sum_known(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    return None if not vals or any(v is None for v in vals) else sum(v for v in vals if v is not None)


# The columns of _kernel_row, for the node table and (after NODE) the cluster table.
# ALLOC: the pod holds the GPU allocation; FREES: what the action gives back (alloc = the GPU, mem = its memory).
KERNEL_COLUMNS = ("NAMESPACE", "POD/KERNEL", "USER", "GPU", "MEM", "UTIL", "STATE", "IDLE", "ALLOC", "VERDICT",
                  "ACTION", "FREES", "ETA", "REASON")  # fmt: skip
_FREES = {Recovers.ALLOCATION: "alloc", Recovers.MEMORY: "mem", Recovers.NONE: "-"}


def _kernel_row(k: KernelEntry, index_of: Mapping[str, int]) -> list[str]:
    short = (k.kernel_id or "")[:8]
    who = f"{k.pod}/{short}" if k.pod and short else (k.pod or short or "?")
    gpus = ",".join(str(index_of.get(g.uuid, g.uuid[:12])) for g in k.gpus) or "-"
    util = _sum_known(g.utilization for g in k.gpus)
    eta = k.eta_seconds
    # A countdown only means something while the holder is idle: a busy kernel's "earliest" ETA is not one.
    counting = k.verdict in (Verdict.WARN, Verdict.RECLAIM) or (k.idle_seconds or 0) > 0
    idle = "-" if k.verdict == Verdict.EXEMPT and k.idle_seconds is None else human_duration(k.idle_seconds)
    return [
        k.namespace or "-",
        who,
        k.user or "-",
        gpus,
        human_bytes(_sum_known(g.memory_bytes for g in k.gpus)),
        human_ratio(min(util, 1.0) if util is not None else None),
        (k.execution_state or "?") if k.kernel_id else "-",
        idle,
        "yes" if k.allocated else "-",
        k.verdict.value,
        k.action,
        _FREES[k.recovers] if k.recovers is not None else "?",  # "?": an older daemon did not say
        "-" if eta is None or not counting else ("now" if eta <= 0 else human_duration(eta)),
        k.reason,
    ]


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
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]


def summary_line(summary: Summary) -> str:
    """``3 GPUs held idle, 60.0 GiB; 1 reclaimable now; 2 warned`` (+ exempt / unknown counts when any)."""
    n = summary.gpus_held_idle
    a = summary.allocated_gpus_held_idle
    parts = [
        f"{n} GPU{'s' if n != 1 else ''} held idle: {human_bytes(summary.memory_held_idle_bytes)} GPU memory, "
        f"{a} GPU allocation{'s' if a != 1 else ''}",
        f"{summary.reclaimable_now} reclaimable now",
        f"{summary.warned} warned",
    ]
    plan = summary.planned_recovers
    if plan.get(Recovers.ALLOCATION.value) or plan.get(Recovers.MEMORY.value):
        parts.append(
            f"planned actions release {plan.get(Recovers.ALLOCATION.value, 0)} allocation(s), "
            f"free memory only for {plan.get(Recovers.MEMORY.value, 0)}"
        )
    for verdict in (Verdict.EXEMPT.value, Verdict.UNKNOWN.value):
        if summary.verdicts.get(verdict):
            parts.append(f"{summary.verdicts[verdict]} {verdict}")
    return "; ".join(parts)


def render_table(report: Report, width: int | None = None) -> str:
    """A plain kubectl-like text table of the report: kernels by waste (GPU memory times idle time, descending), a
    summary line, the GPUs, unattributed processes. No colours. ``width``: shorten REASON / UUID to fit it.
    """
    index_of = {g.uuid: g.index for g in report.gpus}
    totals = {g.uuid: g.memory_total_bytes for g in report.gpus}
    kernels = sorted(
        report.kernels, key=lambda k: (-waste(k, totals), k.namespace or "", k.pod or "", k.kernel_id or "")
    )
    note = " (verdicts show what enforce would do)" if report.mode == DRY_RUN else ""
    lines = [_cell(f"node {report.node}  mode {report.mode}{note}  at {report.generated_at}"), ""]
    if kernels:
        lines += _format_table(list(KERNEL_COLUMNS), [_kernel_row(k, index_of) for k in kernels], width, "REASON")
    else:
        lines.append("No kernels or pods hold a GPU on this node.")
    lines += ["", summary_line(report.summary or summarize(report.kernels))]
    if report.breaker is not None and report.breaker.tripped:
        lines.append(_cell(f"Circuit breaker {report.breaker.reason}"))
    if report.halted:
        lines.append(_cell(f"Actions halted: {report.halted}"))
    lines.append("")
    gpu_rows = [
        [
            str(g.index),
            g.model or "?",
            human_ratio(g.utilization),
            f"{human_bytes(g.memory_used_bytes)} / {human_bytes(g.memory_total_bytes)}",
            human_duration(g.idle_seconds),
            str(len(g.processes)),
            g.uuid,
        ]
        for g in sorted(report.gpus, key=lambda g: g.index)
    ]
    lines += _format_table(["GPU", "MODEL", "UTIL", "MEM", "IDLE", "PROCS", "UUID"], gpu_rows, width, "UUID")
    if report.unattributed:
        rows = [
            [
                str(p.gpu) if p.gpu is not None else str(p.gpu_uuid or "?"),
                str(p.pid),
                human_bytes(p.memory_bytes),
                p.namespace or "-",
                p.pod or "-",
                p.reason or "unattributed",
            ]
            for p in report.unattributed
        ]
        lines += ["", "Unattributed GPU processes:"]
        lines += _format_table(["GPU", "PID", "MEM", "NAMESPACE", "POD", "REASON"], rows, width, "REASON")
    return "\n".join(lines)


def render_cluster_table(merged: ClusterReport, width: int | None = None) -> str:
    """The merged report as one kubectl-like table (a NODE column first, the worst waste first), the summary, the
    nodes by mode, and every node that did not answer with the reason."""
    index_of: dict[str, dict[str, int]] = {}  # node -> GPU UUID -> index
    for g in merged.gpus:
        index_of.setdefault(g.node, {})[g.uuid] = g.index
    modes: dict[str, int] = {}
    for n in merged.nodes:
        modes[n.mode] = modes.get(n.mode, 0) + 1
    answered = len(merged.nodes)
    total = answered + len(merged.unanswered)
    by_mode = ", ".join(f"{count} {mode}" for mode, count in sorted(modes.items()))
    note = "; dry-run verdicts show what enforce would do" if modes.get(DRY_RUN) else ""
    lines = [
        _cell(
            f"cluster  {answered} of {total} nodes answered"
            + (f" ({by_mode}{note})" if by_mode else "")
            + f"  at {merged.generated_at}"
        ),
        "",
    ]
    if merged.kernels:
        rows = [[k.node, *_kernel_row(k, index_of.get(k.node, {}))] for k in merged.kernels]
        lines += _format_table(["NODE", *KERNEL_COLUMNS], rows, width, "REASON")
    else:
        lines.append("No kernels or pods hold a GPU on the nodes that answered.")
    lines += ["", summary_line(merged.summary)]
    if merged.unanswered:
        lines += ["", f"Nodes that did not answer ({len(merged.unanswered)}): their kernels are not in this report."]
        lines += _format_table(
            ["NODE", "POD", "REASON"], [[u.node, u.pod, u.reason] for u in merged.unanswered], width, "REASON"
        )
    if merged.notes:
        lines += [""] + [_cell(f"Note: {note}") for note in merged.notes]
    return "\n".join(lines)
