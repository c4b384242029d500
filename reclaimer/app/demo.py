"""`reclaimer demo`: a whole simulated node on a laptop.

A real Jupyter Kernel Gateway with real ipykernel kernels; simulated GPUs whose processes are those kernels'
real PIDs; the daemon in enforce mode with short thresholds, serving /metrics. Four kernels show the rules:
  idle      idle kernel on an idle GPU      -> warned, then shut down, GPU memory verified released (the summary
                                               says what that recovered: GPU memory, not the GPU allocation)
  training  kernel in a long silent cell    -> busy: never touched
  reserved  kernel of an exempt kernelspec  -> exempt
  bg-job    idle kernel whose GPU is busy   -> GPU busy: never touched
plus a GPU process that belongs to no kernel (reported as unattributed, never a candidate).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reclaimer.app.kernelclient import GatewayRest
from reclaimer.core import actionkinds
from reclaimer.core.actions import Recovers
from reclaimer.core.config import Settings, format_duration, parse_settings
from reclaimer.core.model import ActionResult, CycleSnapshot
from reclaimer.core.results import DONE, RELEASED, VERIFIED
from reclaimer.core.verdicts import Verdict

if TYPE_CHECKING:
    from rich.console import Group

GiB = 1024**3
RESERVED_KERNEL = "gpu-reserved"
# What the demo needs beyond the daemon (the `demo` extra): module -> the distribution that provides it.
DEMO_MODULES = {"kernel_gateway": "jupyter-kernel-gateway", "ipykernel": "ipykernel", "rich": "rich"}
DEMO_INSTALL = "pip install 'gpu-reclaimer[demo]' (in a checkout: pip install '.[demo]')"


def missing_demo_dependencies() -> list[str]:
    """The distributions of the `demo` extra that are not installed; empty when the demo can run."""
    return [dist for module, dist in DEMO_MODULES.items() if importlib.util.find_spec(module) is None]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class DemoKernel:
    role: str
    kernel_id: str
    pid: int
    gpu: int
    memory: int
    kernel_name: str = "python3"


@dataclass
class DemoState:
    kernels: list[DemoKernel] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    reclaimed: dict[str, int] = field(default_factory=dict)  # kernel id -> bytes verified released
    recovered: dict[str, Recovers] = field(default_factory=dict)  # kernel id -> what its action gives back
    released_gpus: int = 0  # GPU allocations verified released
    acted: set[str] = field(default_factory=set)
    last: CycleSnapshot | None = None
    started: float = field(default_factory=time.monotonic)


def _write_reserved_kernelspec(root: Path) -> None:
    spec = root / "kernels" / RESERVED_KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (GPU, reserved)",
                "language": "python",
            }
        )
    )


class KernelGatewayProcess:
    """A real `jupyter kernelgateway` on loopback, in its own process group so every kernel dies with it."""

    def __init__(self, workdir: Path, token: str):
        self.workdir = workdir
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "kernelgateway.log"

    def start(self) -> None:
        env = dict(os.environ)
        env["JUPYTER_PATH"] = str(self.workdir / "share") + os.pathsep + env.get("JUPYTER_PATH", "")
        env["JUPYTER_RUNTIME_DIR"] = str(self.workdir / "runtime")
        env["KG_AUTH_TOKEN"] = self.token
        cmd = [
            sys.executable,
            "-m",
            "kernel_gateway",
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={self.port}",
            "--JupyterWebsocketPersonality.list_kernels=True",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.workdir,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        rest = GatewayRest(self.url, self.token, timeout=2.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kernel gateway exited ({self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(Exception):
                await rest._request("GET", "/api/kernelspecs")
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"kernel gateway did not answer within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def demo_settings(gateway_url: str, token_env: str, listen: str) -> Settings:
    return parse_settings(
        f"""
mode: enforce
node_name: demo-node
listen: "{listen}"
sample_interval: 500ms
decide_interval: 2s
gpu: {{backend: simulated}}
gateways:
  - {{name: demo-kg, url: "{gateway_url}", kind: kernel-gateway, token_env: {token_env}, timeout: 2s}}
kubernetes: {{enabled: false}}
policies:
  - name: demo
    gpu_idle_below: 0.05
    idle_after: 20s
    warn_before: 10s
    action: auto
exemptions: {{kernel_names: [{RESERVED_KERNEL}]}}
limits: {{max_actions_per_cycle: 2, cooldown: 1m, max_fraction_per_cycle: 0.5}}
""",
        "<demo>",
    )


def _scenario() -> dict[str, Any]:
    return {
        "gpus": [
            {
                "uuid": f"GPU-de000000-0000-4000-8000-00000000000{i}",
                "model": "NVIDIA A100-SXM4-80GB",
                "memory_total": 80 * GiB,
                "utilization": 0.0,
            }
            for i in range(5)
        ],
        "processes": [],
        "drop_dead_pids": True,
    }


def _render(state: DemoState, now: float, metrics_url: str) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"reclaimer demo — enforce mode, {format_duration(time.monotonic() - state.started)} in; "
        f"metrics at {metrics_url}",
        expand=False,
    )
    for col in ("ROLE", "KERNEL", "GPU", "MEM", "STATE", "IDLE", "VERDICT", "ETA", "REASON"):
        table.add_column(col, overflow="fold")
    by_kernel = {d.candidate.kernel_id: d for d in (state.last.decisions if state.last else ())}
    colours = {
        Verdict.RECLAIM.value: "bold red",
        Verdict.WARN.value: "yellow",
        Verdict.KEEP.value: "green",
        Verdict.EXEMPT.value: "cyan",
        Verdict.UNKNOWN.value: "magenta",
    }
    for k in state.kernels:
        d = by_kernel.get(k.kernel_id)
        if k.kernel_id in state.reclaimed:
            verdict, state_txt, reason = (
                Text("reclaimed", "bold red"),
                "shut down",
                f"{state.reclaimed[k.kernel_id] / GiB:.0f} GiB GPU memory released",
            )
            idle = eta = "-"
        elif d is None:
            verdict, state_txt, reason, idle, eta = Text("-"), "-", "waiting for the first cycle", "-", "-"
        else:
            verdict = Text(d.verdict.value, colours.get(d.verdict.value, ""))
            state_txt = (d.candidate.activity.execution_state if d.candidate.activity else None) or "?"
            idle = (
                format_duration(d.idle_seconds)
                if d.idle_seconds is not None
                else ("-" if d.verdict is Verdict.EXEMPT else "?")
            )
            eta = (
                format_duration(d.eta_seconds)
                if d.eta_seconds is not None and d.verdict in (Verdict.WARN, Verdict.RECLAIM)
                else "-"
            )
            reason = d.reason
        table.add_row(
            k.role, k.kernel_id[:8], str(k.gpu), f"{k.memory / GiB:.0f}Gi", state_txt, idle, verdict, eta, reason
        )
    lines = [Text(e) for e in state.events[-8:]]
    return Group(table, *lines)


async def _setup(workdir: Path, token: str, kg: KernelGatewayProcess, backend: Any) -> list[DemoKernel]:
    rest = GatewayRest(kg.url, token)
    roles = [
        ("idle", "python3", 0, 20 * GiB),
        ("training", "python3", 1, 30 * GiB),
        ("reserved", RESERVED_KERNEL, 2, 40 * GiB),
        ("bg-job", "python3", 3, 10 * GiB),
    ]
    ids = await asyncio.gather(*(rest.start_kernel(name) for _, name, _, _ in roles))
    pids = await asyncio.gather(*(rest.pid(kid) for kid in ids))  # talking to a kernel also makes it `idle`
    kernels = [
        DemoKernel(role, kid, pid, gpu, mem, name)
        for (role, name, gpu, mem), kid, pid in zip(roles, ids, pids, strict=True)
    ]
    for k in kernels:
        backend.add_process(k.gpu, k.pid, k.memory, None)
    backend.set_utilization(3, 0.92)  # a background job started from the bg-job kernel keeps its GPU busy
    # A long silent cell: the GPU idles, but the kernel is busy, so it is never touched.
    await rest.execute(kernels[1].kernel_id, "import time\ntime.sleep(3600)", wait=False)
    return kernels


def run_demo(duration: float = 90.0, port: int = 9400, live: bool | None = None, keep_going: bool = False) -> int:
    """Run the simulated node until the idle kernel is reclaimed and verified (plus a short tail), or ``duration``.

    ``keep_going``: stay up for the whole ``duration`` (to look at /metrics or Grafana) instead of ending early.
    """
    from rich.console import Console
    from rich.live import Live

    from reclaimer.app.daemon import Adapters, Daemon
    from reclaimer.export.logs import configure_logging
    from reclaimer.observe.gateway import GatewayClient, GatewayPool
    from reclaimer.observe.gpusim import SimulatedBackend

    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(stderr=False, width=200)  # plain progress lines are not wrapped at 80 columns in a pipe
    live = console.is_terminal if live is None else live
    configure_logging("warning", stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="reclaimer-demo-"))
    (workdir / "runtime").mkdir()
    _write_reserved_kernelspec(workdir / "share")
    token = secrets.token_hex(16)
    token_env = "RECLAIMER_DEMO_GATEWAY_TOKEN"
    os.environ[token_env] = token
    if not port_free(port):
        old, port = port, free_port()
        console.print(f"port {old} is busy; serving /metrics on {port} instead")
    settings = demo_settings("http://127.0.0.1:0", token_env, f"127.0.0.1:{port}")
    kg = KernelGatewayProcess(workdir, token)
    settings = settings.model_copy(update={"gateways": (settings.gateways[0].model_copy(update={"url": kg.url}),)})
    backend = SimulatedBackend(_scenario())
    stray = subprocess.Popen(["sleep", str(int(duration) + 60)], start_new_session=True)
    state = DemoState()
    metrics_url = f"http://127.0.0.1:{port}/metrics"

    def note(msg: str) -> None:
        stamp = format_duration(time.monotonic() - state.started)
        state.events.append(f"[{stamp:>6}] {msg}")
        if not live:
            console.print(state.events[-1], highlight=False)

    def on_cycle(snap: CycleSnapshot, results: Sequence[ActionResult]) -> None:
        state.last = snap
        roles = {k.kernel_id: k.role for k in state.kernels}
        for r in results:
            kid = r.decision.candidate.kernel_id or r.decision.candidate.key
            who = f"{roles.get(kid, '?')} kernel {kid[:8]}"
            if r.result == VERIFIED:
                state.reclaimed[kid] = r.reclaimed_bytes
                state.recovered[kid] = actionkinds.recovers(r.decision.action, r.decision.candidate)
                note(f"verified: {who} released {r.reclaimed_bytes / GiB:.0f} GiB of GPU memory")
            elif r.result == RELEASED:
                state.released_gpus += r.released_gpus
                note(f"released: {who}: {r.detail}")
            elif kid not in state.acted or r.result not in DONE:
                state.acted.add(kid)
                note(f"{r.decision.action.value} {who}: {r.result} {r.detail}".rstrip())
        for d in snap.decisions:
            kid = d.candidate.kernel_id or ""
            if d.verdict is Verdict.WARN and f"warn:{kid}" not in state.acted:
                state.acted.add(f"warn:{kid}")
                note(f"warning: {roles.get(kid, '?')} kernel {kid[:8]} — {d.reason}")

    async def main() -> int:
        pool = GatewayPool([GatewayClient(settings.gateways[0])])
        daemon = Daemon(settings, Adapters(backend=backend, gateways=pool), on_cycle=on_cycle)
        kg.start()
        await kg.wait_ready()
        state.kernels = await _setup(workdir, token, kg, backend)
        backend.add_process(4, stray.pid, 5 * GiB, None)
        note(
            f"kernel gateway at {kg.url}; {len(state.kernels)} kernels started; a stray process "
            f"(pid {stray.pid}) on GPU 4 belongs to no kernel"
        )
        task = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + duration
        done_at: float | None = None
        live_ctx = (
            Live(_render(state, time.time(), metrics_url), console=console, refresh_per_second=4)
            if live
            else contextlib.nullcontext()
        )
        try:
            with live_ctx as lv:
                while time.monotonic() < deadline and not task.done():
                    if lv is not None:
                        lv.update(_render(state, time.time(), metrics_url))
                    if done_at is None and state.reclaimed:
                        done_at = time.monotonic()
                    if (
                        not keep_going
                        and done_at is not None
                        and time.monotonic() - done_at > 2 * settings.decide_interval
                    ):
                        break
                    await asyncio.sleep(0.25)
                if lv is not None:
                    lv.update(_render(state, time.time(), metrics_url))
        finally:
            daemon.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        return _summary(console, state, daemon)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        kg.stop()
        with contextlib.suppress(ProcessLookupError):
            stray.kill()
        stray.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)
        os.environ.pop(token_env, None)


def _summary(console: Any, state: DemoState, daemon: Any) -> int:
    last = state.last
    verdicts = {d.candidate.kernel_id: d for d in (last.decisions if last else ())}
    console.print()
    console.print("[bold]Summary[/bold]")
    ok = True
    for k in state.kernels:
        if k.kernel_id in state.reclaimed:
            line = (
                f"reclaimed: shut down, freed {state.reclaimed[k.kernel_id] / GiB:.0f} GiB GPU memory; "
                + _what_stays(state.recovered.get(k.kernel_id))
            )
        else:
            d = verdicts.get(k.kernel_id)
            line = (
                (d.reason if d.reason.startswith(d.verdict.value) else f"{d.verdict.value}: {d.reason}")
                if d
                else "not seen"
            )
        console.print(f"  {k.role:<9} kernel {k.kernel_id[:8]} GPU {k.gpu}: {line}", highlight=False)
    expected_reclaimed = {k.kernel_id for k in state.kernels if k.role == "idle"}
    if set(state.reclaimed) != expected_reclaimed:
        ok = False
        console.print("  [red]the idle kernel was not reclaimed within the demo's time[/red]")
    unattributed = last.unattributed if last else ()
    for p in unattributed:
        console.print(f"  unattributed: pid {p.pid} on {p.gpu_uuid[:12]}…: {p.reason}", highlight=False)
    freed = sum(state.reclaimed.values())
    console.print(
        f"  GPU memory given back: {freed / GiB:.0f} GiB; GPU allocations released: {state.released_gpus}; "
        f"{len(state.reclaimed)} of {len(state.kernels)} kernels reclaimed in "
        f"{format_duration(time.monotonic() - state.started)}"
    )
    console.print(
        "  Freeing GPU memory is not freeing the GPU: a kernel shut down inside a notebook pod frees its "
        "memory, but the pod keeps its nvidia.com/gpu allocation, so no one else can be scheduled on that "
        "GPU until the server stops or the pod goes (policy action: auto picks that where it can).",
        highlight=False,
    )
    return 0 if ok else 1


def _what_stays(recovered: Recovers | None) -> str:
    """What the summary says a reclaim did not give back."""
    if recovered is Recovers.ALLOCATION:
        return "its GPU allocation was released too"
    # This node has no Kubernetes: the kernel held GPU memory only. In a notebook pod the allocation would stay.
    return (
        "memory only — in a notebook pod the GPU allocation stays with the pod "
        "(use stop-server or action: auto to release it)"
    )
