"""The HTTP server: endpoints, status codes, liveness independent of dependencies, and the serve() helper."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from reclaimer.export.metrics import Metrics
from reclaimer.core.model import CycleSnapshot
from reclaimer.export.report import build_report, render_json, report_from_json
from reclaimer.export.server import BearerToken, DaemonView, TokenFileError, make_app, serve
from tests.support.export_fixtures import node_snapshot


@dataclass
class FakeView:
    """A DaemonView whose answers the test sets; it records the ``now`` it was asked with."""

    snap: CycleSnapshot | None = None
    healthy: tuple[bool, str] = (True, "ok")
    ready: tuple[bool, dict[str, Any]] = (True, {"sampler": {"ok": True}})
    asked_at: list[float] = field(default_factory=list)

    def snapshot(self) -> CycleSnapshot | None:
        return self.snap

    def health(self, now: float) -> tuple[bool, str]:
        self.asked_at.append(now)
        return self.healthy

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
        self.asked_at.append(now)
        return self.ready


async def client_for(aiohttp_client: Any, view: DaemonView) -> TestClient:
    return await aiohttp_client(make_app(view, Metrics(view.snapshot)))


async def test_metrics_endpoint_serves_prometheus_text(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, FakeView(snap=node_snapshot()))
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    body = await resp.text()
    assert 'reclaimer_gpu_info{gpu="0",model="NVIDIA A100-SXM4-80GB"' in body
    assert "reclaimer_kernel_info{" in body


async def test_metrics_before_the_first_cycle(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, FakeView(snap=None))
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert "reclaimer_build_info" in await resp.text()


@pytest.mark.parametrize(
    "healthy,status,body",
    [
        pytest.param((True, "ok"), 200, "ok\n", id="loops-ticking"),
        pytest.param((False, "decide loop last ticked 95s ago"), 503, "decide loop last ticked 95s ago\n",
                     id="loop-stalled"),
    ],
)  # fmt: skip
async def test_healthz(aiohttp_client: Any, healthy: tuple[bool, str], status: int, body: str) -> None:
    view = FakeView(healthy=healthy)
    client = await client_for(aiohttp_client, view)
    before = time.time()
    resp = await client.get("/healthz")
    assert (resp.status, await resp.text()) == (status, body)
    assert before <= view.asked_at[-1] <= time.time()


async def test_liveness_ignores_dependencies_readiness_reports_them(aiohttp_client: Any) -> None:
    details = {"sampler": {"ok": True}, "gateways": {"eg": {"ok": False, "error": "timeout"}}, "kubernetes": {"ok": None}}
    client = await client_for(aiohttp_client, FakeView(ready=(False, details)))
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"ready": False, "components": details}


async def test_readyz_ready(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, FakeView())
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["ready"] is True


async def test_report_before_the_first_cycle_is_503_json(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, FakeView(snap=None))
    resp = await client.get("/report")
    assert resp.status == 503
    assert resp.content_type == "application/json"
    assert "no decision cycle" in (await resp.json())["error"]


async def test_report_serves_the_report_json(aiohttp_client: Any) -> None:
    snap = node_snapshot()
    client = await client_for(aiohttp_client, FakeView(snap=snap))
    resp = await client.get("/report")
    assert resp.status == 200
    payload = await resp.json()
    assert payload == json.loads(render_json(build_report(snap)))
    report_from_json(payload)  # what `reclaimer report --from` accepts


async def test_index_lists_the_endpoints(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, FakeView())
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    for path in ("/metrics", "/healthz", "/readyz", "/report"):
        assert f'href="{path}"' in page


async def test_head_and_unknown_paths(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, FakeView())
    assert (await client.head("/healthz")).status == 200
    assert (await client.get("/nope")).status == 404
    assert (await client.post("/metrics")).status == 405


async def test_a_failing_handler_answers_500_without_a_traceback(aiohttp_client: Any) -> None:
    class Broken(FakeView):
        def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
            raise KeyError("secret-token-abc")

    client = await client_for(aiohttp_client, Broken())
    with capture_logs() as logs:
        resp = await client.get("/readyz")
    assert resp.status == 500
    body = await resp.text()
    assert json.loads(body) == {"error": "internal error: KeyError"}
    assert "secret-token-abc" not in body and "Traceback" not in body
    assert [e["path"] for e in logs if e["event"] == "HTTP handler failed"] == ["/readyz"]


async def test_serve_listens_on_a_free_port_until_cleanup() -> None:
    runner = await serve(make_app(FakeView(), Metrics(lambda: None)), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert (resp.status, await resp.text()) == (200, "ok\n")
    finally:
        await runner.cleanup()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")


async def test_serve_on_a_taken_port_raises_and_cleans_up() -> None:
    first = await serve(make_app(FakeView(), Metrics(lambda: None)), "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            await serve(make_app(FakeView(), Metrics(lambda: None)), "127.0.0.1", first.addresses[0][1])
    finally:
        await first.cleanup()


# --------------------------------------------------------------------------- issue 10 item 3: bearer token


async def token_client(aiohttp_client: Any, tmp_path: Any, token: str = "t0ken-abc") -> tuple[TestClient, Any]:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    view = FakeView(snap=node_snapshot())
    return await aiohttp_client(make_app(view, Metrics(view.snapshot), BearerToken(str(path)))), path


@pytest.mark.parametrize("path", ["/metrics", "/report"])
@pytest.mark.parametrize(
    "header,challenge",
    [
        pytest.param(None, 'Bearer realm="gpu-reclaimer"', id="no-header"),
        pytest.param("Bearer wrong", 'Bearer realm="gpu-reclaimer", error="invalid_token"', id="wrong-token"),
        pytest.param("Bearer t0ken-ab", 'Bearer realm="gpu-reclaimer", error="invalid_token"', id="prefix"),
        pytest.param("Basic dDBrZW4tYWJj", 'Bearer realm="gpu-reclaimer", error="invalid_token"', id="basic"),
        pytest.param("t0ken-abc", 'Bearer realm="gpu-reclaimer", error="invalid_token"', id="no-scheme"),
    ],
)  # fmt: skip
async def test_item3_protected_endpoints_refuse_without_the_token(
    aiohttp_client: Any, tmp_path: Any, path: str, header: str | None, challenge: str
) -> None:
    client, _ = await token_client(aiohttp_client, tmp_path)
    resp = await client.get(path, headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == challenge
    body = await resp.text()
    assert "reclaimer_" not in body and "kernel" not in body and "t0ken" not in body
    assert (await client.head(path)).status == 401


async def test_item3_the_token_opens_metrics_and_report_and_probes_stay_open(aiohttp_client: Any, tmp_path: Any) -> None:
    client, _ = await token_client(aiohttp_client, tmp_path)
    auth = {"Authorization": "bearer t0ken-abc"}  # the scheme is case-insensitive (RFC 7235)
    assert (await client.get("/metrics", headers=auth)).status == 200
    assert "reclaimer_kernel_info" in await (await client.get("/metrics", headers=auth)).text()
    assert (await client.get("/report", headers=auth)).status == 200
    # The kubelet probes without a token: liveness and readiness stay open, and so does the index.
    for open_path in ("/healthz", "/readyz", "/"):
        assert (await client.get(open_path)).status == 200, open_path


async def test_item3_a_rotated_token_file_is_reread(aiohttp_client: Any, tmp_path: Any) -> None:
    client, path = await token_client(aiohttp_client, tmp_path)
    assert (await client.get("/report", headers={"Authorization": "Bearer t0ken-abc"})).status == 200
    fresh = tmp_path / "token.new"
    fresh.write_text("rotated-xyz-0123456789\n")
    fresh.replace(path)  # how a Secret update lands: a new file under the same name
    assert (await client.get("/report", headers={"Authorization": "Bearer t0ken-abc"})).status == 401
    assert (await client.get("/report", headers={"Authorization": "Bearer rotated-xyz-0123456789"})).status == 200
    # A file that vanishes (mid-update) keeps the last good token: never open, never locked out.
    path.unlink()
    with capture_logs() as logs:
        assert (await client.get("/metrics", headers={"Authorization": "Bearer rotated-xyz-0123456789"})).status == 200
        assert (await client.get("/metrics")).status == 401
    path.write_text("\n")  # an empty file is not a token either
    with capture_logs() as logs:
        assert (await client.get("/metrics", headers={"Authorization": "Bearer rotated-xyz-0123456789"})).status == 200
    assert [(e["event"], e["owner"]) for e in logs] == [
        ("token file unusable; keeping the last good token", "listen_token_file")]
    assert "xyz-0123456789" not in str(logs)


@pytest.mark.parametrize(
    "content,problem",
    [
        pytest.param("", "is empty", id="empty"),
        pytest.param("  \n", "is empty", id="blank"),
        pytest.param("two words", "characters a bearer token cannot have", id="space"),
        pytest.param("tab\tinside", "characters a bearer token cannot have", id="control"),
        pytest.param(None, "cannot be read", id="missing"),
    ],
)  # fmt: skip
def test_item3_an_unusable_token_file_is_a_startup_error_naming_it(tmp_path: Any, content: str | None,
                                                                   problem: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenFileError) as err:
        BearerToken(str(path))
    assert str(err.value).startswith(f"listen_token_file {path} ") and problem in str(err.value)
    if content and content.strip():
        assert content.strip() not in str(err.value)
