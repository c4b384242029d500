"""The daemon's modes: ``dry-run`` (the default: decide and report, change nothing) and ``enforce`` (act)."""

from __future__ import annotations

from typing import Final, Literal

Mode = Literal["dry-run", "enforce"]

DRY_RUN: Final = "dry-run"
ENFORCE: Final = "enforce"
MODES: tuple[Mode, ...] = (DRY_RUN, ENFORCE)  # the ``mode`` label's values, in this order
