"""The import-linter contracts in pyproject.toml, run as tests: every contract is kept, and each one can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every test here runs lint-imports (a process)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = {c["name"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
FORBIDDEN = next(name for name, c in CONTRACTS.items() if c["type"] == "forbidden" and "reclaimer.core" in c["source_modules"])
EXECUTORS = next(name for name, c in CONTRACTS.items() if c["type"] == "forbidden" and c["source_modules"] == ["reclaimer.act"])
LAYERS = next(name for name, c in CONTRACTS.items() if c["type"] == "layers")
INDEPENDENCE = next(name for name, c in CONTRACTS.items() if c["type"] == "independence")


def _lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_every_import_linter_contract_is_kept() -> None:
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(CONTRACTS) == 4
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out.stdout
    for name in CONTRACTS:
        assert f"{name} KEPT" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        pytest.param("core/policy.py", "import aiohttp", FORBIDDEN, id="core-imports-aiohttp"),
        pytest.param("act/actions.py", "import aiohttp", EXECUTORS, id="executor-imports-aiohttp"),
        pytest.param("act/actions.py", "import reclaimer.observe.hub", EXECUTORS, id="executor-imports-an-adapter"),
        pytest.param("core/candidates.py", "import reclaimer.observe.procfs", LAYERS, id="core-imports-observe"),
        pytest.param("observe/stall.py", "import reclaimer.export.logs", LAYERS, id="observe-imports-export"),
        pytest.param("act/actions.py", "import reclaimer.export.report", LAYERS, id="act-imports-its-sibling-export"),
        pytest.param("export/metrics.py", "import reclaimer.app.daemon", LAYERS, id="export-imports-app"),
        pytest.param("observe/hub.py", "import reclaimer.observe.gateway", INDEPENDENCE, id="hub-imports-gateway"),
        pytest.param("observe/nvml.py", "import reclaimer.observe.kube", INDEPENDENCE, id="nvml-imports-kube"),
        pytest.param("newstage.py", "", LAYERS, id="a-module-in-no-layer"),
    ],
)
def test_each_contract_can_fail(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """A copy of the package with one forbidden import (or a module placed in no layer) breaks exactly that contract,
    so the test above can fail."""
    pkg = tmp_path / "reclaimer"
    shutil.copytree(ROOT / "reclaimer", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = pkg / module
    target.write_text((target.read_text() if target.exists() else '"""A stage placed in no layer."""\n') + f"\n{line}\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = _lint_imports(tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0, out.stdout + out.stderr
    assert f"{broken} BROKEN" in out.stdout, out.stdout + out.stderr
    for other in CONTRACTS.keys() - {broken}:
        assert f"{other} KEPT" in out.stdout, out.stdout
