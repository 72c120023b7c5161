"""Synced events: SyncedEmitter over the relay (three workers) and over broadcast_channel (three threads)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List

import pytest

from clustersync import Hub
from clustersync.codec import tagged_dumps, tagged_loads
from clustersync.events import SyncedEmitter
from clustersync.sync import broadcast_channel

from . import workers
from .relay_helpers import run_workers


def check_events(out: Dict[int, Any], sync_type: str) -> None:
    typed = workers.typed_values()
    for index in range(3):
        _, got, errors, stats, other_got, seen_type = out[index]
        assert seen_type == sync_type
        mine = index == 0
        origin = 0 if sync_type == "cluster" else None
        events = [g[0] for g in got]
        if mine:
            assert events == ["created", "local-only", "local-only", "archived", "random", "typed", "after-bad", "end"]
        else:  # exactly once each, and nothing that was kept local
            assert events == ["created", "archived", "typed", "after-bad", "end"]
        created = got[0]
        assert created[1] == {"text": "a", "id": 1} and created[4] == "create"
        assert created[2] is (not mine)  # synced: False where it was emitted, True elsewhere
        assert created[3] == origin  # the emitting worker's index (None outside a worker)
        typed_got = next(g for g in got if g[0] == "typed")[1]
        assert typed_got == typed and type(typed_got["pair"]) is tuple and type(typed_got["tags"]) is set
        assert typed_got["aware"].utcoffset() == typed["aware"].utcoffset()
        assert got[-1][5] == "x"  # the emitter's own context keys are kept
        # The malformed payload went to on_error and was counted; the next event still arrived.
        assert ("ValueError", "delivery") in errors and stats["malformed"] == 1
        assert other_got == ["other key"]  # another key reaches its own listeners only (not in `events`)


@pytest.mark.timeout(90)
def test_synced_events_across_three_workers() -> None:
    out = run_workers(workers.events_worker, 3)
    check_events(out, "cluster")


@pytest.mark.timeout(60)
def test_synced_events_across_three_threads() -> None:
    out: Dict[int, Any] = {}
    barrier = threading.Barrier(3)

    def node(index: int) -> None:
        workers.events_node(
            index,
            lambda **kw: Hub(sync=broadcast_channel(channel="events-threads"), **kw),
            barrier,
            lambda item: out.__setitem__(item[0], item),
        )

    threads = [threading.Thread(target=node, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert sorted(out) == [0, 1, 2]
    check_events(out, "broadcast_channel")


def test_sync_in_and_on_sync_out_bridge_two_hubs_that_share_no_driver() -> None:
    a, b = SyncedEmitter(Hub(), key="bridge"), SyncedEmitter(Hub(), key="bridge")
    a.on_sync_out(b.sync_in)  # a bridge to a system with no driver: here, straight across
    got: List[Any] = []
    b.on("todos", "created", lambda data, ctx: got.append((data, ctx["synced"], ctx["who"])))
    a.emit("todos", "created", {"n": 1}, {"who": "a"})
    a.emit("todos", "created", {"n": 2}, sync=False)
    assert got == [({"n": 1}, True, "a")]
    assert b.stats()["received"] == 1
    with pytest.raises(ValueError, match="key"):
        b.sync_in({"key": "another", "path": "todos", "event": "created", "data": 1, "context": {}})


def test_emit_checks_the_value_before_any_listener_runs() -> None:
    events = SyncedEmitter(Hub(), key="check")
    got: List[Any] = []
    events.on("p", "e", lambda data, ctx: got.append(data))
    with pytest.raises(TypeError, match="object"):
        events.emit("p", "e", {"x": object()})
    with pytest.raises(TypeError, match="tuple"):
        events.emit("p", "e", (1, 2))  # plain JSON would change it: refused, not mangled
    assert got == []
    tagged = SyncedEmitter(Hub(), key="check", serializer=tagged_dumps, deserializer=tagged_loads)
    tagged.on("p", "e", lambda data, ctx: got.append(data))
    tagged.emit("p", "e", (1, 2))
    assert got == [(1, 2)]


def test_once_off_and_a_failing_listener() -> None:
    errors: List[Any] = []
    events = SyncedEmitter(Hub(on_error=lambda e, s: errors.append((str(e), s))), key="once")
    got: List[Any] = []

    def listener(data: Any, ctx: Any) -> None:
        got.append(data)

    events.once("p", "e", listener)
    events.on("p", "e", lambda data, ctx: 1 / 0)
    events.emit("p", "e", 1)
    events.emit("p", "e", 2)
    assert got == [1]
    events.on("p", "e", listener)
    events.off("p", "e", listener)
    events.emit("p", "e", 3)
    assert got == [1] and errors == [("division by zero", "delivery")] * 3


def test_coroutine_listeners_run_on_their_loop_and_report_errors() -> None:
    errors: List[Any] = []
    events = SyncedEmitter(Hub(on_error=lambda e, s: errors.append((type(e).__name__, s))), key="aio")

    async def main() -> List[Any]:
        loop = asyncio.get_running_loop()
        got: List[Any] = []
        done = asyncio.Event()

        async def listener(data: Any, ctx: Any) -> None:
            got.append((data, asyncio.get_running_loop() is loop))
            if data == 2:
                done.set()
            if data == 1:
                raise KeyError("async listener failed")

        events.on("p", "e", listener)
        thread = threading.Thread(target=lambda: (events.emit("p", "e", 1), events.emit("p", "e", 2)))
        thread.start()
        await asyncio.wait_for(done.wait(), 5)
        thread.join(5)
        return got

    assert asyncio.run(main()) == [(1, True), (2, True)]
    assert errors == [("KeyError", "delivery")]
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        events.on("p", "e", _async_listener)


async def _async_listener(data: Any, ctx: Any) -> None:
    return None


def test_a_send_only_emitter_ignores_the_others() -> None:
    hub_a = Hub(sync=broadcast_channel(channel="send-only"))
    hub_b = Hub(sync=broadcast_channel(channel="send-only"))
    sender = SyncedEmitter(hub_a, key="so", receive=False)
    receiver = SyncedEmitter(hub_b, key="so")
    got: List[Any] = []
    heard = threading.Event()
    receiver.on("p", "e", lambda data, ctx: (got.append(("receiver", data)), heard.set()))
    sender.on("p", "e", lambda data, ctx: got.append(("sender", data, ctx["synced"])))
    receiver.emit("p", "e", "from the receiver")
    sender.emit("p", "e", "from the sender")
    assert heard.wait(5)
    assert ("sender", "from the sender", False) in got  # its own, locally
    assert ("sender", "from the receiver", False) not in got and all(g[0] != "sender" or g[1] != "from the receiver" for g in got)
    hub_a.close()
    hub_b.close()


def test_no_event_runs_twice_with_two_emitters_on_one_hub_or_a_store_wrapped_twice() -> None:
    hub = Hub(sync=broadcast_channel(channel="twice"))
    far = Hub(sync=broadcast_channel(channel="twice"))
    a, b, c = SyncedEmitter(hub, key="t"), SyncedEmitter(hub, key="t"), SyncedEmitter(far, key="t")
    store = workers.TodoStore()
    first, second = a.service("todos", store), a.service("todos", store)
    got: Dict[str, List[Any]] = {"a": [], "b": [], "c": []}
    arrived = threading.Event()
    for name, emitter in (("a", a), ("b", b), ("c", c)):
        emitter.on("todos", "created", lambda data, ctx, name=name: got[name].append((data["id"], ctx["synced"])))
    c.on("todos", "created", lambda data, ctx: data["id"] == 2 and arrived.set())
    first.create({"x": 1})
    second.create({"x": 2})
    assert arrived.wait(5)
    assert got["a"] == [(1, False), (2, False)]  # its own, locally, once each
    assert got["b"] == [(1, True), (2, True)]  # the other emitter on the same hub: once each, never sent on
    assert got["c"] == [(1, True), (2, True)]
    assert a.stats()["received"] == 0 and b.stats()["emitted"] == 0
    hub.close()
    far.close()
