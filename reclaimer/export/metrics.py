"""Prometheus metrics: fresh families built from the latest ``CycleSnapshot`` (rendered once per snapshot), plus the
daemon's own counters and histograms, all in private ``CollectorRegistry`` objects.

Per-kernel series come from the snapshot, so they vanish when the kernel does. A scrape never does I/O: the
snapshot is already built. Pod candidates (GPUs allocated to a pod, no kernel) are keyed
``kernel_id="pod:<pod uid>"`` in the ``reclaimer_kernel_*`` families, unique so ``on(kernel_id)`` joins with
``reclaimer_kernel_info`` (which carries their namespace and pod) stay one-to-one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from reclaimer import __version__
from reclaimer.core.actionkinds import EXECUTABLE
from reclaimer.core.actions import ActionKind
from reclaimer.core.labels import BREAKER_CAUSES, NO_NAMESPACE
from reclaimer.core.model import ActionResult, BreakerStatus, CycleSnapshot, Decision
from reclaimer.core.modes import MODES
from reclaimer.core.results import ACTION_RESULTS, RELEASED, VERIFIED
from reclaimer.core.verdicts import Verdict
from reclaimer.core.views import candidate_namespace, candidate_user, is_idle, kernel_gpu_usage, metric_kernel_id

log = structlog.get_logger(__name__)

# The classic text format generate_latest writes; newer clients call 1.0.0 "latest", which Prometheus 2.x predates.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", CONTENT_TYPE_LATEST)

SnapshotProvider = Callable[[], CycleSnapshot | None]
NvmlErrorCounts = Callable[[], Mapping[tuple[str, str], int]]
StallStates = Callable[[], Mapping[str, Any]]  # stage -> stall.StageState

ACTIONS: tuple[str, ...] = tuple(a.value for a in EXECUTABLE)
RESULTS: tuple[str, ...] = ACTION_RESULTS
VERDICTS: tuple[str, ...] = tuple(v.value for v in Verdict)
NAMESPACE_KEEP_SECONDS = 3600.0  # a namespace's series outlive its last GPU here by this long
OTHER = "other"  # label value for anything outside a bounded set: never an unbounded label

# Work measured in milliseconds: NVML sampling, a pure decide pass.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# An HTTP round trip to a gateway, up to its timeout.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _bounded(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value in allowed:
        return value
    log.warning("metric label value outside its bounded set", label=what, value=value, used=OTHER)
    return OTHER


class _Families:
    """Fresh metric families for one scrape; ``add`` drops a repeated label set instead of emitting it twice."""

    def __init__(self) -> None:
        self.items: dict[str, GaugeMetricFamily] = {}
        self._seen: set[tuple[str, tuple[str, ...]]] = set()

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        self.items[name] = family
        return family

    def add(self, name: str, labels: tuple[str, ...], value: float | int | None) -> None:
        if value is None or not math.isfinite(value):
            return  # unknown: no series, never 0 (and never NaN)
        key = (name, labels)
        if key in self._seen:
            log.warning("duplicate series in snapshot dropped", metric=name, labels=labels)
            return
        self._seen.add(key)
        self.items[name].add_metric(list(labels), float(value))


_GAUGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reclaimer_build_info", "Build of the running daemon (value 1).", ("version",)),
    ("reclaimer_mode", "1 for the mode the daemon runs in (dry-run or enforce).", ("mode",)),
    ("reclaimer_gpu_info", "A GPU on this node (value 1).", ("gpu", "uuid", "model")),
    ("reclaimer_gpu_up", "1 when the GPU answered its last sample, 0 when lost or unreadable.", ("gpu", "uuid")),
    ("reclaimer_gpu_utilization_ratio", "GPU utilisation 0..1 (absent when unknown).", ("gpu", "uuid")),
    ("reclaimer_gpu_memory_used_bytes", "GPU memory in use.", ("gpu", "uuid")),
    ("reclaimer_gpu_memory_total_bytes", "GPU memory size.", ("gpu", "uuid")),
    ("reclaimer_gpu_idle_seconds", "How long the GPU has been below its idle threshold.", ("gpu", "uuid")),
    ("reclaimer_gpu_held_idle", "1 when kernels or pods hold the GPU and all are idle, else 0.", ("gpu", "uuid")),
    (
        "reclaimer_kernel_info",
        "A kernel (or a pod candidate, kernel_id=pod:<uid>) holding GPUs here (value 1).",
        ("kernel_id", "gateway", "namespace", "pod", "user", "kernel_name"),
    ),
    ("reclaimer_kernel_gpu_memory_bytes", "GPU memory the kernel's processes use.", ("kernel_id", "uuid")),
    ("reclaimer_kernel_gpu_utilization_ratio", "GPU utilisation of the kernel 0..1.", ("kernel_id", "uuid")),
    ("reclaimer_kernel_idle_seconds", "How long the kernel has been idle (GPU and gateway agree).", ("kernel_id",)),
    ("reclaimer_kernel_gpus_held_idle", "GPUs the kernel holds while idle (0 when busy).", ("kernel_id",)),
    ("reclaimer_kernel_verdict", "1 for the kernel's verdict this cycle.", ("kernel_id", "verdict")),
    ("reclaimer_kernel_reclaim_eta_seconds", "Seconds until the policy's action (0 = now).", ("kernel_id", "action")),
    ("reclaimer_kernels", "Kernels and pod candidates by verdict.", ("verdict",)),
    ("reclaimer_gateway_up", "1 when the gateway answered the last observation, 0 when not.", ("gateway",)),
    (
        "reclaimer_breaker_tripped",
        "1 while the circuit breaker holds reclaims back (too many at once; one per cycle after another window).",
        (),
    ),
    (
        "reclaimer_credential_rejected",
        "1 while the credential was refused (HTTP 401) even after re-reading its file; actions are halted meanwhile.",
        ("source",),
    ),
    ("reclaimer_last_sample_timestamp_seconds", "When the sampler last sampled the GPUs.", ()),
    ("reclaimer_snapshot_timestamp_seconds", "When the last decide cycle finished.", ()),
)


def _gpu_series(snap: CycleSnapshot, f: _Families) -> None:
    held: dict[str, list[Decision]] = {}
    for d in snap.decisions:
        for uuid in d.candidate.gpu_uuids:
            held.setdefault(uuid, []).append(d)
    for dev in snap.sampler.devices:
        gpu = (str(dev.index), dev.uuid)
        f.add("reclaimer_gpu_info", (*gpu, dev.model), 1)
        sample = snap.sampler.latest(dev.uuid)
        if sample is not None:
            f.add("reclaimer_gpu_up", gpu, 1 if sample.up else 0)
        live = sample if sample is not None and sample.up else None
        if live is not None:
            f.add("reclaimer_gpu_utilization_ratio", gpu, live.utilization)
            f.add("reclaimer_gpu_memory_used_bytes", gpu, live.memory_used_bytes)
        total = live.memory_total_bytes if live is not None else None
        f.add("reclaimer_gpu_memory_total_bytes", gpu, total if total is not None else dev.memory_total_bytes)
        f.add("reclaimer_gpu_idle_seconds", gpu, snap.gpu_idle_seconds.get(dev.uuid))
        f.add("reclaimer_gpu_held_idle", gpu, _held_idle(held.get(dev.uuid, [])))


def _held_idle(holders: list[Decision]) -> int | None:
    """1: held and every holder idle; 0: not held, or a holder is busy; None: a holder's state is unknown."""
    if not holders:
        return 0
    known = [d for d in holders if d.verdict != Verdict.UNKNOWN and d.idle_seconds is not None]
    if any(not is_idle(d) for d in known):
        return 0
    return 1 if len(known) == len(holders) else None


def _kernel_series(snap: CycleSnapshot, f: _Families) -> None:
    counts = dict.fromkeys(VERDICTS, 0)
    for d in snap.decisions:
        c = d.candidate
        kid = metric_kernel_id(c)
        gateway = c.gateway or (c.activity.gateway if c.activity is not None else None)
        pod = c.pod.name if c.pod is not None else ""
        info = (kid, gateway or "", candidate_namespace(c), pod, candidate_user(c) or "", c.kernel_name or "")
        f.add("reclaimer_kernel_info", info, 1)
        for usage in kernel_gpu_usage(c, snap.sampler):
            f.add("reclaimer_kernel_gpu_memory_bytes", (kid, usage.uuid), usage.memory_bytes)
            f.add("reclaimer_kernel_gpu_utilization_ratio", (kid, usage.uuid), usage.utilization)
        unknown = d.verdict == Verdict.UNKNOWN
        f.add("reclaimer_kernel_idle_seconds", (kid,), None if unknown else d.idle_seconds)
        if not unknown and d.idle_seconds is not None:
            f.add("reclaimer_kernel_gpus_held_idle", (kid,), len(set(c.gpu_uuids)) if is_idle(d) else 0)
        f.add("reclaimer_kernel_verdict", (kid, d.verdict.value), 1)
        counts[d.verdict.value] += 1
        if d.eta_seconds is not None and d.action != ActionKind.NONE and d.verdict in (Verdict.WARN, Verdict.RECLAIM):
            f.add("reclaimer_kernel_reclaim_eta_seconds", (kid, d.action.value), max(0.0, d.eta_seconds))
    for verdict, n in counts.items():
        f.add("reclaimer_kernels", (verdict,), n)


def _fresh_families() -> _Families:
    f = _Families()
    for name, doc, labels in _GAUGES:
        f.gauge(name, doc, labels)
    f.add("reclaimer_build_info", (__version__,), 1)
    return f


class SnapshotCollector(Collector):
    """Yields fresh families from one snapshot (never the families of an earlier one); never fails the render."""

    def __init__(self, snapshot_provider: SnapshotProvider) -> None:
        self._snapshot = snapshot_provider
        self.failures = 0

    def describe(self) -> list[Metric]:
        return list(_fresh_families().items.values())

    def collect(self) -> Iterator[Metric]:
        f = _fresh_families()
        try:
            snap = self._snapshot()
            if snap is not None:
                self._fill(snap, f)
        except Exception:  # a bad snapshot must cost its series, not the whole scrape
            self.failures += 1
            log.exception("building metrics from the snapshot failed")
            f = _fresh_families()
        yield from f.items.values()

    @staticmethod
    def _fill(snap: CycleSnapshot, f: _Families) -> None:
        f.add("reclaimer_mode", (_bounded(snap.mode, MODES, "mode"),), 1)
        _gpu_series(snap, f)
        _kernel_series(snap, f)
        for gateway, up in sorted(snap.gateway_up.items()):
            f.add("reclaimer_gateway_up", (gateway,), None if up is None else int(up))
        f.add("reclaimer_breaker_tripped", (), 1 if snap.breaker.tripped else 0)
        for source, refused in sorted(snap.credentials.items()):
            f.add("reclaimer_credential_rejected", (source,), 1 if refused else 0)
        f.add("reclaimer_last_sample_timestamp_seconds", (), snap.sampler.last_sample_at)
        f.add("reclaimer_snapshot_timestamp_seconds", (), snap.generated_at)


class LiveCollector(Collector):
    """What changes between snapshots and is read at each scrape: NVML error counts, render failures, stalls."""

    def __init__(
        self, snapshots: SnapshotCollector, nvml_error_counts: NvmlErrorCounts | None, stalls: StallStates | None = None
    ) -> None:
        self._snapshots = snapshots
        self._nvml_errors = nvml_error_counts
        self._stalls = stalls

    def describe(self) -> list[Metric]:
        return [self._nvml_family({}), self._failures_family(), *self._stall_families({})]

    def collect(self) -> Iterator[Metric]:
        yield self._nvml_family(self._nvml_counts())
        yield self._failures_family()
        states: Mapping[str, Any] = {}
        if self._stalls is not None:
            try:
                states = dict(self._stalls())
            except Exception:
                log.exception("reading the stall states failed")
        yield from self._stall_families(states)

    @staticmethod
    def _stall_families(states: Mapping[str, Any]) -> list[Metric]:
        """Per stage (a bounded set): stalled now (a call past its timeout), and calls that ever outlived it."""
        from reclaimer.observe.stall import STAGES

        now = GaugeMetricFamily(
            "reclaimer_stalled",
            "1 while a blocking call of the stage (NVML sampling, /proc "
            "reads, pod list, pod-resources) runs past its timeout; its part is unknown meanwhile.",
            labels=["stage"],
        )
        total = CounterMetricFamily(
            "reclaimer_stalled_calls",
            "Blocking calls that did not return within their timeout, by stage.",
            labels=["stage"],
        )
        for stage in STAGES:
            st = states.get(stage)
            now.add_metric([stage], 1.0 if st is not None and st.stalled else 0.0)
            total.add_metric([stage], float(st.stalled_calls) if st is not None else 0.0)
        return [now, total]

    def _failures_family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "reclaimer_metrics_collect_errors", "Snapshots whose series could not be rendered.",
            value=self._snapshots.failures,
        )  # fmt: skip

    def _nvml_counts(self) -> Mapping[tuple[str, str], int]:
        if self._nvml_errors is None:
            return {}
        try:
            return dict(self._nvml_errors())
        except Exception:
            log.exception("reading the NVML error counts failed")
            return {}

    @staticmethod
    def _nvml_family(counts: Mapping[tuple[str, str], int]) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "reclaimer_nvml_errors", "NVML calls that failed, by function and NVML error code.",
            labels=["function", "code"],
        )  # fmt: skip
        for key, n in sorted(counts.items()):
            if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
                log.warning("NVML error count with a malformed key skipped", key=repr(key))
                continue
            family.add_metric(list(key), float(n))
        return family


_LATEST = object()  # prepare(): "whatever the provider says now"


class Metrics:
    """Everything ``/metrics`` serves, in its own registry (never the global one).

    The daemon updates the attributes (``actions_total`` ...) and swaps snapshots; ``render()`` serves a scrape.
    """

    def __init__(
        self,
        snapshot_provider: SnapshotProvider,
        nvml_error_counts: NvmlErrorCounts | None = None,
        stalls: StallStates | None = None,
    ) -> None:
        self._provider = snapshot_provider
        self._namespace_seen: dict[str, float] = {}  # namespace -> when it last held a GPU here
        # Per-snapshot series are rendered once per snapshot (``prepare``), not per scrape: a scrape of a node
        # with hundreds of kernels then only concatenates bytes with the few live counters below.
        self._rendering: CycleSnapshot | None = None
        self._rendered: tuple[CycleSnapshot | None, bytes] | None = None
        self.collector = SnapshotCollector(lambda: self._rendering)
        self._snapshot_registry = CollectorRegistry()
        self._snapshot_registry.register(self.collector)
        self.registry = CollectorRegistry()
        self.registry.register(LiveCollector(self.collector, nvml_error_counts, stalls))
        r = self.registry
        self.actions_total = Counter(
            "reclaimer_actions", "Reclaim actions taken (or recorded in dry-run), by result.",
            ["action", "result", "mode"], registry=r,
        )  # fmt: skip
        self.reclaimed_gpu_memory_bytes_total = Counter(
            "reclaimer_reclaimed_gpu_memory_bytes", "GPU memory released by reclaim actions.", registry=r
        )
        self.gpu_held_idle_seconds_total = Counter(
            "reclaimer_gpu_held_idle_seconds",
            "GPU-seconds a kernel or pod held a GPU below its idle threshold (the waste counter).",
            ["namespace"], registry=r,
        )  # fmt: skip
        self.gpu_allocation_held_idle_seconds_total = Counter(
            "reclaimer_gpu_allocation_held_idle_seconds",
            "GPU-seconds a pod held a GPU's nvidia.com/gpu allocation while below its idle threshold (the GPU "
            "nobody else can be scheduled on; reclaimer_gpu_held_idle_seconds_total counts GPU memory held idle).",
            ["namespace"], registry=r,
        )  # fmt: skip
        self.released_gpus_total = Counter(
            "reclaimer_released_gpus",
            "GPU allocations verified released after an action (the pod gone, or pod-resources no longer listing "
            "the GPU for it).", registry=r,
        )  # fmt: skip
        self.gateway_request_duration_seconds = Histogram(
            "reclaimer_gateway_request_duration_seconds", "Gateway REST round trips.", ["gateway"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.sample_duration_seconds = Histogram(
            "reclaimer_sample_duration_seconds", "One NVML sampling pass over all GPUs.", buckets=FAST_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.decide_duration_seconds = Histogram(
            "reclaimer_decide_duration_seconds", "One decide cycle (attribute, policy, plan).", buckets=FAST_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.breaker_trips_total = Counter(
            "reclaimer_breaker_trips", "Times the circuit breaker tripped, by what started the trip.", ["cause"],
            registry=r,
        )  # fmt: skip
        # Zero series from the start so rate()/increase() see the first event.
        for cause in BREAKER_CAUSES:
            self.breaker_trips_total.labels(cause)
        for action in ACTIONS:
            for result in RESULTS:
                for mode in MODES:
                    self.actions_total.labels(action, result, mode)

    def record_action(self, outcome: ActionResult) -> None:
        """Count one executed (or dry-run recorded) action; a ``verified`` one adds the memory it released.

        Label values outside the bounded sets are counted as ``other`` (and logged), never exported raw.
        """
        action = _bounded(outcome.decision.action.value, ACTIONS, "action")
        result = _bounded(outcome.result, RESULTS, "result")
        mode = _bounded(outcome.mode, MODES, "mode")
        self.actions_total.labels(action, result, mode).inc()
        # Memory counts as reclaimed only once verification saw it released (docs/safety.md invariant 8).
        if result == VERIFIED and outcome.reclaimed_bytes > 0:
            self.reclaimed_gpu_memory_bytes_total.inc(outcome.reclaimed_bytes)
        # An allocation counts as released only once the pod was seen gone (or no longer holding the GPU).
        if result == RELEASED and outcome.released_gpus > 0:
            self.released_gpus_total.inc(outcome.released_gpus)

    def record_breaker_trip(self, status: BreakerStatus) -> None:
        """Count one trip of the circuit breaker under its (bounded) cause."""
        self.breaker_trips_total.labels(_bounded(status.cause or "", BREAKER_CAUSES, "cause")).inc()

    def add_held_idle(self, increments: Mapping[str, float], allocation: Mapping[str, float] | None = None) -> None:
        """Add ``views.held_idle_increments`` output to the waste counters (namespace label; ``-`` outside k8s):
        ``increments`` GPU memory held idle, ``allocation`` GPU allocations held idle."""
        for counter, values in (
            (self.gpu_held_idle_seconds_total, increments),
            (self.gpu_allocation_held_idle_seconds_total, allocation or {}),
        ):
            for namespace, seconds in values.items():
                if seconds > 0:
                    counter.labels(namespace or NO_NAMESPACE).inc(seconds)

    def forget_quiet_namespaces(self, live: Iterable[str], now: float, keep_for: float = NAMESPACE_KEEP_SECONDS) -> int:
        """Drop the series of every ``namespace``-labelled metric whose namespace held no GPU here for ``keep_for``.

        Namespaces come and go (one per user, per project): over months the children would only grow. A dropped
        counter goes stale in Prometheus and starts again from 0 if the namespace comes back, which ``rate`` and
        ``increase`` read as a new series. Returns how many series were dropped.
        """
        for ns in live:
            self._namespace_seen[ns or NO_NAMESPACE] = now
        quiet = {ns for ns, seen in self._namespace_seen.items() if now - seen > keep_for}
        dropped = 0
        for metric in self._namespaced():
            present = {
                s.labels["namespace"] for fam in metric.collect() for s in fam.samples if "namespace" in s.labels
            }
            for ns in present:
                if ns in quiet or ns not in self._namespace_seen:
                    metric.remove(ns)
                    dropped += 1
        for ns in quiet:
            del self._namespace_seen[ns]
        return dropped

    def _namespaced(self) -> list[Any]:
        return [m for m in vars(self).values() if tuple(getattr(m, "_labelnames", ())) == ("namespace",)]

    def tracked(self) -> dict[str, int]:
        """Sizes of the per-key structures (for the soak and the bounds tests)."""
        children = sum(
            len({s.labels["namespace"] for fam in m.collect() for s in fam.samples if "namespace" in s.labels})
            for m in self._namespaced()
        )
        return {"namespaces_seen": len(self._namespace_seen), "namespace_children": children}

    def prepare(self, snap: CycleSnapshot | object | None = _LATEST) -> None:
        """Render ``snap``'s series (default: the provider's latest) now; the daemon calls this once per cycle."""
        snap = self._provider() if snap is _LATEST else snap
        assert snap is None or isinstance(snap, CycleSnapshot)
        self._rendering = snap
        self._rendered = (snap, generate_latest(self._snapshot_registry))

    def render(self) -> tuple[bytes, str]:
        """One scrape: the Prometheus text exposition and its content type.

        The latest snapshot's series (rendered by ``prepare``, or here if that snapshot was not prepared yet), then
        the live counters and histograms. Never does I/O.
        """
        try:
            snap = self._provider()
        except Exception:  # a broken provider must cost the snapshot's series, not the whole scrape
            self.collector.failures += 1
            log.exception("building metrics from the snapshot failed")
            snap = None
        if self._rendered is None or self._rendered[0] is not snap:
            self.prepare(snap)
        assert self._rendered is not None
        return self._rendered[1] + generate_latest(self.registry), CONTENT_TYPE
