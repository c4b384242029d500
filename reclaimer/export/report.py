"""The report's schema as one typed model: built from a decide cycle, read back from another daemon, serialised once.

``/report``, ``reclaimer report -o json``, ``report --from`` and ``report --cluster`` all go through ``Report``
(``ClusterReport`` for the merged view): ``build_report`` fills it from a ``CycleSnapshot``, ``report_from_json``
validates another node's payload against it (``ReportSchemaError`` names the offending path), ``render_json`` is the
one serialiser. The table is in ``reclaimer.export.table``; the views shared with the metrics in
``reclaimer.core.views``. Pure. Unknown values stay ``None`` / JSON null, never 0.

Fields a daemon from before round 2 did not send are optional; a report read back is re-emitted with the fields it
came with (``exclude_unset``), and fields a newer daemon adds pass through (``extra="allow"``).
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, Strict, ValidationError
from pydantic_core import PydanticCustomError

from reclaimer.core import actionkinds
from reclaimer.core.actions import Recovers
from reclaimer.core.errors import ReclaimerError
from reclaimer.core.model import (
    AttributedProcess,
    BreakerStatus,
    Candidate,
    CycleSnapshot,
    Decision,
    PodInfo,
    SamplerSnapshot,
)
from reclaimer.core.verdicts import Verdict
from reclaimer.core.views import candidate_user, finite, kernel_gpu_usage

VERDICTS: tuple[str, ...] = tuple(v.value for v in Verdict)
RECOVERS: tuple[str, ...] = tuple(r.value for r in Recovers)
NOT_ATTRIBUTED_YET = "not attributed yet (appeared after the last decide cycle)"


# --------------------------------------------------------------------------- the schema


def _number(value: Any) -> int | float:
    # A JSON number keeps its type (1 stays 1, 1.0 stays 1.0); a bool or "47m" is not one, nor NaN/Infinity.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("number_type", "expected int or float")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "expected a finite number")
    return value


Number = Annotated[int | float, PlainValidator(_number)]
# Enums read their JSON value (lax), everything else is strict: no "1" for 1, no 1 for true.
VerdictField = Annotated[Verdict, Strict(False)]
RecoversField = Annotated[Recovers, Strict(False)]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True, allow_inf_nan=False)


class ProcessEntry(_Schema):
    """A process on a GPU and what it was attributed to (``reason``: why not, when it was not)."""

    pid: int
    memory_bytes: Number | None
    sm_utilization: Number | None
    kernel_id: str | None
    pod: str | None
    namespace: str | None
    reason: str | None = None


class UnattributedEntry(ProcessEntry):
    """A GPU process that belongs to no kernel or pod, with its GPU."""

    gpu_uuid: str | None = None
    gpu: int | None = None


class GpuEntry(_Schema):
    index: int
    uuid: str
    model: str | None
    up: bool | None = None
    utilization: Number | None
    memory_used_bytes: Number | None
    memory_total_bytes: Number | None
    idle_seconds: Number | None = None
    processes: list[ProcessEntry]


class KernelGpu(_Schema):
    """What one kernel (or pod) uses of one GPU."""

    uuid: str
    memory_bytes: Number | None
    utilization: Number | None


class KernelEntry(_Schema):
    """One decision: a kernel, or a pod holding GPUs without one (``kernel_id`` null)."""

    kernel_id: str | None
    key: str | None = None
    gateway: str | None
    namespace: str | None
    pod: str | None
    user: str | None
    kernel_name: str | None
    gpus: list[KernelGpu]
    allocated: bool | None = None
    allocated_gpus: list[str] = Field(default_factory=list)
    shared_gpu: bool | None = None
    recovers: RecoversField | None = None
    execution_state: str | None
    last_activity: str | None
    connections: int | None
    idle_seconds: Number | None
    verdict: VerdictField
    reason: str
    action: str
    eta_seconds: Number | None
    policy: str | None = None

    def held_allocations(self) -> list[str]:
        """The GPUs its pod holds by allocation (a report from an older daemon, which did not list them: its GPUs
        when allocated)."""
        if "allocated_gpus" in self.model_fields_set:
            return self.allocated_gpus
        return [g.uuid for g in self.gpus] if self.allocated else []

    def idle(self) -> bool:
        """Known to be idle: not unknown, and an idle stretch measured."""
        return self.verdict != Verdict.UNKNOWN and (self.idle_seconds or 0) > 0


class GatewayEntry(_Schema):
    name: str
    up: bool | None


class BreakerEntry(_Schema):
    """The circuit breaker (invariant 18)."""

    tripped: bool
    cause: str | None
    reclaimable: int
    total: int
    since: str | None
    released: str | None
    reason: str


class CredentialEntry(_Schema):
    source: str
    rejected: str | None


class Summary(_Schema):
    """Counts over a report's kernels."""

    gpus_held_idle: int
    memory_held_idle_bytes: Number
    allocated_gpus_held_idle: int
    planned_recovers: dict[str, int]
    reclaimable_now: int
    warned: int
    verdicts: dict[str, int]


class Report(_Schema):
    """One node's report: docs/interface.md "Report JSON". ``summary`` is always computed here."""

    node: str
    generated_at: str
    mode: str
    last_sample_at: str | None = None
    observed_at: str | None = None
    gateways: list[GatewayEntry] = Field(default_factory=list)
    breaker: BreakerEntry | None = None
    halted: str | None = None  # why no action is taken at all now (a refused credential), or null
    credentials: list[CredentialEntry] = Field(default_factory=list)
    gpus: list[GpuEntry]
    kernels: list[KernelEntry]
    unattributed: list[UnattributedEntry] = Field(default_factory=list)
    summary: Summary | None = None


class ClusterKernel(KernelEntry):
    node: str
    mode: str


class ClusterGpu(GpuEntry):
    node: str


class NodeEntry(_Schema):
    node: str
    mode: str
    generated_at: str
    summary: Summary


class UnansweredEntry(_Schema):
    node: str
    pod: str
    reason: str


class ClusterSummary(Summary):
    nodes_answered: int
    nodes_unanswered: int


class ClusterReport(_Schema):
    """Many nodes' reports merged (``reclaimer report --cluster``)."""

    generated_at: str | None
    nodes: list[NodeEntry]
    unanswered: list[UnansweredEntry]
    notes: list[str]
    kernels: list[ClusterKernel]
    gpus: list[ClusterGpu]
    summary: ClusterSummary


def render_json(report: Report | ClusterReport, indent: int | None = 2) -> str:
    """The report as JSON text (no trailing newline): every field it was built or read with, in schema order; ASCII
    (names and reasons from pods and gateways are escaped, as ``json.dumps`` did), never NaN."""
    return report.model_dump_json(indent=indent, exclude_unset=True, ensure_ascii=True)


# --------------------------------------------------------------------------- building one from a cycle


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


def _process_fields(proc: AttributedProcess, pods: Mapping[str, PodInfo], holder: Candidate | None) -> dict[str, Any]:
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


def _gpu_entries(snap: CycleSnapshot) -> list[GpuEntry]:
    pods = _pods_by_uid(snap)
    attributed: dict[tuple[str, int], tuple[AttributedProcess, Candidate | None]] = {}
    for d in snap.decisions:
        for p in d.candidate.processes:
            attributed.setdefault((p.gpu_uuid, p.pid), (p, d.candidate))
    for p in snap.unattributed:
        attributed.setdefault((p.gpu_uuid, p.pid), (p, None))
    entries: list[GpuEntry] = []
    for dev in sorted(snap.sampler.devices, key=lambda d: d.index):
        latest = snap.sampler.latest(dev.uuid)
        live = latest if latest is not None and latest.up else None
        procs = [
            ProcessEntry(**_process_fields(p, pods, holder))
            for (uuid, _pid), (p, holder) in sorted(attributed.items(), key=lambda kv: kv[0][1])
            if uuid == dev.uuid
        ]
        seen = {e.pid for e in procs}
        procs += [
            ProcessEntry(
                pid=sp.pid,
                memory_bytes=sp.used_memory_bytes,
                sm_utilization=finite(sp.sm_utilization),
                kernel_id=None,
                pod=None,
                namespace=None,
                reason=NOT_ATTRIBUTED_YET,
            )
            for sp in ((live.processes or ()) if live is not None else ())
            if sp.pid not in seen
        ]
        total = live.memory_total_bytes if live is not None else None
        entries.append(
            GpuEntry(
                index=dev.index,
                uuid=dev.uuid,
                model=dev.model,
                up=latest.up if latest is not None else None,
                utilization=finite(live.utilization) if live is not None else None,
                memory_used_bytes=live.memory_used_bytes if live is not None else None,
                memory_total_bytes=total if total is not None else dev.memory_total_bytes,
                idle_seconds=finite(snap.gpu_idle_seconds.get(dev.uuid)),
                processes=procs,
            )
        )
    return entries


def _kernel_entry(d: Decision, sampler: SamplerSnapshot) -> KernelEntry:
    c = d.candidate
    act = c.activity
    return KernelEntry(
        kernel_id=c.kernel_id,
        key=c.key,
        gateway=c.gateway or (act.gateway if act is not None else None),
        namespace=c.pod.namespace if c.pod is not None else None,
        pod=c.pod.name if c.pod is not None else None,
        user=candidate_user(c),
        kernel_name=c.kernel_name,
        gpus=[
            KernelGpu(uuid=u.uuid, memory_bytes=u.memory_bytes, utilization=finite(u.utilization))
            for u in kernel_gpu_usage(c, sampler)
        ],
        allocated=c.allocated,
        allocated_gpus=list(actionkinds.allocated_gpus(c)),
        shared_gpu=c.shared_gpu,
        recovers=actionkinds.recovers(d.action, c),
        execution_state=act.execution_state if act is not None else None,
        last_activity=rfc3339(act.last_activity) if act is not None else None,
        connections=act.connections if act is not None else None,
        idle_seconds=finite(d.idle_seconds),
        verdict=d.verdict,
        reason=d.reason,
        action=d.action.value,
        eta_seconds=finite(d.eta_seconds),
        policy=d.policy,
    )


def breaker_entry(status: BreakerStatus) -> BreakerEntry:
    """The circuit breaker as the report shows it (top-level ``breaker``)."""
    return BreakerEntry(
        tripped=status.tripped,
        cause=status.cause,
        reclaimable=status.reclaimable,
        total=status.total,
        since=rfc3339(status.since),
        released=status.released,
        reason=status.reason,
    )


def build_report(snap: CycleSnapshot) -> Report:
    """The report for one cycle. One ``kernels`` entry per Decision (pod candidates without a kernel have
    ``kernel_id`` null). JSON-safe: unknown values are null, never 0; no NaN.
    """
    gpus = _gpu_entries(snap)
    index_of = {g.uuid: g.index for g in gpus}
    pods = _pods_by_uid(snap)
    kernels = [_kernel_entry(d, snap.sampler) for d in snap.decisions]
    generated_at = rfc3339(snap.generated_at)
    if generated_at is None:
        raise ValueError(f"a cycle's time must be finite, not {snap.generated_at!r}")
    return Report(
        node=snap.node,
        generated_at=generated_at,
        mode=snap.mode,
        last_sample_at=rfc3339(snap.sampler.last_sample_at),
        observed_at=rfc3339(snap.observed_at),
        gateways=[GatewayEntry(name=name, up=up) for name, up in sorted(snap.gateway_up.items())],
        breaker=breaker_entry(snap.breaker),
        halted=snap.halted,
        credentials=[CredentialEntry(source=s, rejected=reason) for s, reason in sorted(snap.credentials.items())],
        gpus=gpus,
        kernels=kernels,
        unattributed=[
            UnattributedEntry(**_process_fields(p, pods, None), gpu_uuid=p.gpu_uuid, gpu=index_of.get(p.gpu_uuid))
            for p in snap.unattributed
        ],
        summary=summarize(kernels),
    )


def summarize(kernels: Iterable[KernelEntry]) -> Summary:
    """Counts over kernels: GPUs held idle (distinct), VRAM those idle holders use, allocations they hold idle,
    what the planned actions would release, verdict counts."""
    idle_gpus: set[str] = set()
    idle_allocations: set[str] = set()
    idle_bytes: int | float = 0
    verdicts = dict.fromkeys(VERDICTS, 0)
    plan = dict.fromkeys(RECOVERS, 0)
    for k in kernels:
        verdicts[k.verdict.value] += 1
        if k.idle():
            for g in k.gpus:
                idle_gpus.add(g.uuid)
                idle_bytes += g.memory_bytes or 0
            idle_allocations.update(k.held_allocations())
        if k.verdict in (Verdict.RECLAIM, Verdict.WARN) and k.recovers is not None:
            plan[k.recovers.value] += 1
    return Summary(
        gpus_held_idle=len(idle_gpus),
        memory_held_idle_bytes=idle_bytes,
        allocated_gpus_held_idle=len(idle_allocations),
        planned_recovers=plan,
        reclaimable_now=verdicts[Verdict.RECLAIM.value],
        warned=verdicts[Verdict.WARN.value],
        verdicts=verdicts,
    )


# --------------------------------------------------------------------------- reading one back


class ReportSchemaError(ReclaimerError, ValueError):
    """A payload that is not a gpu-reclaimer report; the message names the offending path."""


_EXPECTED = {
    "int_type": "int",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
    "dict_type": "dict",
    "model_type": "dict",
    "number_type": "int or float",
    "finite_number": "a finite number",
}


def _path(loc: tuple[int | str, ...]) -> str:
    # kernels[2].verdict for what is inside a list, report.breaker.tripped for the rest (as the messages always read).
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return text if len(loc) > 1 and isinstance(loc[1], int) else "report" + ("." + text if text else "")


def _nullable(loc: tuple[int | str, ...]) -> bool:
    """Whether the schema allows null at ``loc``."""
    tp: Any = Report
    for part in loc:
        args = [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        tp = args[0] if len(args) == 1 else tp
        if isinstance(part, int) and get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif isinstance(part, str) and isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return False
    return _is_union(tp) and type(None) in get_args(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _schema_error(exc: ValidationError) -> ReportSchemaError:
    err = exc.errors(include_url=False)[0]
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    got = f"got {type(value).__name__} {value!r:.60}"
    if kind == "missing":
        what = "required field is missing"
    elif kind == "enum":
        choices = re.findall(r"'([^']*)'", err["ctx"]["expected"])  # pydantic's "'keep', 'warn' or 'unknown'"
        what = f"expected one of {', '.join(choices)}, {got}"
    elif kind in _EXPECTED:
        what = f"expected {_EXPECTED[kind]}{' or null' if _nullable(loc) else ''}, {got}"
    else:
        what = f"{err['msg']}, {got}"
    return ReportSchemaError(f"{_path(loc)}: {what}")


def report_from_json(payload: Any) -> Report:
    """Validate a decoded ``/report`` payload against ``Report``; returns it with ``summary`` computed here (a
    sender's own summary is not trusted) and ``unattributed`` present.

    Raises ``ReportSchemaError`` naming the first offending path (``kernels[2].verdict: ...``).
    """
    if isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if k != "summary"}
    try:
        report = Report.model_validate(payload)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    return report.model_copy(update={"unattributed": report.unattributed, "summary": summarize(report.kernels)})


# --------------------------------------------------------------------------- the cluster view (`report --cluster`)


def waste(kernel: KernelEntry, totals: Mapping[str, int | float | None]) -> float:
    """Sort key: GPU memory held times idle seconds (unknowns weigh 0). A GPU allocated to a pod with no process weighs
    its whole memory."""
    idle = kernel.idle_seconds if kernel.verdict != Verdict.UNKNOWN else None
    held = 0.0
    for g in kernel.gpus:
        if g.memory_bytes:
            held += g.memory_bytes
        elif kernel.allocated:
            held += totals.get(g.uuid) or 0
    return held * (idle or 0)


def merge_reports(
    reports: Iterable[Report],
    unanswered: Iterable[Mapping[str, str]],
    generated_at: float,
    notes: Iterable[str] = (),
) -> ClusterReport:
    """One report over many nodes' reports (each validated by ``report_from_json``): every kernel and GPU tagged with
    its node, kernels sorted by waste (GPU memory held times idle time, descending), the nodes that did not answer and
    why. ``summary`` counts over all answered nodes; GPU UUIDs are unique cluster-wide.
    """
    nodes: list[NodeEntry] = []
    kernels: list[ClusterKernel] = []
    gpus: list[ClusterGpu] = []
    for r in sorted(reports, key=lambda r: r.node):
        summary = r.summary or summarize(r.kernels)
        nodes.append(NodeEntry(node=r.node, mode=r.mode, generated_at=r.generated_at, summary=summary))
        # Each entry keeps the fields its node sent (an older daemon's lack recovers), then its node.
        kernels += [
            ClusterKernel.model_validate({**k.model_dump(exclude_unset=True), "node": r.node, "mode": r.mode})
            for k in r.kernels
        ]
        gpus += [ClusterGpu.model_validate({**g.model_dump(exclude_unset=True), "node": r.node}) for g in r.gpus]
    totals = {g.uuid: g.memory_total_bytes for g in gpus}
    kernels.sort(key=lambda k: (-waste(k, totals), k.node, k.namespace or "", k.pod or "", k.kernel_id or ""))
    missing = sorted(
        (UnansweredEntry(node=u["node"], pod=u["pod"], reason=u["reason"]) for u in unanswered),
        key=lambda u: (u.node, u.pod),
    )
    summary = summarize(kernels)
    return ClusterReport(
        generated_at=rfc3339(generated_at),
        nodes=nodes,
        unanswered=missing,
        notes=list(notes),
        kernels=kernels,
        gpus=gpus,
        summary=ClusterSummary(**summary.model_dump(), nodes_answered=len(nodes), nodes_unanswered=len(missing)),
    )
