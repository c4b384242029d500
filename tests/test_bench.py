"""The benchmark harness (bench/): a smoke run at tiny sizes, as CI has it (no nvitop-exporter, matplotlib or
pyinstrument), plus its small pure helpers. No performance thresholds: the harness reports targets, tests don't."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import Row, linear_fit, quantile
from bench.results import ANALYSIS_BEGIN, ANALYSIS_END, PLACEHOLDER, kept_analysis, text_table, write_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
MEASURE_KEYS = ("tick", "attribution", "gateway", "scrape", "steady", "peer", "decide")


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FAKE_NVML_CONFIG", None)
    env.pop("FAKE_NVML_CALL_LOG", None)
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.e2e
def test_smoke_run_reports_every_measure_without_the_optional_parts(tmp_path: Path) -> None:
    done = _bench("--smoke", "--out", str(tmp_path), "--assume-missing", "peer,plot,profile,psutil",
                  timeout=110)
    assert done.returncode == 0, f"harness failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    table = done.stdout
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.strip() and not line.startswith("wrote")]
    for key in MEASURE_KEYS:
        assert key in rows, f"no {key!r} row in the table:\n{table}"
    assert " error " not in table, table
    assert "nvitop-exporter not installed" in table and "matplotlib not installed" in table
    results = (tmp_path / "RESULTS.md").read_text()
    for section in ("## Machine", "## Headline", "## 1. Sampling tick", "## 2. Attribution", "## 3–4. Daemon",
                    "## 5. Gateway load", "## 6. /metrics", "## Profiles", ANALYSIS_BEGIN):
        assert section in results, f"RESULTS.md lacks {section!r}"
    assert not (tmp_path / "scaling.png").exists()  # matplotlib treated as absent: no plot, and it says so
    assert "(/proc), RSS sampled" in results  # psutil treated as absent: CPU and RSS come from /proc


@pytest.mark.e2e
def test_unknown_measure_is_a_usage_error_naming_it() -> None:
    done = _bench("--only", "tick,warp-speed", timeout=60)
    assert done.returncode == 2
    assert "warp-speed" in done.stderr and "unknown measure" in done.stderr


@pytest.mark.parametrize(
    ("xs", "ys", "slope", "intercept", "r2"),
    [
        pytest.param([0, 8, 64, 256], [100, 180, 740, 2660], 10.0, 100.0, 1.0, id="exact-line"),
        pytest.param([1, 2], [3, 5], 2.0, 1.0, None, id="two-points-no-r2"),
        pytest.param([0, 1, 2], [5, 5, 5], 0.0, 5.0, None, id="flat-no-r2"),
    ],
)
def test_linear_fit(xs: list[float], ys: list[float], slope: float, intercept: float, r2: float | None) -> None:
    fit = linear_fit(xs, ys)
    assert fit.slope == pytest.approx(slope)
    assert fit.intercept == pytest.approx(intercept)
    assert fit.r2 == (None if r2 is None else pytest.approx(r2))


def test_linear_fit_refuses_one_point() -> None:
    with pytest.raises(ValueError, match="needs >= 2"):
        linear_fit([1], [2])


@pytest.mark.parametrize(
    ("q", "expected"),
    [pytest.param(0.5, 5, id="median"), pytest.param(0.95, 10, id="p95"), pytest.param(0.0, 1, id="min")],
)
def test_quantile_is_nearest_rank(q: float, expected: float) -> None:
    assert quantile(list(range(10, 0, -1)), q) == expected


def test_rewriting_results_keeps_the_hand_written_analysis(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    assert kept_analysis(path) == PLACEHOLDER
    write_markdown(path, [], {"date": "today"}, "smoke", "python -m bench", 1.0, None)
    text = path.read_text().replace(PLACEHOLDER, "## Analysis\n\nThe tick is fine.\n")
    path.write_text(text)
    write_markdown(path, [], {"date": "tomorrow"}, "full", "python -m bench", 2.0, None)
    rewritten = path.read_text()
    assert "The tick is fine." in rewritten and "tomorrow" in rewritten
    assert rewritten.count(ANALYSIS_BEGIN) == 1 and rewritten.count(ANALYSIS_END) == 1


def test_text_table_aligns_columns() -> None:
    out = text_table([Row("tick", "a", "1", "≤ 2", "ok"), Row("scrape", "longer case", "22 ms", "< 20 ms", "MISS")])
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["measure", "case"]
    assert lines[2].index("a") == lines[3].index("longer case")
