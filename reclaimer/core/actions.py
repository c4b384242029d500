"""The action vocabulary: what a policy may ask for (``ActionKind``) and what carrying it out gives back (``Recovers``).

Names only; what each kind ends, needs and recovers is the table in ``reclaimer.core.actionkinds``, and the executors
are ``reclaimer.act.actions``.
"""

from __future__ import annotations

import enum
from typing import Literal


class ActionKind(str, enum.Enum):
    SHUTDOWN_KERNEL = "shutdown-kernel"
    STOP_SERVER = "stop-server"
    EVICT_POD = "evict-pod"
    STOP_NOTEBOOK = "stop-notebook"  # Kubeflow: the kubeflow-resource-stopped annotation on the Notebook
    AUTO = (
        "auto"  # a policy setting only: the policy resolves it per candidate (reclaimer.core.actionkinds.choose_auto)
    )
    NONE = "none"


# A policy's ``action`` setting: every ActionKind value, in the order check-config lists them.
ActionName = Literal["auto", "shutdown-kernel", "stop-server", "evict-pod", "stop-notebook", "none"]


class Recovers(str, enum.Enum):
    """What an action gives back when it is carried out (``reclaimer.core.actionkinds`` says which, per action and
    target)."""

    ALLOCATION = "allocation"  # the pod goes away: its nvidia.com/gpu allocation (and the GPU memory) is released
    MEMORY = "memory"  # the processes end, the GPU memory is freed; the pod keeps its allocation
    NONE = "none"  # nothing (no action, or an action that would be undone, e.g. a pod its controller recreates)
