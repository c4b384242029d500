"""The soak, short (issue 10): 1.5 simulated hours of kernel churn through the real daemon components, in enforce and
in dry-run; RSS, open fds, threads, asyncio tasks, /metrics series and every per-key structure stay within the bounds
bench/soak.py states. The full day is `python -m bench soak` (figures in bench/RESULTS.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import soak
from bench.results import write_markdown

pytestmark = [pytest.mark.timeout(120), pytest.mark.e2e]  # e2e: the daemon through a simulated day, seconds each


@pytest.mark.parametrize("mode", ["enforce", "dry-run"])
def test_soak_short_stays_within_its_bounds(mode: str, tmp_path: Path) -> None:
    r = asyncio.run(soak.run_soak(mode, soak.SMOKE, tmp_path))
    assert r.violations == [], r.violations
    assert r.started >= 15 and r.cycles == 181  # the churn really happened, every cycle ran
    assert r.end.hour == soak.SMOKE.hours and r.warm.hour == soak.SMOKE.warmup_hours
    if mode == "enforce":
        assert r.reclaimed >= 1 and r.actions.get("verified", 0) >= 1  # kernels were shut down and verified
        assert r.actions.get("failed", 0) >= 1  # refused DELETEs: the back-off path ran
    else:
        assert r.reclaimed == 0 and r.actions.get("dry-run", 0) >= 1  # would act, never did
    assert set(r.end.tracked) >= ({"warned", "backoff", "pending"} if mode == "enforce" else {"records"})


def test_soak_bounds_catch_growth() -> None:
    """The checks can fail: a run whose figures grew, or whose structures hold history, is reported."""
    figures = {"rss_bytes": 100 * soak.MIB, "fds": 40, "threads": 7, "tasks": 2}
    grown = {"rss_bytes": 130 * soak.MIB, "fds": 60, "threads": 12, "tasks": 5}
    warm = soak.Checkpoint(0.5, figures, 300, 10, 10, {"warned": 3})
    end = soak.Checkpoint(1.5, grown, 300, 10, 10, {"warned": 500, "gpu_history": 6})
    r = soak.SoakResult("enforce", soak.SMOKE, [warm, end], warm, end, 40, 5, 20, 181, {}, 0.0, 0, 1.0, 100, [])
    found = soak.check_bounds(r)
    assert len(found) == 5 and any("RSS grew 30.0 MiB" in v for v in found) and any("warned holds 500" in v for v in found)


def test_soak_section_is_kept_by_the_full_harness(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_markdown(path, [], {"date": "today"}, "full", "python -m bench", 1.0, None)
    soak.write_section(path, "## Soak: 24 simulated hours\n\nflat.\n")
    soak.write_section(path, "## Soak: 24 simulated hours\n\nstill flat.\n")  # replaced, not appended
    write_markdown(path, [], {"date": "tomorrow"}, "full", "python -m bench", 1.0, None)
    text = path.read_text()
    assert text.count(soak.SOAK_BEGIN) == 1 and "still flat." in text and "flat.\n\n" not in text.replace("still", "")
    assert text.index(soak.SOAK_END) < text.index("<!-- analysis:begin")
