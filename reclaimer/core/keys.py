"""Candidate keys: ``kernel:<kernel id>`` or ``pod:<pod uid>``. Cooldowns, warnings and the breaker are keyed on
them, and a pod candidate's key is its ``kernel_id`` label value."""

from __future__ import annotations

from typing import Final

KERNEL_PREFIX: Final = "kernel:"
POD_PREFIX: Final = "pod:"


def kernel_key(kernel_id: str) -> str:
    """The key of a kernel candidate."""
    return KERNEL_PREFIX + kernel_id


def pod_key(pod_uid: str) -> str:
    """The key of a pod candidate (GPUs allocated, no kernel), and the pod's own key beside a kernel's."""
    return POD_PREFIX + pod_uid
