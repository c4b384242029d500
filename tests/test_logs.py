"""Logging: JSON lines off a terminal, console on one; stdlib loggers routed through the same processors; redaction."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from reclaimer.core.config import parse_settings, redacted
from reclaimer.export.logs import (
    FORMAT_ENV,
    REDACTED,
    configure_logging,
    log_effective_config,
    reset_logging,
)

EMIT = """
import logging, structlog
from reclaimer.export.logs import configure_logging
configure_logging("info")
log = structlog.get_logger("reclaimer.app.demo").bind(kernel_id="k-1", gateway="eg")
log.info("cycle done", candidates=3, token="s3cr3t-token")
log.debug("not at info")
logging.getLogger("aiohttp.client").warning("gateway %s slow", "eg")
logging.getLogger("aiohttp.access").info("GET /metrics 200")
logging.getLogger("kubernetes.client.rest").info("response body")
logging.getLogger("urllib3.connectionpool").error("pool full", extra={"password": "hunter2"})
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    reset_logging()


def run_emitter(env: dict[str, str] | None = None, tty: bool = False) -> str:
    """Run EMIT in a fresh interpreter with stdout a pipe, or a pseudo-terminal when ``tty``; return stdout."""
    full_env = {k: v for k, v in os.environ.items() if k != FORMAT_ENV}
    full_env.update(env or {})
    if not tty:
        done = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, text=True, env=full_env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", EMIT], stdout=child, stderr=subprocess.PIPE, env=full_env)
    os.close(child)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode("utf-8", "replace")


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.e2e
def test_json_lines_when_stdout_is_not_a_terminal() -> None:
    lines = json_lines(run_emitter())
    assert [(r["logger"], r["level"], r["event"]) for r in lines] == [
        ("reclaimer.app.demo", "info", "cycle done"),
        ("aiohttp.client", "warning", "gateway eg slow"),
        ("urllib3.connectionpool", "error", "pool full"),
    ]
    ours = lines[0]
    assert (ours["kernel_id"], ours["gateway"], ours["candidates"]) == ("k-1", "eg", 3)
    for record in lines:
        stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        assert record["timestamp"].endswith("Z") and stamp.utcoffset() == timezone.utc.utcoffset(None)
        assert abs(stamp.timestamp() - time.time()) < 3600  # a real, current clock reading, not a placeholder


@pytest.mark.e2e
def test_secrets_never_reach_the_output_of_a_real_process() -> None:
    out = run_emitter()
    assert "s3cr3t-token" not in out and "hunter2" not in out
    lines = json_lines(out)
    assert lines[0]["token"] == REDACTED and lines[2]["password"] == REDACTED


@pytest.mark.parametrize(
    ("tty", "fmt", "expect_json"),
    [
        pytest.param(False, None, True, id="pipe-auto-json"),
        pytest.param(True, None, False, id="tty-auto-console"),
        pytest.param(False, "console", False, id="pipe-forced-console"),
        pytest.param(True, "json", True, id="tty-forced-json"),
    ],
)
@pytest.mark.e2e
def test_renderer_follows_the_terminal_unless_forced(tty: bool, fmt: str | None, expect_json: bool) -> None:
    out = run_emitter({FORMAT_ENV: fmt} if fmt else None, tty=tty)
    assert "cycle done" in out and "gateway eg slow" in out and "not at info" not in out
    first = next(line for line in out.splitlines() if "cycle done" in line)
    if expect_json:
        assert json.loads(first)["event"] == "cycle done"
    else:
        with pytest.raises(ValueError):
            json.loads(first)
        assert "kernel_id" in first and REDACTED in first


def test_configuring_twice_keeps_one_handler_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    configure_logging("debug", json=True)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_reclaimer_handler", False)]
    assert len(ours) == 1
    structlog.get_logger("reclaimer.t").debug("once")
    assert [r["event"] for r in json_lines(capsys.readouterr().out)] == ["once"]


def test_stdlib_records_are_routed_and_noisy_libraries_held_at_warning(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", json=True)
    logging.getLogger("aiohttp.access").info("GET / 200")
    logging.getLogger("kubernetes.client").debug("chatter")
    logging.getLogger("aiohttp.server").error("handler failed: %s", "boom")
    logging.getLogger("some.library").debug("library detail")
    structlog.get_logger("reclaimer.t").debug("our detail")
    events = [(r["logger"], r["event"]) for r in json_lines(capsys.readouterr().out)]
    assert events == [
        ("aiohttp.server", "handler failed: boom"),
        ("some.library", "library detail"),
        ("reclaimer.t", "our detail"),
    ]


def test_level_filters_our_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", json=True)
    log = structlog.get_logger("reclaimer.t")
    log.info("quiet")
    log.warning("loud")
    assert [r["event"] for r in json_lines(capsys.readouterr().out)] == ["loud"]


def test_exceptions_are_one_json_line_with_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    try:
        raise RuntimeError("wedged")
    except RuntimeError:
        structlog.get_logger("reclaimer.t").exception("sample failed")
    (record,) = json_lines(capsys.readouterr().out)
    assert record["level"] == "error" and "RuntimeError: wedged" in record["exception"]


def test_redaction_of_nested_keys_and_url_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    structlog.get_logger("reclaimer.t").info(
        "request",
        headers={"Authorization": "token abc123", "Accept": "application/json"},
        url="http://alice:pw123@hub:8081/hub/api",
        token_env="EG_TOKEN",
        api_key="k-999",
        items=[{"secret": "x-1"}],
    )
    out = capsys.readouterr().out
    for secret in ("abc123", "pw123", "k-999", "x-1"):
        assert secret not in out
    (record,) = json_lines(out)
    assert record["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert record["url"] == f"http://{REDACTED}@hub:8081/hub/api"
    assert record["token_env"] == "EG_TOKEN"  # where a token lives is fine to log


@pytest.mark.parametrize(
    "stream",
    [pytest.param("stderr", id="by-name"), pytest.param(None, id="stream-object")],
)
def test_logs_can_go_to_stderr_or_any_stream(capsys: pytest.CaptureFixture[str], stream: str | None) -> None:
    buffer = io.StringIO()
    configure_logging("info", json=None, stream="stderr" if stream else buffer)
    structlog.get_logger("reclaimer.t").info("to the side")
    captured = capsys.readouterr()
    assert captured.out == ""
    text = captured.err if stream else buffer.getvalue()
    assert json_lines(text)[0]["event"] == "to the side"  # not a terminal, so JSON


@pytest.mark.parametrize(
    ("kwargs", "env", "words"),
    [
        pytest.param({"level": "verbose"}, None, "log level", id="bad-level"),
        pytest.param({"level": "info"}, "xml", FORMAT_ENV, id="bad-format-env"),
    ],
)
def test_bad_settings_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], env: str | None, words: str
) -> None:
    if env:
        monkeypatch.setenv(FORMAT_ENV, env)
    with pytest.raises(ValueError, match=words):
        configure_logging(**kwargs)


def test_effective_config_is_logged_once_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EG_TOKEN", "s3cr3t-value")
    settings = parse_settings("gateways:\n  - {name: eg, url: 'http://eg:8888', token_env: EG_TOKEN}\n")
    with capture_logs() as logs:
        log_effective_config(settings)
    assert len(logs) == 1
    assert logs[0]["event"] == "effective config" and logs[0]["log_level"] == "info"
    assert logs[0]["config"] == redacted(settings)
    assert logs[0]["config"]["gateways"][0]["token_env"] == "EG_TOKEN"
    assert "s3cr3t-value" not in json.dumps(logs[0])


def test_effective_config_line_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    log_effective_config(parse_settings("mode: enforce\n"))
    (record,) = json_lines(capsys.readouterr().out)
    assert record["event"] == "effective config" and record["config"]["mode"] == "enforce"
    assert record["logger"] == "reclaimer.export.logs"
