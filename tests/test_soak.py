"""The soak scenarios of ``python -m bench.soak``, scaled down to run in CI (as a command: tests import no bench code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

ROOT = Path(__file__).resolve().parent.parent


def soak(*args: str) -> Dict[str, Any]:
    """Run one scenario; return its figures (the JSON that ends its output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", *args], cwd=ROOT, capture_output=True, text=True, timeout=100
    )
    out = proc.stdout
    start = out.rfind("\n{\n")
    assert start >= 0 or out.startswith("{"), f"no figures:\n{out}\n{proc.stderr}"
    figures: Dict[str, Any] = json.loads(out[start + 1 :] if start >= 0 else out)
    figures["exit"] = proc.returncode
    return figures


@pytest.mark.timeout(120)
def test_churn_workers_killed_under_load() -> None:
    """20 SIGKILLs, one every 300 ms: no stall, every replacement receives, nothing lost between live workers."""
    figures = soak("churn", "--seconds", "6", "--interval", "0.3")
    assert figures["kills"] >= 20
    assert figures["stalls"] == 0 and figures["not_back"] == 0, figures
    assert figures["gaps"] == [0, 0, 0, 0] and figures["dropped"] == 0, figures
    assert figures["fds_after"] <= figures["fds_before"], figures
    assert figures["rss_kib_after"] - figures["rss_kib_before"] < 10 * 1024, figures
    assert figures["exit"] == 0, figures


@pytest.mark.timeout(120)
def test_stuck_consumer_costs_its_bound_and_only_its_own_messages() -> None:
    figures = soak("stuck", "--seconds", "4")
    assert figures["dropped_for_stuck"] > 0, figures
    assert figures["drops_exact"], figures  # received + dropped == published to it, after SIGCONT
    assert figures["buffered_for_stuck"] <= figures["max_buffer"], figures
    assert figures["rss_growth_kib"] * 1024 <= figures["max_buffer"] + 16 * 1024 * 1024, figures
    assert figures["gaps_in_healthy"] == [0, 0, 0], figures
    assert figures["rate_ratio"] >= 0.8, figures  # the others' delivery rate while one is stuck
    assert figures["exit"] == 0, figures
