"""Keys: a candidate's (``kernel:<kernel id>`` or ``pod:<pod uid>``), on which cooldowns, warnings and the breaker
are keyed (a pod candidate's key is also its ``kernel_id`` label value); the target keys that tell two decisions
apart when they would end the same pod, server or Notebook; and the credential names (``CycleSnapshot.credentials``,
the halted reason)."""

from __future__ import annotations

from typing import Final

KERNEL_PREFIX: Final = "kernel:"
POD_PREFIX: Final = "pod:"
SERVER_PREFIX: Final = "server:"
NOTEBOOK_PREFIX: Final = "notebook:"


def kernel_key(kernel_id: str) -> str:
    """The key of a kernel candidate."""
    return KERNEL_PREFIX + kernel_id


def pod_key(pod_uid: str) -> str:
    """The key of a pod candidate (GPUs allocated, no kernel), and the pod's own key beside a kernel's."""
    return POD_PREFIX + pod_uid


def server_key(user: str, server_name: str) -> str:
    """The target key of a JupyterHub server (``server_name`` "" is the default one)."""
    return f"{SERVER_PREFIX}{user}/{server_name}"


def notebook_key(namespace: str, name: str) -> str:
    """The target key of a Kubeflow Notebook."""
    return f"{NOTEBOOK_PREFIX}{namespace}/{name}"


# The credentials the daemon holds; a refused one halts every action (``CycleSnapshot.credentials``).
HUB_CREDENTIAL: Final = "hub"
KUBEFLOW_CREDENTIAL: Final = "kubeflow"
KUBERNETES_CREDENTIAL: Final = "kubernetes"
GATEWAY_CREDENTIAL_PREFIX: Final = "gateway:"


def gateway_credential(name: str) -> str:
    """The credential name of a configured gateway."""
    return GATEWAY_CREDENTIAL_PREFIX + name
