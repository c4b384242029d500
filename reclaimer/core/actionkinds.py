"""The one table of action kinds: what each ends and needs, how it is carried out and verified, what it gives back.

Pure (``reclaimer.core.model`` only). Every layer asks this table instead of naming kinds: the policy for what an
action targets, needs and must find idle as a whole (``ends``, ``needs``, ``whole``) and whether it could release
anything at all (``refuse``); the executors for the operation that carries it out (``operation``, which
``reclaimer.act.actions.OPERATIONS`` maps once to a method) and its Events; the verification, the report and the
metrics for what it ``recovers``. Adding a kind is one more ``ActionKind`` value, one row in ``KINDS`` and the
executor method its ``operation`` names (tests/test_action_kinds.py walks the table and fails for a row without one).

Freeing GPU memory is not freeing the GPU: a kernel shut down inside a notebook pod frees its VRAM, but the pod
keeps its ``nvidia.com/gpu`` allocation and nothing else can be scheduled on that GPU. Only an action that ends the
pod (stopping the user's server, evicting a bare pod, ending a kernel whose pod is the kernel's own) releases the
allocation, and evicting a pod that a controller recreates releases nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from reclaimer.core.actions import ActionKind, Recovers
from reclaimer.core.model import Candidate, PodInfo
from reclaimer.core.verdicts import Verdict

KUBEFLOW_STOP_ANNOTATION = (
    "kubeflow-resource-stopped"  # on a Notebook: its controller scales it to 0 (Kubeflow's culler)
)
KUBEFLOW_NOTEBOOK_LABEL = "notebook-name"  # set by Kubeflow's notebook-controller on the pods of a Notebook
KUBEFLOW_NOTEBOOK_KIND = "Notebook"  # kubeflow.org Notebook (owns the StatefulSet that owns the pod)
JUPYTER_KERNEL_KIND = "JupyterKernel"  # elastic-jupyter-operator's kernel custom resource (owns the kernel pod)
# Enterprise Gateway's kernel-pod.yaml.j2 labels every kernel pod with these (and kernel_id); the pod is bare.
EG_KERNEL_POD_LABELS = {"app": "enterprise-gateway", "component": "kernel"}
ELASTIC_KERNEL_LABEL = "kernel"  # elastic-jupyter-operator: the JupyterKernel's name on its Deployment's pods


# What an action ends (its target, which the policy keys its one-action-per-target rule by) and the fact it cannot act
# without: the candidate's kernel, its JupyterHub server, its pod, its Kubeflow Notebook; "" for none.
Target = Literal["kernel", "server", "pod", "notebook", ""]
# What else carrying it out ends, all of which must be idle too (the policy's whole-target checks): "" the kernel
# alone; "target" every kernel of the candidate's pod or hub server (listed each cycle and again right before acting,
# the server asked of the hub again); "notebook" every kernel of the Kubeflow notebook server.
Whole = Literal["", "target", "notebook"]


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One action kind. ``recovers`` says what carrying it out on a candidate gives back; the executors verify that:
    the GPU memory always (the candidate's processes gone from the samples), the allocation where it is ``allocation``
    (the pod gone, or pod-resources no longer listing its GPUs)."""

    kind: ActionKind
    ends: Target  # what carrying it out ends (its target); "": nothing
    needs: Target  # the fact it cannot act without: missing -> unknown ("kernel": keep, a pod without one)
    whole: Whole  # what else it ends that must be idle as a whole
    operation: str | None  # the executor operation carrying it out (reclaimer.act.actions.OPERATIONS); None: none
    event_action: str | None  # events.k8s.io/v1 ``action`` of the Event recording it
    failure_event: str | None  # reason of the Warning Event for a failed attempt; None: the API server reports it
    recovers: Callable[[Candidate], Recovers]
    refuse: Callable[[Candidate], tuple[Verdict, str] | None] | None  # when it would release nothing: never planned
    summary: str  # one line for docs, the report and the demo


def _allocated(c: Candidate) -> bool:
    return c.allocated or bool(c.allocated_gpus)


def allocated_gpus(c: Candidate) -> tuple[str, ...]:
    """GPUs whose ``nvidia.com/gpu`` allocation ``c``'s pod holds (pod-resources); empty: none or unknown."""
    return c.allocated_gpus or (c.gpu_uuids if c.allocated else ())


def _shutdown_kernel_recovers(c: Candidate) -> Recovers:
    if c.kernel_id is None:
        return Recovers.NONE
    # Enterprise Gateway / elastic-jupyter-operator: the kernel is its own pod, which the gateway deletes.
    if c.kernel_pod and _allocated(c):
        return Recovers.ALLOCATION
    return Recovers.MEMORY


def _stop_server_recovers(c: Candidate) -> Recovers:
    # The spawner deletes the server's pod (KubeSpawner); outside Kubernetes there is no allocation to release.
    if c.server is None and not (c.user or (c.pod is not None and c.pod.user)):
        return Recovers.NONE
    return Recovers.ALLOCATION if _allocated(c) else Recovers.MEMORY


def _stop_notebook_recovers(c: Candidate) -> Recovers:
    # The notebook-controller scales the Notebook's StatefulSet to 0: the pod goes, and its GPU allocation with it.
    if c.notebook is None:
        return Recovers.NONE
    return Recovers.ALLOCATION if _allocated(c) else Recovers.MEMORY


def _evict_pod_recovers(c: Candidate) -> Recovers:
    if c.pod is None or not c.pod.owners_known or c.pod.controller is not None:
        return Recovers.NONE  # a controller recreates the pod: the GPU is taken again, the user's state is lost
    return Recovers.ALLOCATION if _allocated(c) else Recovers.MEMORY


# --------------------------------------------------------------------------- actions that would release nothing


def kubeflow_notebook(pod: PodInfo) -> str | None:
    """The name of the Kubeflow Notebook whose pod this is (StatefulSet pod labelled ``notebook-name``), or None."""
    owner = pod.controller
    if owner is not None and owner.kind == KUBEFLOW_NOTEBOOK_KIND:
        return owner.name
    if owner is not None and owner.kind == "StatefulSet" and pod.labels.get(KUBEFLOW_NOTEBOOK_LABEL):
        return pod.labels[KUBEFLOW_NOTEBOOK_LABEL]
    return None


def what_would_work(c: Candidate) -> str:
    """The action (or the human step) that would release what ``c`` holds, for a reason line."""
    pod = c.pod
    owner = pod.controller if pod is not None else None
    if c.kernel_id is not None and (c.kernel_pod or (owner is not None and owner.kind == JUPYTER_KERNEL_KIND)):
        return "shut the kernel down through its gateway (shutdown-kernel; the gateway deletes the kernel pod)"
    if pod is not None and kubeflow_notebook(pod):
        return "use stop-notebook"
    if c.server is not None:
        return "use stop-server"
    if owner is not None and owner.kind == "Node":
        return "a static pod: only removing its manifest from the node releases it"
    memory = "; shutdown-kernel frees its GPU memory only" if c.kernel_id is not None else ""
    if owner is not None:
        return f"scale down or delete its {owner.kind} {owner.name}{memory}"
    return f"no action of gpu-reclaimer releases it{memory}"


def _owner_text(pod: PodInfo) -> str:
    owner = pod.controller
    assert owner is not None
    notebook = kubeflow_notebook(pod)
    context = ""
    if notebook is not None and owner.kind != KUBEFLOW_NOTEBOOK_KIND:
        context = f" (Kubeflow Notebook {notebook})"
    elif owner.kind == JUPYTER_KERNEL_KIND:
        context = " (elastic-jupyter-operator)"
    return f"{owner.kind} {owner.name}{context}"


def kernel_pod_platform(pod: PodInfo) -> str:
    """Who runs a kernel pod, in words: Enterprise Gateway, elastic-jupyter-operator, or a gateway in general."""
    if all(pod.labels.get(k) == v for k, v in EG_KERNEL_POD_LABELS.items()):
        return "Enterprise Gateway"
    owner = pod.controller
    if owner is not None and owner.kind == JUPYTER_KERNEL_KIND:
        return f"elastic-jupyter-operator JupyterKernel {owner.name}"
    if owner is not None and owner.kind == "ReplicaSet" and pod.labels.get(ELASTIC_KERNEL_LABEL):
        return f"elastic-jupyter-operator JupyterKernel {pod.labels[ELASTIC_KERNEL_LABEL]} (through its Deployment)"
    return "its gateway"


def _evict_pod_refusal(c: Candidate) -> tuple[Verdict, str] | None:
    """Evicting a pod that a controller recreates (``ownerReferences[].controller: true``: ReplicaSet, StatefulSet,
    DaemonSet, Job, a Kubeflow Notebook, an elastic-jupyter-operator JupyterKernel, a static pod's Node) destroys
    the user's state and frees nothing: ``keep``, naming what would work. Owner references that cannot be read:
    ``unknown``.
    """
    if c.pod is None:
        return None
    if c.kernel_pod:
        # EG's kernel pods are bare (no controller): an eviction would release the GPU, but behind the gateway's
        # back — it sees its kernel die and may restart it in a new pod. elastic-jupyter-operator's are recreated.
        how = (
            "shut the kernel down through its gateway (shutdown-kernel; the gateway deletes the kernel pod)"
            if c.kernel_id is not None
            else "its kernel holds no GPU process; only shutting that kernel down through its gateway releases the pod"
        )
        owned = f", owned by {_owner_text(c.pod)}" if c.pod.controller is not None else ""
        return Verdict.KEEP, (
            f"pod {c.pod.namespace}/{c.pod.name} is a kernel pod of {kernel_pod_platform(c.pod)}"
            f"{owned}: eviction is not offered — {how}"
        )
    if not c.pod.owners_known:
        return Verdict.UNKNOWN, (
            f"pod {c.pod.namespace}/{c.pod.name}: ownerReferences unreadable "
            "(whether a controller recreates it is unknown)"
        )
    if c.pod.controller is None:
        return None
    return Verdict.KEEP, (f"pod is owned by {_owner_text(c.pod)}; eviction would be recreated — {what_would_work(c)}")


# --------------------------------------------------------------------------- the table


KINDS: dict[ActionKind, ActionSpec] = {
    spec.kind: spec
    for spec in (
        ActionSpec(
            kind=ActionKind.SHUTDOWN_KERNEL,
            ends="kernel",
            needs="kernel",
            whole="",
            operation="shutdown_kernel",
            event_action="ShutdownKernel",
            failure_event="GatewayError",
            recovers=_shutdown_kernel_recovers,
            refuse=None,
            summary="shuts the kernel down through its gateway: frees its GPU memory; the pod keeps its GPU "
            "allocation unless the pod is the kernel's own (Enterprise Gateway kernel pods)",
        ),
        ActionSpec(
            kind=ActionKind.STOP_SERVER,
            ends="server",
            needs="server",
            whole="target",
            operation="stop_server",
            event_action="StopServer",
            failure_event="GatewayError",
            recovers=_stop_server_recovers,
            refuse=None,
            summary="stops the user's JupyterHub server (every kernel of it): releases the pod's GPU allocation",
        ),
        ActionSpec(
            kind=ActionKind.EVICT_POD,
            ends="pod",
            needs="pod",
            whole="target",
            operation="evict_pod",
            event_action="EvictPod",
            failure_event=None,  # an eviction's failure is the API server's own answer, not a gateway's
            recovers=_evict_pod_recovers,
            refuse=_evict_pod_refusal,
            summary="evicts the pod (every process of it): releases its GPU allocation; never planned for a pod "
            "a controller recreates",
        ),
        ActionSpec(
            kind=ActionKind.STOP_NOTEBOOK,
            ends="notebook",
            needs="notebook",
            whole="notebook",
            operation="stop_notebook",
            event_action="StopNotebook",
            failure_event="GatewayError",
            recovers=_stop_notebook_recovers,
            refuse=None,
            summary="stops the Kubeflow Notebook (annotation kubeflow-resource-stopped, as Kubeflow's culler does): "
            "its controller scales it to 0, releasing the pod's GPU allocation",
        ),
        ActionSpec(
            kind=ActionKind.NONE,
            ends="",
            needs="",
            whole="",
            operation=None,
            event_action=None,
            failure_event=None,
            recovers=lambda c: Recovers.NONE,
            refuse=None,
            summary="observes only",
        ),
    )
}

EXECUTABLE: tuple[ActionKind, ...] = tuple(k for k, s in KINDS.items() if s.ends)
EVENT_ACTIONS: dict[ActionKind, str] = {k: s.event_action for k, s in KINDS.items() if s.event_action}


def spec(action: ActionKind) -> ActionSpec:
    """The row of ``action``. ``auto`` has none (the policy resolves it per candidate before anything acts): it reads
    as ``none``, which ends, needs and recovers nothing."""
    return KINDS.get(action) or KINDS[ActionKind.NONE]


def recovers(action: ActionKind, c: Candidate) -> Recovers:
    """What carrying out ``action`` on ``c`` gives back (``none`` for an action that would be undone)."""
    return spec(action).recovers(c)


def refusal(action: ActionKind, c: Candidate) -> tuple[Verdict, str] | None:
    """(verdict, reason) when ``action`` could release nothing on ``c`` and must never be planned; else None."""
    refuse = spec(action).refuse
    return refuse(c) if refuse is not None else None


def may_end_target(policy_action: str) -> bool:
    """Whether a policy's ``action`` (``auto``: any kind it may pick) can end a whole target (``whole == "target"``),
    whose kernels must then be listed every cycle."""
    kinds = EXECUTABLE if policy_action == ActionKind.AUTO.value else (ActionKind(policy_action),)
    return any(KINDS[k].whole == "target" for k in kinds)


# --------------------------------------------------------------------------- auto


def choose_auto(c: Candidate) -> tuple[ActionKind, str]:
    """The action ``auto`` takes for ``c`` and why, in words: the one that releases the GPU allocation where one can.

    1. a kernel whose pod is its own (Enterprise Gateway kernel pod): shutdown-kernel, the gateway deletes the pod;
    2. a candidate of a known JupyterHub server whose pod holds the GPU allocation: stop-server;
    3. a bare pod (no controller) holding the allocation: evict-pod;
    4. any other kernel: shutdown-kernel, which frees GPU memory only (said so);
    5. a pod candidate a controller recreates: evict-pod, which the policy then refuses, naming what would work.
    The policy falls back to shutdown-kernel when the larger target (the server, the pod) is not idle as a whole.
    """
    pod = c.pod
    allocated = _allocated(c)
    if c.kernel_id is not None and c.kernel_pod:
        what = "releases the GPU allocation" if allocated else "frees the GPU memory"
        return ActionKind.SHUTDOWN_KERNEL, f"auto: shutdown-kernel (the gateway deletes the kernel pod) {what}"
    if c.server is not None and allocated:
        return ActionKind.STOP_SERVER, "auto: stop-server releases the GPU allocation"
    if c.notebook is not None and allocated:
        return ActionKind.STOP_NOTEBOOK, "auto: stop-notebook releases the GPU allocation (Kubeflow scales it to 0)"
    if pod is not None and allocated and pod.owners_known and pod.controller is None:
        return ActionKind.EVICT_POD, "auto: evict-pod releases the GPU allocation (a pod no controller recreates)"
    if c.kernel_id is not None:
        if pod is None:
            return ActionKind.SHUTDOWN_KERNEL, "auto: shutdown-kernel frees the GPU memory"
        if not allocated:
            return ActionKind.SHUTDOWN_KERNEL, "auto: shutdown-kernel frees the GPU memory (no GPU allocation known)"
        return ActionKind.SHUTDOWN_KERNEL, (
            f"auto: shutdown-kernel frees GPU memory only, the pod keeps its GPU allocation ({what_would_work(c)})"
        )
    return ActionKind.EVICT_POD, ""  # the refusal's reason says what would work


# auto's milder plan when the larger target is not idle as a whole: end the kernel alone (frees its GPU memory only).
AUTO_FALLBACK = ActionKind.SHUTDOWN_KERNEL
FALLBACK_NOTE = "auto: shutdown-kernel frees GPU memory only, the pod keeps its GPU allocation"
