"""State that must stay bounded whatever the workers do: the primary's buffers, loggers, link tables."""

from __future__ import annotations

import multiprocessing
import resource
from typing import Any, Dict

import pytest

from clustersync.relay.primary import Primary

from . import workers
from .relay_helpers import collect, run_workers


@pytest.mark.timeout(120)
def test_logger_and_link_state_stay_flat_over_100k_hubs() -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    primary = Primary(start_method="fork", workers=1)
    try:
        primary.fork(workers.many_hubs, results, 100_000)
        _, before, after, rss_growth_kib = results.get(timeout=100)
        assert primary.join(20)
        channels_left = primary.stats()["channels"]
    finally:
        primary.close(timeout=5)
        results.close()
    members, acks, log_keys = after
    assert (members, acks) == before[:2] == (0, 0)  # nothing kept per channel once its hubs are gone
    assert log_keys <= 1024  # the rate limiter's bound, not one key per hub
    assert rss_growth_kib < 20 * 1024, rss_growth_kib
    assert channels_left == {}  # nor in the primary


@pytest.mark.timeout(120)
def test_a_worker_that_does_not_read_costs_the_primary_its_bound_even_under_an_ack_flood() -> None:
    """Control frames count too: a stuck worker's SUB/UNSUB churn is answered with coalesced ACKs."""
    max_buffer = 1024 * 1024
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    primary = Primary(start_method="fork", workers=2, max_buffer=max_buffer)
    try:
        primary.fork(workers.ack_flood, results, go, stop, 300_000)
        primary.fork(workers.ack_flood, results, go, stop, 300_000)
        collect(results, "ready", 2, 20)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        go.set()
        collect(results, "done", 1, 100)
        snapshot = primary.stats()
        rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        stats: Dict[int, Any] = {w["index"]: w for w in snapshot["workers"]}
        assert stats[0]["buffered"] <= max_buffer + 64 * 1024, stats[0]
        assert stats[0]["dropped"] > 0  # the flood for it was dropped and counted, not queued
        assert rss_growth <= max_buffer + 16 * 1024 * 1024, rss_growth
    finally:
        stop.set()
        primary.close(timeout=2)
        results.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("relay_limit", [1024 * 1024, 8 * 1024 * 1024])
def test_a_message_the_hub_accepts_always_travels(relay_limit: int) -> None:
    """One limit for the hub, the link and the relay: at the limit it travels, past it ValueError; nobody is killed."""
    out = run_workers(workers.limits, 2, relay_limit, max_message=relay_limit)
    _, outcome, _, errors = out[0]
    assert outcome[:2] == [relay_limit, relay_limit]  # both hubs took the relay's limit
    assert outcome[2:] == [
        ("sent", relay_limit - 1),
        ("refused", relay_limit, True),
        ("refused", 10 * 1024 * 1024, True),
    ]
    assert errors == 0
    _, _, got, errors = out[1]
    # Each message reaches both hubs of worker 1 (each hub subscribes once per topic).
    assert got.count(("t", relay_limit - 1)) == 2  # at the limit (with its tag byte)
    assert got.count(("long", relay_limit - 1)) == 2  # with a 64 KiB topic, behind a pending message
    assert got.count(("t", 1)) == 2 and got.count(("t", 3)) == 2 and errors == 0
    assert out["stats"]["malformed"] == 0  # and run_workers checked that every worker exited 0


@pytest.mark.timeout(120)
def test_a_flood_at_the_default_bounds_loses_nothing() -> None:
    """Receivers slower than the publishers slow the publishers down (flow control), they do not lose messages."""
    count = 20_000
    out = run_workers(workers.flood, 4, count, 4096, timeout=100)
    for index in range(4):
        _, got, bad, errors = out[index]
        assert got == [count] * 3 and bad == 0 and errors == 0, (index, got, bad, errors)
    assert out["stats"]["dropped"] == 0
