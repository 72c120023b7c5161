"""The benchmark runs: --quick, clustersync rows alone, every check passing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_bench_quick_clustersync_rows(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "clustersync", "--workers", "4",
         "--payloads", "100", "--json", str(out)],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fanout" in proc.stdout and "sparse" in proc.stdout and "latency" in proc.stdout
    assert "all checks passed" in proc.stdout
    results = json.loads(out.read_text())
    assert results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("consume", ["get", "async"])
def test_bench_quick_latency_with_get_and_async_for(consume: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "clustersync", "--workers", "2",
         "--payloads", "100", "--consume", consume, "--json", str(out)],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line[:1].isalpha() and "  " in line]
    assert f"consume {consume}" in proc.stdout and "latency" in rows and "fanout" not in rows
    assert "all checks passed" in proc.stdout
    assert json.loads(out.read_text())["meta"]["consume"] == consume


@pytest.mark.timeout(120)
def test_bench_instructions_runs_every_path_and_counts_under_valgrind() -> None:
    """Every path of the instruction counter runs (each checks what it delivered); valgrind counts one of them."""
    for path in ("publish", "link", "receive", "parse", "feed", "pipe", "call"):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.instructions", "--child", path, "1024"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert proc.returncode == 0, (path, proc.stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--paths", "call", "--messages", "2560"],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    name, count = proc.stdout.split()
    assert name == "call" and 50 < int(count.replace(",", "")) < 10_000, proc.stdout
