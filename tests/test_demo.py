"""`reclaimer demo` runs to completion as a user would run it, serves /metrics meanwhile, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reclaimer.app.demo import free_port

pytestmark = pytest.mark.e2e  # every test here starts real servers or processes


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_demo_runs_to_completion_and_cleans_up() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reclaimer", "demo", "--no-live", "--port", str(port),
                             "--duration", "100s"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    metrics = ""
    try:
        deadline = time.monotonic() + 60
        while "reclaimer_kernel_info" not in metrics and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = r.read().decode()
            except OSError:
                pass
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "reclaimer_kernel_info" in metrics and "reclaimer_gpu_utilization_ratio" in metrics
    assert "warning: idle kernel" in out
    assert "shutdown-kernel idle kernel" in out and "verified: idle kernel" in out
    summary = out[out.index("Summary"):]
    assert "idle      kernel" in summary and "reclaimed: shut down" in summary
    # Invariant 17: the summary says what the shutdown recovered (GPU memory), and that the allocation is another thing.
    idle_line = next(line for line in summary.splitlines() if line.lstrip().startswith("idle "))
    assert "freed 1 GiB GPU memory" not in idle_line and "GiB GPU memory; memory only" in idle_line
    assert "the GPU allocation stays with the pod (use stop-server or action: auto to release it)" in idle_line
    assert "GPU allocations released: 0" in summary
    assert "Freeing GPU memory is not freeing the GPU" in summary
    assert "training  kernel" in summary and "kernel busy" in summary
    assert "reserved  kernel" in summary and "exempt" in summary
    assert "bg-job    kernel" in summary and "GPU 3 busy" in summary
    assert "unattributed: pid" in summary
    assert "1 of 4 kernels reclaimed" in summary
    # Every process the demo started (gateway, kernels, the stray process) is gone.
    assert _processes_mentioning("reclaimer-demo-") == []
