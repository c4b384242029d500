"""The policy's verdicts on a candidate (the report's ``verdict``, the ``verdict`` label): keep, warn, reclaim,
exempt, unknown. Unknown is never idle."""

from __future__ import annotations

import enum


class Verdict(str, enum.Enum):
    KEEP = "keep"
    WARN = "warn"
    RECLAIM = "reclaim"  # in dry-run: what enforce would do this cycle
    EXEMPT = "exempt"
    UNKNOWN = "unknown"
