"""Issue 10 item 7: one redaction. One corpus of secret-bearing text runs through ``reclaimer.core.redact`` and through
every writer that uses it (log lines, the effective config, decision reasons, Event notes): a secret that one of them
lets through is a failure here."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from reclaimer.core import redact
from reclaimer.core.config import GatewaySettings, parse_settings, redacted
from reclaimer.observe.kube import scrub_note
from reclaimer.export.logs import configure_logging, reset_logging
from reclaimer.core.redact import REDACTED, is_secret_key, redact_data, redact_line, redact_text

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLXZhbHVl"

# (text, the secret that must not survive)
CORPUS = [
    pytest.param("401 on http://eg:8888/api/kernels?token=s3cr3tT0ken", "s3cr3tT0ken", id="query-token"),
    pytest.param("GET /hub/api/users?hub_token=q9q9q9q9&x=1", "q9q9q9q9", id="prefixed-query-key"),
    pytest.param("rejected Authorization: token 0123456789abcdef0123456789abcdef", "0123456789abcdef", id="header"),
    pytest.param("Authorization: Bearer xyzzy-1", "xyzzy-1", id="bearer-header"),
    pytest.param("sent Bearer abcDEF123 to the gateway", "abcDEF123", id="bare-bearer"),
    pytest.param("Basic dXNlcjpwYXNz failed", "dXNlcjpwYXNz", id="basic"),
    pytest.param("token 0123456789abcdef0123456789abcdef was refused", "0123456789abcdef", id="token-scheme"),
    pytest.param("X-Auth-Token: t0k-t0k", "t0k-t0k", id="x-auth-token"),
    pytest.param("password: hunter2-hunter2", "hunter2", id="password"),
    pytest.param("passwd=pw-77", "pw-77", id="passwd"),
    pytest.param("api_key=k-999 api-key: k-998 apikey=k-997", "k-99", id="api-keys"),
    pytest.param("client_secret=cs-1", "cs-1", id="client-secret"),
    pytest.param("Cookie: jupyterhub-session-id=c00k1e", "c00k1e", id="cookie"),
    pytest.param('{"token": "js0n-t0ken", "user": "alice"}', "js0n-t0ken", id="json-body"),
    pytest.param("https://bob:s3cret@hub.example/x", "s3cret", id="url-userinfo"),
    pytest.param("https://bob:s3cret@hub.example/x", "bob", id="url-user"),
    pytest.param(f"projected token {JWT} expired", "c2lnbmF0dXJl", id="jwt"),
    pytest.param(f"Bearer {JWT}", "eyJzdWIi", id="bearer-jwt"),
    pytest.param("private_key: -----BEGIN", "BEGIN", id="private-key"),
]

# Text that carries no secret and must come through unchanged (the redaction must not eat useful reasons).
KEPT = [
    pytest.param("hub: token file /var/run/secrets/hub/token cannot be read", id="token-file-path"),
    pytest.param("gateway eg error: HTTP 503", id="plain-error"),
    pytest.param("kernel 0b6e2c61-8f7c-4b1a-9d3e-5a4f2e1c7b90 idle for 31m", id="kernel-id"),
    pytest.param("token expired; re-reading", id="token-prose"),
    pytest.param("http://hub:8081/hub/api/users", id="plain-url"),
]


@pytest.mark.parametrize("text, secret", CORPUS)
def test_redact_text_corpus(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out and REDACTED in out, out


@pytest.mark.parametrize("text", KEPT)
def test_redact_text_keeps_plain_text(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    "key, secret",
    [
        ("Authorization", True), ("authorization", True), ("api_key", True), ("hub_token", True), ("Cookie", True),
        ("client_secret", True), ("password", True), ("token", True),
        ("token_env", False), ("token_file", False), ("listen_token_file", False), ("token-file", False), ("url", False), ("user", False),
        (7, False),
    ],
)
def test_secret_keys(key: Any, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_redact_data_by_key_and_by_content() -> None:
    data = {
        "headers": {"Authorization": "token abc123", "Accept": "application/json"},
        "url": "http://alice:pw123@hub:8081/hub/api",
        "token_env": "EG_TOKEN",
        "items": [{"secret": "x-1"}, ("note", "password=pw-2")],
        "count": 3,
    }
    out = redact_data(data)
    text = json.dumps(out)
    for secret in ("abc123", "pw123", "x-1", "pw-2"):
        assert secret not in text
    assert out["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert out["token_env"] == "EG_TOKEN" and out["count"] == 3


def test_redact_data_too_deep_is_replaced_whole() -> None:
    nested: Any = "password=deep-1"
    for _ in range(redact.MAX_DEPTH + 2):
        nested = {"a": nested}
    assert "deep-1" not in json.dumps(redact_data(nested))


# --------------------------------------------------------------------------- every writer uses the same redaction


@pytest.mark.parametrize("text, secret", CORPUS)
def test_every_writer_redacts_the_corpus(text: str, secret: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert secret not in redact_line(text), "decision reason (policy) / back-off detail (executor)"
    assert secret not in scrub_note(text), "Event note"
    assert secret not in redact_line(text, limit=100_000), "the whole line, uncut"
    configure_logging("info", json=True)
    try:
        structlog.get_logger("reclaimer.t").warning(text, error=text, detail={"nested": [text]})
    finally:
        reset_logging()
    assert secret not in capsys.readouterr().out, "log line"


def test_effective_config_uses_the_same_redaction() -> None:
    gateway = GatewaySettings.model_construct(name="eg", url="http://alice:s3cr3t@eg:8888", token_env="EG_TOKEN")
    s = parse_settings("").model_copy(update={"gateways": (gateway,)})
    dumped = json.dumps(redacted(s))
    assert "s3cr3t" not in dumped and "EG_TOKEN" in dumped


def test_no_other_module_keeps_its_own_secret_patterns() -> None:
    """One list: no writer defines secret words of its own any more."""
    import inspect

    from reclaimer.core import config, policy

    from reclaimer.observe import kube

    from reclaimer.export import logs

    for module in (config, kube, logs, policy):
        source = inspect.getsource(module)
        assert "passwd" not in source, f"{module.__name__} spells its own secret pattern"
