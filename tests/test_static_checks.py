"""The static checks .ci/run makes before the tests (ruff lint + format, mypy, import-linter): they run, in that order,
and the configuration in pyproject.toml is the one that catches what it should (each check can fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = (
    "python3 -m ruff check reclaimer",
    "python3 -m ruff format --check reclaimer",
    "python3 -m mypy reclaimer",
    "lint-imports",
)


def test_ci_runs_the_static_checks_before_the_tests_and_stops_on_failure() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in lines  # a failing check ends the run
    pytest_at = lines.index("python3 -m pytest")
    install_at = next(i for i, ln in enumerate(lines) if ln.startswith("python3 -m pip install -q -e '.[test]'"))
    for check in CHECKS:
        at = next(i for i, ln in enumerate(lines) if check in ln and not ln.lstrip().startswith("#"))
        assert install_at < at < pytest_at, check


def _project(tmp_path: Path, module: str) -> Path:
    """A throwaway project: this pyproject.toml and a package ``reclaimer`` holding one module."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "reclaimer").mkdir()
    (tmp_path / "reclaimer" / "__init__.py").write_text('"""Package."""\n')
    (tmp_path / "reclaimer" / "probe.py").write_text(module)
    return tmp_path


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", tool, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.e2e  # runs ruff / mypy (processes)
def test_the_package_passes_ruff() -> None:
    """The positive control for the two below (and the same commands .ci/run runs)."""
    for args in (("check", "reclaimer"), ("format", "--check", "reclaimer")):
        out = _run("ruff", *args, "--no-cache", cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.e2e  # runs ruff / mypy (processes)
def test_ruff_config_catches_an_unused_import_and_a_long_line(tmp_path: Path) -> None:
    probe = '"""Probe."""\n\nimport os\n\nLONG = "' + "x" * 120 + '"\n'
    out = _run("ruff", "check", "--no-cache", "reclaimer", cwd=_project(tmp_path, probe))
    assert out.returncode == 1
    assert "F401" in out.stdout and "E501" in out.stdout, out.stdout


@pytest.mark.e2e  # runs ruff / mypy (processes)
def test_ruff_format_check_fails_on_unformatted_code(tmp_path: Path) -> None:
    out = _run("ruff", "format", "--check", "--no-cache", "reclaimer", cwd=_project(tmp_path, "x = [1,2 ,3]\n"))
    assert out.returncode == 1 and "reclaimer/probe.py" in out.stdout, out.stdout


@pytest.mark.e2e  # runs ruff / mypy (processes)
def test_mypy_config_refuses_untyped_defs_and_targets_python_3_10(tmp_path: Path) -> None:
    probe = (
        '"""Probe."""\n\n\n'
        "def untyped(x):\n    return x\n\n\n"
        "def newer() -> type[BaseException]:\n    return ExceptionGroup  # Python 3.11+: absent on 3.10\n"
    )
    project = _project(tmp_path, probe)
    out = _run("mypy", "--cache-dir", str(tmp_path / ".mypy_cache"), "reclaimer", cwd=project)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[no-untyped-def]" in out.stdout, out.stdout
    assert 'Name "ExceptionGroup" is not defined' in out.stdout, out.stdout
    (project / "reclaimer" / "probe.py").write_text('"""Probe."""\n\n\ndef typed(x: int) -> int:\n    return x\n')
    out = _run("mypy", "--cache-dir", str(tmp_path / ".mypy_cache"), "reclaimer", cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr  # the control: the same config passes typed code
