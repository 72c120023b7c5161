"""The uplink benchmark runs: --smoke on every backplane prints a ratio for each (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKPLANES = ("redis", "postgres", "nats")


@pytest.mark.timeout(90)
def test_bench_uplink_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.uplink", "--smoke", "--backplane", "all"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for backplane in BACKPLANES:
        for model in ("uplink", "per-worker"):
            assert re.search(rf"^{backplane} +{model} ", proc.stdout, re.MULTILINE), output
        assert re.search(rf"^ratio {backplane}: uplink / per-worker = \d+\.\d\dx$", proc.stdout, re.MULTILINE), output
