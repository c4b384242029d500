"""The pure core imports no I/O library: the import-linter contract in pyproject.toml, run as a test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contract_is_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_the_contract_can_fail(tmp_path: Path) -> None:
    """A module of the pure core that imports aiohttp breaks the contract (so the test above can fail)."""
    pkg = tmp_path / "reclaimer"
    shutil.copytree(ROOT / "reclaimer", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "policy.py").write_text((pkg / "policy.py").read_text() + "\nimport aiohttp  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "BROKEN" in out.stdout
