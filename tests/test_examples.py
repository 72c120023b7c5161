"""The examples run as the docs say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_fanout_example_every_worker_receives_everything() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fanout.py")],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("worker ")]
    assert len(lines) == 4, proc.stdout
    assert all("received 12 of 12" in line for line in lines), proc.stdout


@pytest.mark.timeout(60)
def test_cache_example_every_worker_holds_the_same_cache() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cache.py")], capture_output=True, text=True, timeout=50, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("worker "))
    expected = "cache: {1: {'text': 'buy milk', 'id': 1, 'done': True}}"
    assert [line.split(" ", 2)[2] for line in lines] == [expected] * 4, proc.stdout


@pytest.mark.timeout(60)
def test_services_example_the_owner_serves_every_caller() -> None:
    """Callers call right after a barrier, without waiting: an exposed service is found at once."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "services.py")], capture_output=True, text=True, timeout=50, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert lines == [
        "total: 18",
        "worker 1: added 1+2+3, the owner (worker 0) answered",
        "worker 2: added 1+2+3, the owner (worker 0) answered",
        "worker 3: added 1+2+3, the owner (worker 0) answered",
    ], proc.stdout + proc.stderr
