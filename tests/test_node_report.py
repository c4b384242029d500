"""A node with two real gateways and a dozen real kernels: the report attributes every GPU process correctly, or
says explicitly why it could not (issue "Attribution and observation", done-when)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from reclaimer.core.config import parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.export.report import build_report, render_json
from reclaimer.export.table import render_table
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    kernel_pid,
    run_code,
    shutdown_kernel,
    start_kernel,
    wait_for_state,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid

GIB = 1024**3
PER_GATEWAY = 6


async def test_two_gateways_a_dozen_kernels_every_process_accounted_for(
    jupyter_server: JupyterProcess, kernel_gateway_unlisted: JupyterProcess, fake_nvml: FakeNvml,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    js, kg = jupyter_server, kernel_gateway_unlisted  # the KG refuses listings (403), as KG/EG do by default
    monkeypatch.setenv("NODE_JS_TOKEN", js.token)
    monkeypatch.setenv("NODE_KG_TOKEN", kg.token)
    ids = {"js": await asyncio.gather(*(start_kernel(js.url, js.token) for _ in range(PER_GATEWAY))),
           "kg": await asyncio.gather(*(start_kernel(kg.url, kg.token) for _ in range(PER_GATEWAY)))}
    handles = {"js": js, "kg": kg}
    try:
        pids = {kid: await kernel_pid(handles[gw].url, handles[gw].token, kid) for gw in ids for kid in ids[gw]}
        parent = ids["js"][0]
        child = int((await run_code(js.url, js.token, parent,
                                    "import subprocess\np = subprocess.Popen(['sleep', '120'])\nprint(p.pid)")).strip())
        busy = ids["kg"][1]
        await run_code(kg.url, kg.token, busy, "import time\ntime.sleep(120)", wait=False)
        await wait_for_state(kg.url, kg.token, busy, "busy")

        all_kernels = [*ids["js"], *ids["kg"]]
        procs = [FakeProcess(pid=pids[kid], gpu=i % 4, memory=(i + 1) * GIB) for i, kid in enumerate(all_kernels)]
        procs += [FakeProcess(pid=child, gpu=3, memory=7 * GIB), FakeProcess(pid=os.getpid(), gpu=2, memory=GIB)]
        fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(i), util=0) for i in range(4)], processes=procs)
        settings = parse_settings(f"""
node_name: node-a
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 5s  # one cycle is run by hand; a long interval only gives the gateways room on a loaded machine
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: false}}
gateways:
  - {{name: js, url: "{js.url}", kind: jupyter-server, token_env: NODE_JS_TOKEN}}
  - {{name: kg, url: "{kg.url}", kind: kernel-gateway, token_env: NODE_KG_TOKEN}}
""")
        daemon = Daemon(settings, build_adapters(settings))
        daemon.sampler.start()
        try:
            deadline = time.monotonic() + 10
            while daemon.sampler.ticks < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            snap, _ = await daemon.cycle()
        finally:
            await daemon.close()
        model = build_report(snap)
        report = json.loads(render_json(model))

        kernels = {k["kernel_id"]: k for k in report["kernels"]}
        assert set(kernels) == set(all_kernels)
        for gw in ids:
            for kid in ids[gw]:
                assert kernels[kid]["gateway"] == gw, kernels[kid]
                assert kernels[kid]["execution_state"] == ("busy" if kid == busy else "idle")
                assert kernels[kid]["last_activity"] is not None
        # The child process (`!python train.py` style) belongs to the kernel that spawned it.
        by_pid = {p["pid"]: (g["uuid"], p) for g in report["gpus"] for p in g["processes"]}
        assert by_pid[child][1]["kernel_id"] == parent
        assert {g["uuid"] for g in kernels[parent]["gpus"]} == {gpu_uuid(0), gpu_uuid(3)}
        # Every kernel process is attributed to its own kernel; the stray one is unattributed, with the reason.
        for i, kid in enumerate(all_kernels):
            uuid, proc = by_pid[pids[kid]]
            assert proc["kernel_id"] == kid and uuid == gpu_uuid(i % 4)
        stray = by_pid[os.getpid()][1]
        assert stray["kernel_id"] is None and "no kernel connection file" in stray["reason"]
        assert snap.gateway_up == {"js": True, "kg": True}
        table = render_table(model)
        assert all(kid[:8] in table for kid in all_kernels)
    finally:
        for gw in ids:
            await asyncio.gather(*(shutdown_kernel(handles[gw].url, handles[gw].token, k) for k in ids[gw]))
