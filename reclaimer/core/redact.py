"""One redaction for everything the daemon writes: logs, config dumps, decision reasons, Kubernetes Event notes.

Pure (``re`` only). One list of secret words and one list of text patterns; every writer calls ``redact_text`` for
free text, ``redact_line`` for foreign text quoted on one line (decision reasons, back-off details) and
``redact_data`` for structured data (mappings are redacted by key as well as by content). The test corpus is
tests/test_redact.py: a pattern added here is added there. Nothing else in the package scrubs secrets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
MAX_DEPTH = 8  # deeper structures are replaced whole: a log field nested that far is not worth the risk
LINE_LIMIT = 120  # longest piece of foreign text (gateway errors, annotation values) quoted in a reason or detail

# Words that make a key (``api_key``, ``Authorization``, ``hub_token``) or a ``word=value`` pair secret.
SECRET_WORDS: tuple[str, ...] = (
    "token",
    "secret",
    "password",
    "passwd",
    "authorization",
    "api_key",
    "api-key",
    "apikey",
    "cookie",
    "credential",
    "private_key",
    "private-key",
)
# Key suffixes that name where a secret lives (``token_env``, ``token_file``, ``listen_token_file``, ``--token-file``),
# never its value.
SOURCE_SUFFIXES: tuple[str, ...] = ("_env", "_file", "-env", "-file")

_WORDS = "|".join(re.escape(w) for w in SECRET_WORDS)
_SECRET_KEY = re.compile(_WORDS, re.I)
_VALUE = r"[^\s&,;'\"<>]+"

# (pattern, replacement), applied in this order.
TEXT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # URL credentials: scheme://user:password@host
    (re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I), r"\1" + REDACTED + "@"),
    # word=value, word: value, "word": "value", ?hub_token=value (an auth scheme before the value goes too)
    (
        re.compile(
            rf"(?<![\w-])([\w-]*(?:{_WORDS})s?)([\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|token|basic)\s+)?{_VALUE}", re.I
        ),
        r"\1\2" + REDACTED,
    ),
    # Authorization schemes: "Bearer <value>", "Basic <value>", "token <long value>" (a short word after "token" is
    # prose: "token file", "token expired")
    (re.compile(r"\b(bearer|basic)\s+(?!<redacted>)[A-Za-z0-9._~+/=-]+", re.I), r"\1 " + REDACTED),
    (re.compile(r"\b(token)\s+[A-Za-z0-9._~+/=-]{16,}", re.I), r"\1 " + REDACTED),
    # JSON Web Tokens anywhere (projected service-account tokens, OIDC tokens)
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"), REDACTED),
)


def is_secret_key(key: object) -> bool:
    """True for a mapping key whose value is a secret (``Authorization``, ``api_key``, ``hub_token``), False for
    keys that only name where one lives (``token_env``, ``token_file``)."""
    if not isinstance(key, str):
        return False
    if key.lower().endswith(SOURCE_SUFFIXES):
        return False
    return _SECRET_KEY.search(key) is not None


def redact_text(text: str) -> str:
    """``text`` with every credential-looking part replaced by ``<redacted>``."""
    for pattern, replacement in TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_line(text: str, limit: int = LINE_LIMIT) -> str:
    """Foreign text made fit to quote in a decision reason or a back-off detail: redacted, on one line, at most
    ``limit`` characters (cut with …)."""
    text = " ".join(redact_text(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact_data(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` (mappings, lists, strings, scalars) fit to write out: secret keys' values replaced,
    strings redacted as text. Mappings come back as dicts, sequences as lists."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return REDACTED
        return {k: REDACTED if is_secret_key(k) else redact_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            return REDACTED
        return [redact_data(v, depth + 1) for v in value]
    return value
