"""Plain data passed between the pipeline stages: sample -> attribute -> observe -> decide -> act -> export.

Pure: no I/O imports. Every "unknown" is ``None`` (never 0): unknown is never idle.
Ratios are 0..1, memory in bytes, times are POSIX seconds (``float``) unless a field says ``datetime``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from reclaimer.core.actions import ActionKind
from reclaimer.core.modes import DRY_RUN
from reclaimer.core.verdicts import Verdict

# --------------------------------------------------------------------------- GPUs (nvml.py / sampler.py)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """A physical GPU as enumerated at start-up."""

    index: int
    uuid: str
    model: str
    mig_mode: bool | None = None  # None: unknown / not supported by the driver
    memory_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One compute process on one GPU in one tick (host PID namespace)."""

    pid: int
    used_memory_bytes: int | None  # None: NVML_VALUE_NOT_AVAILABLE or not reported
    sm_utilization: float | None = None  # ratio; None: unknown (no sample yet, NOT_SUPPORTED, error)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU in one tick. ``up`` is False when the GPU is lost or the device could not be read."""

    timestamp: float
    index: int
    uuid: str
    up: bool
    utilization: float | None  # ratio; None: unknown (MIG, NOT_SUPPORTED, error)
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    processes: tuple[ProcessSample, ...] | None = ()  # None: the process list itself is unknown
    errors: tuple[str, ...] = ()  # "nvmlDeviceGetUtilizationRates:NOT_SUPPORTED", ...


@dataclass(frozen=True, slots=True)
class GpuHistory:
    """One GPU's past beyond the sample ring, folded sample by sample (``policy.fold_sample``): enough to count an
    ``idle_after`` longer than the ring holds (a per-pod ``reclaimer.io/idle-after`` override) without keeping
    the samples. Constant size per GPU."""

    through: float  # timestamp of the newest sample folded in
    runs: Mapping[
        float, tuple[float, float] | None
    ]  # idle threshold -> (run start, peak) at ``through``; None: not idle
    problem_at: float | None = None  # newest sample that could not count as idle evidence
    problem: str = ""
    gap_end: float | None = None  # the sample after the newest gap longer than 3 intervals (or a clock step back)
    gap: float = 0.0
    process_seen_at: float | None = None  # newest sample showing any process


@dataclass(frozen=True, slots=True)
class GpuPresence:
    """One GPU's processes over time, folded sample by sample (``policy.fold_presence``), beyond the ring.

    ``first_seen``: pid -> the first sample of its current unbroken presence (invariant 10). ``unreadable_at``: the
    newest moment this GPU could have hidden a process: a sample whose process list was unknown, the GPU down, or the
    sample after a sampling gap (invariant 15); ``unreadable`` says which, in words.
    """

    through: float  # timestamp of the newest sample folded in
    first_seen: Mapping[int, float]
    unreadable_at: float | None = None
    unreadable: str = ""


@dataclass(frozen=True, slots=True)
class SamplerSnapshot:
    """What the sampler holds: devices and, per GPU uuid, the samples in its ring buffer (oldest first)."""

    devices: tuple[GpuDevice, ...]
    samples: Mapping[str, tuple[GpuSample, ...]]
    started_at: float  # when sampling began; idle windows never reach back before it
    sample_interval: float
    last_sample_at: float | None = None
    history: Mapping[str, GpuHistory] = field(default_factory=dict)  # per GPU uuid, since started_at
    # Per GPU uuid: pid -> timestamp of the first sample of that pid's current unbroken presence on the GPU (an unknown
    # process list, a down GPU or a sampling gap breaks it). Kept by the sampler beyond the ring, pruned every tick to
    # the pids listed; empty after a restart (invariant 10 counts holding time from here, never from process start).
    first_seen: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    # Per GPU uuid: (when, what) of the newest moment its process list could not be read (GpuPresence.unreadable_at).
    # A GPU missing here has been readable since sampling began (invariant 15).
    unreadable: Mapping[str, tuple[float, str]] = field(default_factory=dict)

    def latest(self, uuid: str) -> GpuSample | None:
        s = self.samples.get(uuid)
        return s[-1] if s else None


# --------------------------------------------------------------------------- processes (procfs.py / attribution.py)


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What /proc says about one process. (pid, starttime) is its identity: PIDs get reused."""

    pid: int
    ppid: int
    starttime: int  # clock ticks after boot, field 22 of /proc/<pid>/stat
    comm: str
    container_id: str | None = None
    pod_uid: str | None = None  # canonical dashed form
    kernel_id: str | None = None  # from a `kernel-<uuid>.json` connection file on the cmdline


@dataclass(frozen=True, slots=True)
class AttributedProcess:
    """A GPU process and what it belongs to. ``reason`` says why a link is missing (empty when attributed)."""

    pid: int
    starttime: int | None
    gpu_uuid: str
    used_memory_bytes: int | None
    sm_utilization: float | None
    pod_uid: str | None = None
    container_id: str | None = None
    kernel_id: str | None = None
    kernel_pid: int | None = None  # the ancestor (or self) whose cmdline names the connection file
    reason: str = ""
    started_at: float | None = None  # wall-clock start (POSIX seconds) from starttime and the boot time; None: unknown


# --------------------------------------------------------------------------- Kubernetes (kube.py / podresources.py)


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """An ownerReference of a pod (``metadata.ownerReferences[]``)."""

    kind: str
    name: str
    api_version: str = ""
    controller: bool = False  # controller: true -> that controller recreates the pod when it goes away


@dataclass(frozen=True, slots=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    node_name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    owner_kind: str | None = None
    owner_name: str | None = None
    user: str | None = None  # from the configured user label / annotation
    phase: str | None = None
    container_ids: tuple[str, ...] = ()  # bare ids, runtime prefix ("containerd://") stripped
    owners: tuple[OwnerRef, ...] = ()
    owners_known: bool = True  # False: metadata.ownerReferences could not be read (who recreates the pod is unknown)
    started_at: float | None = None  # status.startTime (POSIX seconds); None: not started or unknown
    deleting: bool = False  # metadata.deletionTimestamp is set: the pod is terminating
    containers_running: bool | None = None  # every container's state is running (and not started=false); None: unknown
    ip: str | None = None  # status.podIP
    ports: tuple[tuple[str, int], ...] = ()  # named container ports: (name, containerPort)

    @property
    def controller(self) -> OwnerRef | None:
        """The owner with ``controller: true`` (at most one, as the API server enforces), or None for a bare pod."""
        return next((o for o in self.owners if o.controller), None)


@dataclass(frozen=True, slots=True)
class PodGpuAllocation:
    """kubelet pod-resources: which GPUs (parent GPU uuids, MIG / time-slicing suffixes resolved) a pod holds."""

    namespace: str
    pod: str
    container: str
    gpu_uuids: tuple[str, ...]
    device_ids: tuple[str, ...] = ()  # as the kubelet reported them

    @property
    def shared(self) -> bool:
        """A time-slicing / MPS replica (``GPU-abc::3``): other pods may hold replicas of the same GPU."""
        return any("::" in d for d in self.device_ids)


# --------------------------------------------------------------------------- Jupyter (gateway.py / hub.py)


@dataclass(frozen=True, slots=True)
class KernelActivity:
    """A gateway's view of one kernel. ``error`` set means unknown: never idle."""

    kernel_id: str
    gateway: str
    observed_at: float
    kernel_name: str | None = None
    execution_state: str | None = None
    last_activity: datetime | None = None  # timezone-aware UTC
    connections: int | None = None
    error: str | None = None
    # Invariant 19: the gateway's clock minus ours (its HTTP Date header against our clock when the answer came);
    # None: not known (no Date header).
    clock_skew: float | None = None


@dataclass(frozen=True, slots=True)
class NotebookRef:
    """A Kubeflow Notebook (kubeflow.org/v1) whose pod a candidate runs in, and its notebook server's kernels.

    ``kernels`` None: the server's kernels could not be listed (unknown), with ``error`` saying why."""

    namespace: str
    name: str
    kernels: tuple[KernelActivity, ...] | None = None
    error: str | None = None
    observed_at: float | None = None


@dataclass(frozen=True, slots=True)
class ServerRef:
    """A JupyterHub user server (``server_name`` "" is the default server)."""

    user: str
    server_name: str = ""
    last_activity: datetime | None = None
    url: str | None = None  # hub-relative URL, e.g. /user/alice/
    ready: bool | None = None
    groups: tuple[str, ...] | None = None  # the user's JupyterHub groups; None: unknown (token lacks read:users:groups)
    profile: str | None = None  # KubeSpawner profile slug (the server's user_options.profile); None: none chosen
    options_known: bool = False  # whether the hub showed the server's user_options (so ``profile`` None means none)
    pid: int | None = None  # the server process (LocalProcessSpawner state; needs admin:server_state)
    origin: str | None = (
        None  # where the daemon reaches it directly (http://<pod IP or loopback>:<port>), not the proxy
    )
    listed_at: float | None = None  # when the hub listed it (stop-server needs this cycle's listing)

    @property
    def label(self) -> str:
        """``alice`` (default server) or ``alice/gpu``, as reasons name it."""
        return f"{self.user}/{self.server_name}" if self.server_name else self.user


# --------------------------------------------------------------------------- policy input / output


@dataclass(frozen=True, slots=True)
class Candidate:
    """Something that holds GPUs here and might be reclaimed: a kernel, or a pod holding GPUs with no process."""

    key: str  # "kernel:<kernel_id>" or "pod:<pod_uid>"; cooldowns and warnings are keyed on it
    node: str
    kernel_id: str | None = None
    gateway: str | None = None  # the configured gateway name that answered for this kernel
    activity: KernelActivity | None = None
    pod: PodInfo | None = None
    server: ServerRef | None = None
    user: str | None = None
    gpu_uuids: tuple[str, ...] = ()  # GPUs this candidate holds (processes, or allocation for pod candidates)
    processes: tuple[AttributedProcess, ...] = ()
    allocated: bool = False  # True when pod-resources says the pod holds these GPUs
    allocated_gpus: tuple[str, ...] = ()  # the GPUs pod-resources lists for the candidate's pod (empty: none/unknown)
    shared_gpu: bool = False  # the allocation is a time-slicing / MPS replica (device ids with a ``::N`` suffix)
    kernel_pod: bool = False  # the pod is the kernel's own pod (kernel_id label): ending the kernel ends the pod
    notebook: NotebookRef | None = None  # the Kubeflow Notebook of the pod (stop-notebook's target), when configured
    # Invariant 10: since when the candidate has held its GPUs as far as this daemon saw: the latest first sighting
    # of its GPU processes (kernel), or the first sighting of the pod's allocation, never before the pod started (pod).
    # None: unknown, and unknown is never idle.
    held_since: float | None = None
    # Invariant 15: GPU processes in the candidate's own pod (or container, without a pod) that belong to no kernel.
    unattributed: tuple[AttributedProcess, ...] = ()
    # Invariant 16: when the pod data the candidate carries was listed (POSIX seconds); None: unknown.
    pod_listed_at: float | None = None
    # The whole target of stop-server / evict-pod: every kernel of the candidate's server (or pod), as listed this
    # cycle. None: they could not be listed (``target_error`` says why), and then those actions are unknown.
    target_kernels: tuple[KernelActivity, ...] | None = None
    target_source: str = ""  # who listed them: "server alice/gpu", "kernel pod team-a/nb-1", "gateway eg"
    target_error: str | None = None
    server_error: str | None = None  # why the candidate's JupyterHub server is unknown (e.g. the hub's list failed)

    @property
    def kernel_name(self) -> str | None:
        return self.activity.kernel_name if self.activity else None


@dataclass(frozen=True, slots=True)
class Decision:
    candidate: Candidate
    verdict: Verdict
    action: ActionKind
    reason: str
    policy: str | None = None
    idle_seconds: float | None = None
    eta_seconds: float | None = None  # seconds until the action would be taken; 0 = now
    requested: ActionKind | None = None  # the policy's action when it differs from ``action`` (``auto``)
    fallback: Decision | None = None  # auto: the milder plan to use when the target of ``action`` is not all idle
    # When this idle episode's warning went out (invariant 11); None: no warning in this episode (yet). A decision
    # that warns for the first time carries ``now``.
    warned_at: float | None = None


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What an executor did with one planned decision. ``result`` is a bounded label value."""

    decision: Decision
    result: str  # one of reclaimer.core.results.ACTION_RESULTS
    detail: str = ""
    reclaimed_bytes: int = 0
    mode: str = DRY_RUN
    released_gpus: int = 0  # "released": GPU allocations seen released


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """The circuit breaker after one decide cycle (for /metrics, /report and the logs)."""

    tripped: bool = False
    cause: str | None = None  # one of reclaimer.core.labels.BREAKER_CAUSES while tripped: what started this trip
    reclaimable: int = 0  # candidates that would be reclaimed this cycle without the breaker
    total: int = 0  # candidates this cycle
    since: float | None = None  # when this trip began
    released: str | None = None  # the candidate key let through this cycle (one per cycle), if any
    new_trip: bool = False  # tripped this cycle and not in the previous one
    reason: str = "not tripped"


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between cycles, owned by the daemon (``policy.plan`` returns the next one).

    ``last_action_at``: when each key was last acted upon (cooldowns). ``reclaimable_since``: when each key turned
    reclaimable, continuously since (the breaker lets one through per cycle only after another full window).
    ``breaker_released_at``: when the breaker last let each key through (so a failing action does not hold the slot).
    ``warned_at``: when each key's current idle episode was warned (invariant 11). All of it is lost on a restart,
    which is the conservative direction.
    """

    last_action_at: Mapping[str, float] = field(default_factory=dict)
    reclaimable_since: Mapping[str, float] = field(default_factory=dict)
    breaker_released_at: Mapping[str, float] = field(default_factory=dict)
    breaker_since: float | None = None
    breaker_cause: str | None = None
    warned_at: Mapping[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- what one decide cycle leaves behind


@dataclass(frozen=True, slots=True)
class CycleSnapshot:
    """Everything the exporters (/metrics, /report, `reclaimer report`) render; built by the daemon each cycle.

    Immutable, swapped atomically, so a scrape never waits on I/O and never sees a half-built cycle.
    """

    node: str
    mode: str  # one of reclaimer.core.modes.MODES
    generated_at: float
    sampler: SamplerSnapshot
    decisions: tuple[Decision, ...] = ()
    unattributed: tuple[AttributedProcess, ...] = ()  # GPU processes that belong to no kernel, with the reason
    gpu_idle_seconds: Mapping[str, float | None] = field(default_factory=dict)  # by GPU uuid; None: unknown
    gateway_up: Mapping[str, bool | None] = field(
        default_factory=dict
    )  # by configured gateway name; None: not contacted yet
    observed_at: float | None = None  # when the last gateway observation finished (None: not yet)
    breaker: BreakerStatus = field(default_factory=BreakerStatus)
    # Each credential the daemon holds (reclaimer.core.keys: "hub", "gateway:<name>", "kubeflow", "kubernetes") -> why
    # it was refused (None: not refused). While any was refused after a re-read, no action is taken (issue 10 item 6).
    credentials: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def halted(self) -> str | None:
        """Why actions are halted this cycle (a refused credential), or None."""
        return halted_reason(self.credentials)


def halted_reason(credentials: Mapping[str, str | None]) -> str | None:
    """Why no action may be taken with these credentials (some were refused), or None."""
    refused = [f"{source}: {reason}" for source, reason in sorted(credentials.items()) if reason]
    return "credentials refused: " + "; ".join(refused) if refused else None
