"""The kernel id: a canonical 8-4-4-4-12 hex UUID. The one pattern every parser (gateway listings, the kernel_id pod
label, connection-file names) accepts, and the only form a URL is ever built from."""

from __future__ import annotations

import re

# Any case: a connection file may spell it in capitals; it is lowercased before use.
UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANY_CASE = re.compile(UUID_PATTERN)


def is_kernel_id(value: object) -> bool:
    """True for a canonical lowercase UUID, the only form a URL is ever built from."""
    return isinstance(value, str) and _KERNEL_ID.fullmatch(value) is not None


def canonical_kernel_id(text: str) -> str | None:
    """``text`` lowercased when it is an 8-4-4-4-12 hex UUID in any case (then ``is_kernel_id`` holds), else None."""
    return text.lower() if _ANY_CASE.fullmatch(text) else None
