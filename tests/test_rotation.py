"""Issue 10 item 6, against the real daemon process (`python -m reclaimer run`): token files are re-read when they
change (a rotated Secret takes effect without a restart); a 401 leads to one re-read and then to halting every
action, with the reason in /readyz, /report and /metrics; fixing the file lifts the halt.

The gateways are fake (aiohttp, in a thread) because their accepted token must change while the daemon runs; they
answer a wrong token with 401, as Kernel Gateway does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from reclaimer.app.demo import free_port
from tests.support.e2e import e2e_fixture
from tests.support.fake_gateway import FakeGateway
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.test_daemon import http_status, poll

KID = "5e5e5e5e-0000-4000-8000-000000000006"
GIB = 1024**3


class Served:
    """Fake gateways served on loopback from a thread of their own (the test itself blocks on the daemon)."""

    def __init__(self, *gateways: FakeGateway) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports = [free_port() for _ in gateways]
        self.runners: list[web.AppRunner] = []
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            for gw, port in zip(gateways, self.ports):
                runner = web.AppRunner(gw.app())
                self.loop.run_until_complete(runner.setup())
                self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
                self.runners.append(runner)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


KID2 = "5e5e5e5e-0000-4000-8000-000000000007"


@pytest.fixture
@e2e_fixture
def kernel_processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two real processes whose command lines name kernel connection files, like ipykernel's."""
    procs = []
    for kid in (KID, KID2):
        conn = tmp_path / f"kernel-{kid}.json"
        conn.write_text("{}")
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-f", str(conn)]))
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _rotate(path: Path, token: str) -> None:
    """As the kubelet updates a mounted Secret: write aside, then rename over (a new inode)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(token + "\n")
    os.replace(tmp, path)


def test_item6_token_files_rotate_and_a_refused_credential_halts_actions(
    tmp_path: Path, fake_nvml: FakeNvml, kernel_processes: list[subprocess.Popen[bytes]]
) -> None:
    # "good" serves an idle kernel the policy will reclaim; "other" serves a busy one, so it is asked every cycle.
    good = FakeGateway(token="good-1", auth_status=401)
    good.add_kernel(KID, state="idle", last_activity="2020-01-01T00:00:00Z")
    other = FakeGateway(token="other-1", auth_status=401)
    other.add_kernel(KID2, state="busy", last_activity="2020-01-01T00:00:00Z")
    served = Served(good, other)
    good_file, other_file = tmp_path / "good-token", tmp_path / "other-token"
    _rotate(good_file, "good-1")
    _rotate(other_file, "other-1")
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)],
                    processes=[FakeProcess(pid=p.pid, gpu=0, memory=6 * GIB) for p in kernel_processes])
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
mode: enforce
listen: 127.0.0.1:{port}
sample_interval: 200ms
decide_interval: 500ms
kubernetes: {{enabled: false}}
gateways:
  - {{name: good, url: "{served.url(0)}", token_file: "{good_file}", timeout: 2s}}
  - {{name: other, url: "{served.url(1)}", token_file: "{other_file}", timeout: 2s}}
policies: [{{name: all, idle_after: 8s, warn_before: 2s, action: shutdown-kernel}}]
limits: {{breaker_min_reclaims: 5}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "reclaimer", "run", "--config", str(cfg)],
                            env=fake_nvml.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def readyz() -> tuple[int, dict]:
        status, body = http_status(base + "/readyz")
        return status, json.loads(body)["components"]

    def report() -> dict:
        return json.loads(http_status(base + "/report")[1])

    def kernel(kid: str) -> dict:
        return next((k for k in report().get("kernels", []) if k["kernel_id"] == kid), {})

    try:
        poll(lambda: kernel(KID).get("gateway") == "good" and kernel(KID2).get("execution_state") == "busy",
             what="both kernels observed")
        # 1. The other gateway's token is rotated on its side but not (yet) in the daemon's file: 401, one re-read of
        #    the unchanged file, then every action halts, with the reason in /readyz, /metrics and /report.
        other.token = "other-2"
        poll(lambda: readyz()[1].get("credentials", {}).get("gateway:other", "ok").startswith("refused"),
             what="the refused credential in /readyz")
        status, details = readyz()
        assert status == 503 and details["actions"].startswith("halted: credentials refused: gateway:other")
        assert "token file" in details["credentials"]["gateway:other"] and "other-1" not in json.dumps(details) and "other-2" not in json.dumps(details)
        assert details["credentials"]["gateway:good"] == "ok"
        metrics = http_status(base + "/metrics")[1]
        assert 'reclaimer_credential_rejected{source="gateway:other"} 1.0' in metrics
        assert 'reclaimer_credential_rejected{source="gateway:good"} 0.0' in metrics
        # The idle kernel passes idle_after and would be reclaimed, but is held back with the reason.
        poll(lambda: kernel(KID).get("reason", "").startswith("actions halted (credentials refused: gateway:other"),
             timeout=30, what="the idle kernel's decision to say actions are halted")
        assert report()["halted"].startswith("credentials refused: gateway:other")
        assert kernel(KID)["verdict"] == "unknown" and good.count("DELETE", f"/api/kernels/{KID}") == 0

        # 2. A rotated token file is picked up without a 401: the good gateway sees its new token before it
        #    starts insisting on it.
        _rotate(good_file, "good-2")
        poll(lambda: any(r.headers.get("Authorization") == "token good-2" for r in good.requests),
             what="the good gateway to receive the rotated token")
        good.token = "good-2"

        # 3. The other gateway's file is updated: accepted again, the halt lifts, and the idle kernel is reclaimed
        #    (the positive control: the same daemon acts once nothing is refused).
        _rotate(other_file, "other-2")
        poll(lambda: readyz()[0] == 200, what="/readyz 200 once the updated file is read")
        assert readyz()[1]["credentials"] == {"gateway:good": "ok", "gateway:other": "ok"}
        poll(lambda: good.count("DELETE", f"/api/kernels/{KID}") == 1, what="the reclaim once the halt lifted")
        assert 'reclaimer_credential_rejected{source="gateway:other"} 0.0' in http_status(base + "/metrics")[1]
        assert other.count("DELETE", f"/api/kernels/{KID2}") == 0  # the busy kernel is kept throughout
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=10)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
        served.close()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    events = [rec.get("event") for rec in lines]
    assert "credential refused; actions halted until it is accepted" in events
    assert "token file changed; using the new token" in events and "token accepted again" in events
    for secret in ("good-1", "good-2", "other-1", "other-2"):
        assert secret not in out


def test_item6_token_source_rereads_on_change_keeps_the_last_good_token(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from reclaimer.observe.tokens import TokenError, TokenSource

    path = tmp_path / "token"
    _rotate(path, "zq-one")
    source = TokenSource("gateway 'eg'", file=str(path))
    assert source.current() == "zq-one" and source.reread() is False
    _rotate(path, "zq-two")
    assert source.current() == "zq-two" and source.rereads == 1  # noticed by stat alone, before any 401
    path.unlink()  # a Secret update swaps a symlink: for a moment there is no file
    assert source.current() == "zq-two" and source.reread() is False
    _rotate(path, "   ")  # empty: unusable, the last good token stays
    assert source.current() == "zq-two"
    _rotate(path, "zq-three")
    assert source.reread() is True and source.current() == "zq-three"
    source.refused(401)
    assert source.rejected is not None and "zq-three" not in source.rejected and str(path) in source.rejected
    source.accepted()
    assert source.rejected is None
    monkeypatch.setenv("RECLAIMER_TEST_ROT_TOKEN", "zq-env")
    env = TokenSource("hub", env="RECLAIMER_TEST_ROT_TOKEN")
    assert env.reread() is False
    env.refused(401)
    assert env.rejected is not None and "restart with a valid one" in env.rejected
    with pytest.raises(TokenError, match="hub: token file .* cannot be read"):
        TokenSource("hub", file=str(tmp_path / "missing"))
