"""The daemon as a whole: the real `reclaimer run` / `reclaimer report` processes, liveness vs readiness, SIGTERM,
and conservative restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from reclaimer.core.config import parse_settings
from reclaimer.app.daemon import Adapters, Daemon
from reclaimer.app.demo import free_port
from reclaimer.observe.gateway import GatewayClient, GatewayPool
from reclaimer.observe.gpusim import SimulatedBackend
from reclaimer.core.verdicts import Verdict
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.support.e2e import e2e_fixture

pytestmark = pytest.mark.e2e  # every test here starts real servers or processes

KID = "5e5e5e5e-0000-4000-8000-000000000001"
GIB = 1024**3


def http_status(url: str, timeout: float = 2.0) -> tuple[int, str]:
    async def get() -> tuple[int, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                return r.status, await r.text()

    return asyncio.run(get())


def poll(fn, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture
@e2e_fixture
def kernel_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real process whose command line names a kernel connection file, like ipykernel's."""
    conn = tmp_path / f"kernel-{KID}.json"
    conn.write_text("{}")
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-f", str(conn)])
    yield p
    p.kill()
    p.wait()


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(body)
    return path


def test_run_serves_health_and_stops_on_sigterm_within_5s_invariant_9_no_secrets(tmp_path: Path, fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)], processes=[FakeProcess(pid=os.getpid(), gpu=0)])
    port = free_port()
    dead_gateway = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    secret = "s3cr3t-" + os.urandom(8).hex()
    (tmp_path / "hub-token").write_text(secret + "\n")
    cfg = write_config(tmp_path, f"""
listen: 127.0.0.1:{port}
sample_interval: 200ms
decide_interval: 500ms
kubernetes: {{enabled: false}}
gateways: [{{name: down, url: "{dead_gateway}", timeout: 300ms, token_env: DEAD_GW_TOKEN}}]
hub: {{url: "{dead_gateway}", token_file: "{tmp_path / 'hub-token'}", timeout: 300ms}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "reclaimer", "run", "--config", str(cfg), "--log-level", "debug"],
                            env={**fake_nvml.env(), "DEAD_GW_TOKEN": secret},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        poll(lambda: http_status(base + "/readyz")[0] == 200, what="/readyz 200")
        # Liveness never depends on a dependency: the gateway is down, /healthz is still 200.
        assert http_status(base + "/healthz")[0] == 200
        _, metrics = http_status(base + "/metrics")
        assert 'reclaimer_gateway_up{gateway="down"} 0.0' in metrics
        assert "reclaimer_gpu_utilization_ratio" in metrics
        status, report = http_status(base + "/report")
        assert status == 200 and json.loads(report)["gpus"][0]["uuid"] == gpu_uuid(0)
        readyz = http_status(base + "/readyz")[1]
        # Invariant 9: tokens never reach metrics, the report or readiness details.
        assert secret not in metrics and secret not in report and secret not in readyz
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - start < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode()
    assert secret not in out  # invariant 9: nor the logs, at debug level, effective config included
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(rec.get("event") == "effective config" for rec in lines)
    assert any(rec.get("event") == "cycle" for rec in lines)
    assert any(rec.get("event") == "stopping" for rec in lines)


def test_run_once_runs_one_cycle_and_exits(tmp_path: Path, fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)])
    cfg = write_config(tmp_path, f"listen: 127.0.0.1:{free_port()}\nsample_interval: 200ms\ndecide_interval: 1s\n"
                                 "kubernetes: {enabled: false}\n")
    out = subprocess.run([sys.executable, "-m", "reclaimer", "run", "--once", "--config", str(cfg)],
                         env=fake_nvml.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    cycles = [json.loads(line) for line in out.stdout.splitlines() if '"event": "cycle"' in line]
    assert len(cycles) == 1 and cycles[0]["gpus"] == 1


def test_report_window_prints_sampled_gpus_and_processes(tmp_path: Path, fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0), FakeGpu(uuid=gpu_uuid(1), util=40)],
                    processes=[FakeProcess(pid=os.getpid(), gpu=1, memory=3 * GIB)])
    cfg = write_config(tmp_path, "kubernetes: {enabled: false}\nsample_interval: 250ms\ndecide_interval: 1s\n")
    out = subprocess.run([sys.executable, "-m", "reclaimer", "report", "--config", str(cfg), "--window", "1s",
                          "-o", "json"], env=fake_nvml.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    gpus = {g["uuid"]: g for g in report["gpus"]}
    assert gpus[gpu_uuid(1)]["utilization"] == pytest.approx(0.4)
    (p,) = gpus[gpu_uuid(1)]["processes"]
    assert p["pid"] == os.getpid() and p["memory_bytes"] == 3 * GIB and p["kernel_id"] is None and p["reason"]
    assert report["kernels"] == []


def test_missing_nvml_is_a_one_line_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    cfg = write_config(tmp_path, "kubernetes: {enabled: false}\n")
    for cmd in (["run", "--once"], ["report", "--window", "1s"]):
        out = subprocess.run([sys.executable, "-m", "reclaimer", *cmd, "--config", str(cfg)], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        err = [line for line in out.stderr.splitlines() if line.strip()]
        assert err == [err[0]] and err[0].startswith("reclaimer: NVML") and "Traceback" not in out.stderr


class OldIdleGateway:
    """Says the kernel has been idle since January: only the GPU window can hold the reclaim back."""

    def app(self) -> web.Application:
        app = web.Application()

        model = {"id": KID, "name": "python3", "connections": 0, "last_activity": "2026-01-01T00:00:00.000000Z",
                 "execution_state": "idle"}

        async def get_kernel(request: web.Request) -> web.Response:
            if request.match_info["id"] != KID:
                raise web.HTTPNotFound()
            return web.json_response(model)

        async def list_kernels(request: web.Request) -> web.Response:
            return web.json_response([model])

        app.router.add_get("/api/kernels/{id}", get_kernel)
        app.router.add_get("/api/kernels", list_kernels)
        return app


async def test_restart_starts_idle_windows_from_zero(aiohttp_server, kernel_process) -> None:
    server = await aiohttp_server(OldIdleGateway().app())
    idle_after = 2.0
    settings = parse_settings(f"""
mode: dry-run
listen: 127.0.0.1:{free_port()}
sample_interval: 100ms
decide_interval: 300ms
gpu: {{backend: simulated}}
kubernetes: {{enabled: false}}
gateways: [{{name: gw, url: "{server.make_url('')}"}}]
policies: [{{name: p, idle_after: {idle_after}s, warn_before: 1s}}]
""")
    backend = SimulatedBackend({"gpus": [{"uuid": "GPU-1", "model": "NVIDIA H100", "memory_total": 80 * GIB}],
                                "processes": [{"pid": kernel_process.pid, "gpu": 0, "memory_bytes": GIB}]})
    pool = GatewayPool([GatewayClient(settings.gateways[0])])
    seen: list[tuple[float, Verdict]] = []
    daemon = Daemon(settings, Adapters(backend=backend, gateways=pool))
    daemon.on_cycle = lambda snap, _: seen.extend(
        (snap.generated_at - snap.sampler.started_at, d.verdict) for d in snap.decisions if d.candidate.kernel_id == KID)
    task = asyncio.create_task(daemon.run(serve=False))
    try:
        deadline = time.monotonic() + 20
        while not any(v is Verdict.RECLAIM for _, v in seen):
            assert time.monotonic() < deadline and not task.done(), seen
            await asyncio.sleep(0.05)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
    # Kernel idle since January, GPU idle all along: still nothing until the daemon itself saw idle_after of samples.
    assert all(v is not Verdict.RECLAIM for age, v in seen if age < idle_after)
    assert any(v is Verdict.WARN for age, v in seen if age < idle_after)
    first_reclaim_age = next(age for age, v in seen if v is Verdict.RECLAIM)
    assert first_reclaim_age >= idle_after


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, dict[str, str], str]:
    async def get() -> tuple[int, dict[str, str], str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url, headers=headers or {}) as r:
                return r.status, dict(r.headers), await r.text()

    return asyncio.run(get())


def test_item3_real_daemon_requires_the_bearer_token_on_metrics_and_report(tmp_path: Path, fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)])
    port = free_port()
    token_file = tmp_path / "listen-token"
    token_file.write_text("scrape-" + os.urandom(12).hex() + "\n")
    cfg = write_config(tmp_path, f"listen: 127.0.0.1:{port}\nlisten_token_file: {token_file}\nsample_interval: 200ms\n"
                                 "decide_interval: 500ms\nkubernetes: {enabled: false}\n")
    proc = subprocess.Popen([sys.executable, "-m", "reclaimer", "run", "--config", str(cfg)], env=fake_nvml.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: http_status(base + "/readyz")[0] == 200, what="/readyz 200 without a token")
        assert http_status(base + "/healthz")[0] == 200
        token = token_file.read_text().strip()
        for path in ("/metrics", "/report"):
            status, headers, body = http_get(base + path)
            assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="gpu-reclaimer"'
            assert "reclaimer_" not in body
            assert http_get(base + path, {"Authorization": "Bearer nope"})[0] == 401
            assert http_get(base + path, {"Authorization": f"Bearer {token}"})[0] == 200
        poll(lambda: http_get(base + "/report", {"Authorization": f"Bearer {token}"})[0] == 200, what="a report")
        report_cmd = [sys.executable, "-m", "reclaimer", "report", "--from", base, "-o", "json"]
        out = subprocess.run([*report_cmd, "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["gpus"][0]["uuid"] == gpu_uuid(0)
        out = subprocess.run(report_cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "HTTP 401" in out.stderr and "--token-file" in out.stderr
        # RECLAIMER_TOKEN_FILE does what --token-file does.
        out = subprocess.run(report_cmd, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RECLAIMER_TOKEN_FILE": str(token_file)})
        assert out.returncode == 0, out.stderr
        # Rotation: a new Secret value takes effect without a restart; the old one stops working.
        fresh = tmp_path / "listen-token.new"
        fresh.write_text("rotated-" + os.urandom(12).hex())
        fresh.replace(token_file)
        new = token_file.read_text()
        assert http_get(base + "/metrics", {"Authorization": f"Bearer {new}"})[0] == 200
        assert http_get(base + "/metrics", {"Authorization": f"Bearer {token}"})[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        log_text = proc.communicate()[0].decode()
    assert token not in log_text and new not in log_text


def test_item3_an_unreadable_token_file_stops_the_daemon_with_one_line(tmp_path: Path, fake_nvml: FakeNvml) -> None:
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0)])
    missing = tmp_path / "no-such-token"
    cfg = write_config(tmp_path, f"listen: 127.0.0.1:{free_port()}\nlisten_token_file: {missing}\n"
                                 "kubernetes: {enabled: false}\n")
    out = subprocess.run([sys.executable, "-m", "reclaimer", "run", "--config", str(cfg)], env=fake_nvml.env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"listen_token_file {missing} cannot be read" in out.stderr and "Traceback" not in out.stderr


class FailingDeleteGateway(OldIdleGateway):
    """Idle since January, and every DELETE fails: the reclaim is attempted, then backed off."""

    deletes = 0

    def app(self) -> web.Application:
        app = super().app()

        async def delete_kernel(request: web.Request) -> web.Response:
            FailingDeleteGateway.deletes += 1
            return web.json_response({"message": "kernel manager busy"}, status=500)

        app.router.add_delete("/api/kernels/{id}", delete_kernel)
        return app


async def test_item4_backoff_of_a_failing_action_shows_in_the_report_reason(aiohttp_server, kernel_process) -> None:
    from reclaimer.export.report import build_report
    from reclaimer.observe.sampler import Sampler

    server = await aiohttp_server(FailingDeleteGateway().app())
    FailingDeleteGateway.deletes = 0
    settings = parse_settings(f"""
mode: enforce
sample_interval: 1s
decide_interval: 15s
gpu: {{backend: simulated}}
kubernetes: {{enabled: false}}
gateways: [{{name: gw, url: "{server.make_url('')}"}}]
policies: [{{name: p, idle_after: 60s, warn_before: 30s}}]
limits: {{max_clock_skew: 1h}}  # the driven clock runs minutes ahead of the gateway's real Date header (invariant 19)
""")
    backend = SimulatedBackend({"gpus": [{"uuid": "GPU-1", "model": "NVIDIA H100", "memory_total": 80 * GIB}],
                                "processes": [{"pid": kernel_process.pid, "gpu": 0, "memory_bytes": GIB}]})
    clock = [time.time()]
    sampler = Sampler(backend, interval=1.0, window_seconds=settings.longest_window, clock=lambda: clock[0])
    sampler.start(thread=False)
    gateways = GatewayPool([GatewayClient(settings.gateways[0], clock=lambda: clock[0])], clock=lambda: clock[0])
    daemon = Daemon(settings, Adapters(backend=backend, gateways=gateways),
                    clock=lambda: clock[0], sampler=sampler)
    reasons: list[str] = []
    try:
        for _ in range(12):  # 3 minutes, driven: 15 samples then a decide cycle
            for _ in range(15):
                clock[0] += 1.0
                sampler.tick()
            snap, _ = await daemon.cycle()
            (d,) = [d for d in snap.decisions if d.candidate.kernel_id == KID]
            reasons.append(build_report(snap).kernels[0].reason)
    finally:
        await daemon.close()
    assert FailingDeleteGateway.deletes == 2, reasons  # at ~60 s and ~120 s (one minute back-off), not every cycle
    held = [r for r in reasons if "backing off" in r]
    assert held and "backing off after 1 failed attempt (gateway gw: HTTP 500: kernel manager busy); next try in" in held[0]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))


def test_item5_real_daemon_survives_a_blocking_proc_read_and_a_wedged_nvml_call(tmp_path: Path,
                                                                                fake_nvml: FakeNvml) -> None:
    """The real `reclaimer run`: a GPU process whose /proc cmdline read blocks (a FIFO, like a D-state process), then a
    wedged NVML call. Each stalls its own stage only: /readyz says which, the metrics count it, the thread count
    stays flat over many cycles, both recover by themselves, and SIGTERM still ends the daemon while NVML is stuck."""
    from tests.support.nvml_fixtures import FakeDelay
    from tests.test_stall import _fifo_world, _unblock

    proc_tree, fifo, pid = _fifo_world(tmp_path)
    gpus = [FakeGpu(uuid=gpu_uuid(0), util=0)]
    fake_nvml.write(gpus=gpus, processes=[FakeProcess(pid=pid, gpu=0)])
    port = free_port()
    cfg = write_config(tmp_path, f"listen: 127.0.0.1:{port}\nsample_interval: 200ms\ndecide_interval: 500ms\n"
                                 f"procfs_root: {proc_tree.root}\nkubernetes: {{enabled: false}}\n")
    daemon = subprocess.Popen([sys.executable, "-m", "reclaimer", "run", "--config", str(cfg)], env=fake_nvml.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    unblocked = False

    def readyz() -> dict:
        return json.loads(http_status(base + "/readyz")[1])

    def metric(name: str) -> str:
        body = http_status(base + "/metrics")[1]
        return next((line.split()[-1] for line in body.splitlines() if line.startswith(name + " ")), "absent")

    try:
        stalled = poll(lambda: readyz()["components"]["stalled"].get("procfs"), what="procfs stalled in /readyz")
        assert stalled.startswith("/proc reads for 1 GPU process(es) has not returned for")
        assert http_status(base + "/readyz")[0] == 503 and http_status(base + "/healthz")[0] == 200
        assert metric('reclaimer_stalled{stage="procfs"}') == "1.0"
        threads, cycles = _threads(daemon.pid), readyz()["components"]["cycles"]
        poll(lambda: readyz()["components"]["cycles"] >= cycles + 10, what="ten more cycles while stuck")
        assert _threads(daemon.pid) <= threads  # no thread per cycle
        assert metric('reclaimer_stalled_calls_total{stage="procfs"}') == "1.0"  # refused, never started again
        _unblock(fifo)
        unblocked = True
        poll(lambda: http_status(base + "/readyz")[0] == 200, what="ready again once the read returned")
        assert metric('reclaimer_stalled{stage="procfs"}') == "0.0"
        # Now NVML wedges: the sampling tick never returns.
        fake_nvml.write(gpus=gpus, processes=[FakeProcess(pid=pid, gpu=0)],
                        delays=[FakeDelay("nvmlDeviceGetUtilizationRates", ms=600_000)])
        poll(lambda: readyz()["components"]["stalled"].get("nvml"), what="nvml stalled in /readyz")
        assert metric('reclaimer_stalled{stage="nvml"}') == "1.0"
        assert http_status(base + "/healthz")[0] == 200  # liveness never depends on the GPU
        start = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0  # no lock or join waits on the stuck call
        assert time.monotonic() - start < 15
    finally:
        if not unblocked:
            _unblock(fifo)
        fake_nvml.write(gpus=gpus)
        if daemon.poll() is None:
            daemon.kill()
        out = daemon.communicate()[0].decode()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    stalls = [(e.get("stage"), e.get("what")) for e in events if e.get("event") == "call stalled"]
    assert ("procfs", "/proc reads for 1 GPU process(es)") in stalls and ("nvml", "NVML sampling tick") in stalls
    assert any(e.get("event") == "stalled call returned" and e.get("stage") == "procfs" for e in events)


def test_item4_cooldowns_stay_bounded_by_the_recent_actions() -> None:
    """Five actions every cycle for a simulated day: the cooldown map keeps only the last two cooldowns' keys."""
    from reclaimer.core.actions import ActionKind
    from reclaimer.core.model import ActionResult, Candidate, Decision

    settings = parse_settings("gpu: {backend: simulated}\nkubernetes: {enabled: false}\ndecide_interval: 15s\n"
                              "limits: {cooldown: 10m, max_actions_per_cycle: 5}\n")
    daemon = Daemon(settings, Adapters(backend=SimulatedBackend()))
    now = 1_000_000.0
    for cycle in range(24 * 240):
        results = [ActionResult(Decision(Candidate(key=f"kernel:{cycle}-{i}", node="n"), Verdict.RECLAIM,
                                         ActionKind.SHUTDOWN_KERNEL, "idle"), "success", "done", mode="enforce")
                   for i in range(5)] if cycle < 24 * 240 - 100 else []
        daemon.pipeline.remember(results, now)
        assert len(daemon.pipeline.state.last_action_at) <= 5 * (2 * 600 / 15 + 1)
        now += 15
    assert daemon.pipeline.state.last_action_at == {}  # 25 minutes without actions: every cooldown is over and forgotten
