"""The soak scenarios of bench/soak.py, scaled down to run in CI."""

from __future__ import annotations

import pytest

from bench.soak import run_churn, run_stuck


@pytest.mark.timeout(120)
def test_churn_workers_killed_under_load() -> None:
    """20 SIGKILLs, one every 300 ms: no stall, every replacement receives, nothing lost between live workers."""
    figures = run_churn(seconds=6.0, interval=0.3)
    assert figures["kills"] >= 20
    assert figures["stalls"] == 0 and figures["not_back"] == 0, figures
    assert figures["gaps"] == [0, 0, 0, 0] and figures["dropped"] == 0, figures
    assert figures["fds_after"] <= figures["fds_before"], figures
    assert figures["rss_kib_after"] - figures["rss_kib_before"] < 10 * 1024, figures


@pytest.mark.timeout(120)
def test_stuck_consumer_costs_its_bound_and_only_its_own_messages() -> None:
    figures = run_stuck(seconds=4.0)
    assert figures["dropped_for_stuck"] > 0, figures
    assert figures["drops_exact"], {k: figures[k] for k in ("received_by_stuck", "dropped_for_stuck", "published_to_stuck", "dropped_before_stop", "relayed_to_stuck", "unroutable", "buffered_after")}  # received + dropped == published to it, after SIGCONT
    assert figures["buffered_for_stuck"] <= figures["max_buffer"], figures
    assert figures["rss_growth_kib"] * 1024 <= figures["max_buffer"] + 16 * 1024 * 1024, figures
    assert figures["gaps_in_healthy"] == [0, 0, 0], figures
    assert figures["rate_ratio"] >= 0.8, figures  # the others' delivery rate while one is stuck
