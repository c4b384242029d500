"""What acting on a decision came to: the executors' results (the ``result`` label of ``reclaimer_actions_total``),
what an adapter's stop/shutdown call answers, and what an eviction answers.

A bounded label set: a value not listed here is exported as ``other``, never raw.
"""

from __future__ import annotations

from typing import Final, Literal

SUCCESS: Final = "success"
ALREADY_GONE: Final = "already-gone"  # 404 / not running: nothing left to end (idempotent)
FAILED: Final = "failed"
BLOCKED: Final = "blocked"  # an eviction refused by a PodDisruptionBudget (429): never forced
SKIPPED: Final = "skipped"  # not attempted: a fact it needs is missing, or a re-check held it back
DRY_RUN: Final = "dry-run"  # recorded, not attempted (dry-run mode)
VERIFIED: Final = "verified"  # after success: the GPU memory was seen released
UNVERIFIED: Final = "unverified"  # after success: the GPU memory was not seen released in time
RELEASED: Final = "released"  # after success: the GPU allocation was seen released (the pod gone, or its GPUs unlisted)
UNRELEASED: Final = "unreleased"  # after success: the allocation was not seen released in time

# Every value ActionResult.result takes, in label order.
ACTION_RESULTS: tuple[str, ...] = (
    SUCCESS,
    ALREADY_GONE,
    FAILED,
    BLOCKED,
    SKIPPED,
    DRY_RUN,
    VERIFIED,
    UNVERIFIED,
    RELEASED,
    UNRELEASED,
)
DONE: tuple[str, ...] = (SUCCESS, ALREADY_GONE)  # the target is gone: verification follows

# What an adapter's stop/shutdown call answers (gateway, hub, notebook server, Kubeflow Notebook), with a detail.
AdapterResult = Literal["success", "already-gone", "failed"]
AdapterOutcome = tuple[AdapterResult, str]
ADAPTER_RESULTS: tuple[AdapterResult, ...] = (SUCCESS, ALREADY_GONE, FAILED)

# What an eviction answers (reclaimer.observe.kube.EvictionResult); the executor maps these onto ACTION_RESULTS.
BLOCKED_PDB: Final = "blocked-pdb"
RETRY_AFTER: Final = "retry-after"
FORBIDDEN: Final = "forbidden"
CONFLICT: Final = "conflict"
EVICTION_RESULTS: tuple[str, ...] = (SUCCESS, ALREADY_GONE, BLOCKED_PDB, RETRY_AFTER, FAILED, FORBIDDEN, CONFLICT)
