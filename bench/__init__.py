"""Benchmark harness for gpu-reclaimer: sampling overhead, attribution, steady state, peer, gateway load, scrape.

Run ``python -m bench`` (full, < 10 min on 2 cores; writes bench/RESULTS.md and bench/scaling.png) or
``python -m bench --smoke`` (tiny sizes, what tests/test_bench.py runs). Every measured configuration that loads
NVML runs in its own subprocess with the fake ``libnvidia-ml.so.1`` from tests/support (pynvml keeps one library
per process). Numbers are medians over repeated runs; ratios are taken within one run.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
