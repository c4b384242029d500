"""Logging: structlog for our own lines, the standard library's (aiohttp, kubernetes, urllib3) routed through it.

JSON lines when the stream is not a terminal (the DaemonSet's stdout goes to a log pipeline), a readable console
rendering when it is. Every line has an ISO-8601 UTC ``timestamp``, ``level``, ``logger`` and ``event``.
Keys that look like secrets are redacted in every line, ours or a library's.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from reclaimer.core.config import Settings, redacted
from reclaimer.core.redact import REDACTED, is_secret_key, redact_data

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Their INFO lines (one per HTTP request, connection-pool chatter) would drown ours.
NOISY_LOGGERS: tuple[str, ...] = ("aiohttp", "kubernetes", "urllib3", "asyncio", "grpc")
FORMAT_ENV = "RECLAIMER_LOG_FORMAT"  # json | console | auto: overrides the terminal check when json=None
_HANDLER_FLAG = "_reclaimer_handler"


class _StdStreamHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at emit time (test capture swaps them)."""

    def __init__(self, name: Literal["stdout", "stderr"]) -> None:
        self._stream_name = name
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """The stream is looked up at each write; StreamHandler.__init__ assigns one, which is ignored."""


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: every field through ``reclaimer.core.redact`` (secret keys at any depth, credentials in
    text)."""
    for key, value in list(event_dict.items()):
        if key.startswith("_"):
            continue  # structlog's own bookkeeping (_record, _from_structlog)
        event_dict[key] = REDACTED if is_secret_key(key) else redact_data(value)
    return event_dict


def _wants_json(stream: TextIO, json: bool | None) -> bool:
    if json is not None:
        return json
    choice = os.environ.get(FORMAT_ENV, "auto").strip().lower()
    if choice in ("json", "console"):
        return choice == "json"
    if choice not in ("", "auto"):
        raise ValueError(f"{FORMAT_ENV} must be json, console or auto, got {choice!r}")
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return True


def _level_number(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}") from None


def configure_logging(
    level: str = "info",
    json: bool | None = None,
    stream: TextIO | Literal["stdout", "stderr"] = "stdout",
) -> None:
    """Route structlog and stdlib logging to one handler on ``stream`` at ``level``.

    ``json=None`` picks JSON lines unless the stream is a terminal (``$RECLAIMER_LOG_FORMAT`` overrides that
    check). Noisy libraries log at WARNING or above. Calling it again replaces the previous set-up, never adds a
    second handler. Raises ValueError for an unknown level.
    """
    number = _level_number(level)
    handler: logging.Handler = _StdStreamHandler(stream) if isinstance(stream, str) else logging.StreamHandler(stream)
    target: TextIO = getattr(sys, stream) if isinstance(stream, str) else stream
    as_json = _wants_json(target, json)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: list[Any] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if as_json
        else [structlog.dev.ConsoleRenderer(colors=_is_tty(target))]
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    setattr(handler, _HANDLER_FLAG, True)

    root = logging.getLogger()
    _remove_our_handlers(root)
    root.addHandler(handler)
    root.setLevel(number)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.WARNING))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: module-level loggers must follow a later reconfiguration (and capture_logs in tests).
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo ``configure_logging``: remove our handler and restore structlog's defaults (for tests)."""
    _remove_our_handlers(logging.getLogger())
    logging.getLogger().setLevel(logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def log_effective_config(settings: Settings, logger: Any = None) -> None:
    """Log the effective configuration once, as data, with secret values redacted (token sources are kept)."""
    log = logger if logger is not None else structlog.get_logger(__name__)
    log.info("effective config", config=redacted(settings), mode=settings.mode, node=settings.node_name)


def _remove_our_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(old)
        if not isinstance(old, _StdStreamHandler):
            old.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
