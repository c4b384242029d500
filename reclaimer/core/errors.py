"""Expected errors: each carries a one-line message meant for the operator, so the CLI prints it without a traceback.

Pure: no I/O imports. Edge modules subclass these (e.g. the NVML adapter's ``NvmlUnavailable(StartupError)``).
"""

from __future__ import annotations


class ReclaimerError(Exception):
    """Base of every error whose message is fit to show an operator as is (one line, no secrets)."""


class StartupError(ReclaimerError):
    """The daemon cannot start: a dependency is missing or unusable (no NVML, port in use, unreadable token file)."""
