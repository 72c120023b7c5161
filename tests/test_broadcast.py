"""broadcast_channel: hubs in one process, across threads."""

from __future__ import annotations

import threading
from typing import Any, List, Tuple

import pytest

from clustersync import Address, Hub
from clustersync.sync import broadcast_channel

from .conftest import wait_for


def test_hubs_on_one_channel_reach_each_other_on_their_own_thread() -> None:
    a = Hub(sync=broadcast_channel(channel="bc1"))
    b = Hub(sync=broadcast_channel(channel="bc1"))
    c = Hub(sync=broadcast_channel(channel="other"))
    got_a: List[Any] = []
    got_b: List[Tuple[Any, str]] = []
    got_c: List[Any] = []
    a.subscribe("t", lambda m: got_a.append(m.data))
    b.subscribe("t", lambda m: got_b.append((m.data, threading.current_thread().name)))
    c.subscribe("t", lambda m: got_c.append(m.data))
    assert a.wait_ready(1) and b.wait_ready(1)
    for i in range(1000):
        a.publish("t", i)
    b.publish("t", "from-b")
    wait_for(lambda: len(got_b) == 1001 and "from-b" in got_a)
    remote = [(d, name) for d, name in got_b if d != "from-b"]
    assert [d for d, _ in remote] == list(range(1000))  # in order, once each
    assert threading.current_thread().name not in {name for _, name in remote}  # not on the publisher's thread
    assert got_a == list(range(1000)) + ["from-b"]  # own messages once (locally), b's once
    assert got_c == []
    for hub in (a, b, c):
        hub.close()


def test_bytes_survive_and_subscriber_errors_are_contained() -> None:
    errors: List[str] = []
    a = Hub(sync=broadcast_channel(channel="bc2"))
    b = Hub(sync=broadcast_channel(channel="bc2"), on_error=lambda e, s: errors.append(s))
    got: List[Any] = []
    b.subscribe("t", lambda m: 1 / 0)
    b.subscribe("t", lambda m: got.append(m.data))
    a.publish("t", b"\x00\xff")
    wait_for(lambda: got)
    assert got == [b"\x00\xff"] and type(got[0]) is bytes
    assert errors == ["delivery"]
    a.close()
    b.close()


def test_slow_hub_overflow_drops_oldest_and_counts() -> None:
    release = threading.Event()
    a = Hub(sync=broadcast_channel(channel="bc3", queue_size=10))
    b = Hub(sync=broadcast_channel(channel="bc3", queue_size=10))
    got: List[Any] = []

    def slow(msg: Any) -> None:
        release.wait(10)
        got.append(msg.data)

    b.subscribe("t", slow)
    a.publish("t", "first")
    wait_for(lambda: len(b._driver._queue) == 0 and b._driver.received == 1)
    for i in range(30):
        a.publish("t", i)  # never blocks: b's queue holds 10
    release.set()
    wait_for(lambda: len(got) == 11)
    assert got == ["first"] + list(range(20, 30))
    assert b.stats()["driver"]["dropped"] == 20
    a.close()
    b.close()


def test_close_leaves_the_channel() -> None:
    a = Hub(sync=broadcast_channel(channel="bc4"))
    b = Hub(sync=broadcast_channel(channel="bc4"))
    got: List[Any] = []
    b.subscribe("t", lambda m: got.append(m.data))
    b.close()
    a.publish("t", "x")
    a.close()
    assert got == []


@pytest.mark.parametrize("channel", ["", None, 3])
def test_bad_channel(channel: Any) -> None:
    with pytest.raises(ValueError):
        broadcast_channel(channel=channel)


def test_to_reaches_only_the_addressed_hub() -> None:
    errors: List[Any] = []
    a = Hub(sync=broadcast_channel(channel="bcto"), on_error=lambda e, s: errors.append((e, s)))
    b = Hub(sync=broadcast_channel(channel="bcto"))
    c = Hub(sync=broadcast_channel(channel="bcto"))
    try:
        got_b = b.subscribe("t")
        got_c = c.subscribe("t")
        answers = a.subscribe("answer")
        b.subscribe("t", lambda m: b.publish("answer", m.data, to=m.origin))
        a.publish("t", "for b", to=b.address)
        assert got_b.get(timeout=5).data == "for b"
        reply = answers.get(timeout=5)
        assert reply.data == "for b" and reply.origin == b.address
        a.publish("t", "everyone")
        assert got_c.get(timeout=5).data == "everyone"  # the first thing c got: not "for b"
        assert got_b.get(timeout=5).data == "everyone"
        assert c.stats()["received"] == 1 and c.stats()["driver"]["received"] == 1
        a.publish("t", "nobody", to=Address(-1, "gone"))
        assert [(type(e).__name__, s, e.destination) for e, s in errors] == [
            ("DestinationUnreachable", "publish", Address(-1, "gone"))
        ]
        assert a.stats()["unreachable"] == 1
        with pytest.raises(TypeError):
            a.publish("t", "x", to="b")  # type: ignore[arg-type]
    finally:
        for hub in (a, b, c):
            hub.close()
