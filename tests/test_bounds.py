"""State that must stay bounded whatever the workers do: the primary's buffers, loggers, link tables."""

from __future__ import annotations

import multiprocessing
import resource
import socket
from typing import Any, Dict, List

import pytest

from clustersync.relay.link import WorkerLink
from clustersync.relay.primary import Primary
from clustersync.relay.wire import (
    BROADCAST,
    DATA,
    FRAME_TARGET,
    HEADER,
    HEADER_SIZE,
    check_records,
    max_body,
    parse_records,
)

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


@pytest.mark.timeout(120)
def test_frames_packed_with_tiny_messages_on_many_routes_stay_within_the_relays_bound() -> None:
    """The smallest messages, back to back, on topics, hubs and destinations that change: every frame the link
    packs stays under the relay's bound (none is refused as malformed), and each message arrives once, in order."""
    count = 150_000
    out = run_workers(workers.tiny_mixed, 2, count, max_message=4096, timeout=100)
    _, sent, errors = out[0]
    assert errors == 0 and sum(sent.values()) == count
    _, got, errors, in_order = out[1]
    assert got == sent and errors == 0 and in_order
    assert out["stats"]["malformed"] == 0


@pytest.mark.timeout(60)
def test_the_link_packs_frames_to_the_target_and_never_past_the_relays_bound() -> None:
    """Nobody reads the link's socket while a worker publishes: the writer blocks and the pending frames fill up.
    Every frame must then pass the primary's own check and fit its bound, and hold each message once, in order."""
    count, max_message = 150_000, 4096
    a, b = socket.socketpair()
    link = WorkerLink(a, 3, max_message=max_message, out_limit=64 * 1024 * 1024, publish_block=5.0)
    link.start()
    try:
        routes = [
            link.route(b"ch", BROADCAST, b"", b"1.1.x", b"", b"a"),
            link.route(b"ch", BROADCAST, b"", b"1.2.x", b"ns", b"b"),
            link.route(b"ch", 1, b"9.9.y", b"1.1.x", b"", b"c"),
        ]
        sent = []
        for i in range(count):
            route = routes[2] if i % 50_000 == 0 else routes[(i // 7) % 2]
            data = b"" if i % 5 else str(i).encode()
            link.publish(route, data)
            sent.append((route[5], data))
        got: List[Any] = []
        biggest = 0
        buf = b""
        b.settimeout(10)
        while len(got) < count:
            buf += b.recv(1 << 20)
            while len(buf) >= HEADER_SIZE:
                body_len, kind, clen, origin, dest, n = HEADER.unpack_from(buf)
                if len(buf) < HEADER_SIZE + body_len:
                    break
                if kind == DATA:
                    assert body_len - clen <= max_body(max_message)
                    check_records(buf, HEADER_SIZE + clen, HEADER_SIZE + body_len, n)  # raises if malformed
                    biggest = max(biggest, body_len)
                    for run in parse_records(buf[HEADER_SIZE + clen : HEADER_SIZE + body_len]):
                        got.extend((run[3].encode(), data) for data in run[4])
                buf = buf[HEADER_SIZE + body_len :]
        assert got == sent
        assert biggest > FRAME_TARGET // 2  # the frames did fill up: the bound was tested
    finally:
        link.close(timeout=5)
        a.close()
        b.close()
