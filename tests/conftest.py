"""Shared test setup: the shared fixtures and the e2e marker (plugins below), GPU-only tests skip without a device,
async tests must not leak tasks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest

# Registered once for every module: the real servers (each booted once per session), the fake NVML (compiled once per
# source), and the e2e marker with its guard. Ask for these fixtures by name; importing one defines a second copy.
pytest_plugins = ["tests.support.jupyter_fixtures", "tests.support.nvml_fixtures", "tests.support.e2e", "pytester"]


def _real_gpu_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RECLAIMER_FORCE_GPU_TESTS") == "1" or _real_gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a real NVIDIA GPU and driver")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
async def _no_leaked_tasks(request: pytest.FixtureRequest):
    """Fail an async test that leaves background tasks running (they hide failures and bleed into other tests)."""
    if not asyncio.iscoroutinefunction(getattr(request.node, "function", None)):
        yield
        return
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    for _ in range(20):  # give cancelled tasks a few loop turns to finish
        if not leaked:
            break
        await asyncio.sleep(0)
        leaked = [t for t in leaked if not t.done()]
    assert not leaked, f"test leaked tasks: {[t.get_name() for t in leaked]}"
