"""Worker functions for the cluster tests (module level, so spawn can pickle them)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Dict, List, Tuple

from clustersync import Hub, Message, current_worker
from clustersync.sync import cluster, setup_primary_cluster


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def exchange(results: Any, barrier: Any, channel: str, count: int, publishers: Any, kind: str) -> None:
    """Subscribe, publish ``count`` messages if this worker is a publisher, collect what arrives."""
    me = current_worker()
    assert me is not None
    got: List[Tuple[Any, ...]] = []
    hub = Hub(sync=cluster(channel=channel))
    hub.subscribe("t", lambda m: got.append((m.origin, m.data)))
    ready = hub.wait_ready(10)
    barrier.wait(20)
    if me.index in publishers:
        for i in range(count):
            if kind == "bytes":
                hub.publish("t", bytes([me.index]) + i.to_bytes(4, "big") + b"\x00\xff" * 8)
            elif kind == "str":
                hub.publish("t", f"{me.index}:{i}:é")
            else:
                hub.publish("t", {"w": me.index, "i": i})
    others = [p for p in publishers if p != me.index]
    expected = count * len(others) + (count if me.index in publishers else 0)
    _wait(lambda: len(got) >= expected, 30)
    results.put((me.index, hub.address, ready, got, hub.stats()))
    barrier.wait(30)  # nobody leaves before everybody has counted (a late duplicate would show)
    hub.close()


def two_hubs(results: Any, barrier: Any) -> None:
    """Two hubs on one channel in one worker: each gets the other's messages once, not its own twice."""
    a = Hub(sync=cluster(channel="pair"))
    b = Hub(sync=cluster(channel="pair"))
    got_a: List[Any] = []
    got_b: List[Any] = []
    a.subscribe("t", lambda m: got_a.append(m.data))
    b.subscribe("t", lambda m: got_b.append(m.data))
    assert a.wait_ready(10) and b.wait_ready(10)
    barrier.wait(20)
    a.publish("t", "from-a")
    b.publish("t", "from-b")
    a.publish("t", "end-a")
    b.publish("t", "end-b")
    _wait(lambda: len(got_a) >= 8 and len(got_b) >= 8, 10)
    results.put((current_worker().index, sorted(got_a), sorted(got_b)))
    barrier.wait(20)
    a.close()
    b.close()


def channels(results: Any, barrier: Any) -> None:
    """Workers 0 and 1 use channel 'a', worker 2 'b'; worker 0 also ends with a marker on 'b'."""
    me = current_worker().index
    got: List[Any] = []
    mine = "b" if me == 2 else "a"
    hub = Hub(sync=cluster(channel=mine))
    hub.subscribe("t", lambda m: got.append(m.data))
    marker = Hub(sync=cluster(channel="b")) if me == 0 else None
    assert hub.wait_ready(10) and (marker is None or marker.wait_ready(10))
    barrier.wait(20)
    if me == 0:
        for i in range(100):
            hub.publish("t", f"a{i}")
        marker.publish("t", "marker")
    _wait(lambda: (got and got[-1] == "marker") if me == 2 else len(got) >= (100 if me == 1 else 100), 10)
    results.put((me, got))
    barrier.wait(20)
    hub.close()
    if marker is not None:
        marker.close()


def unicast(results: Any, barrier: Any) -> None:
    """Worker 0 sends to worker 2 alone, then broadcasts a marker."""
    me = current_worker().index
    got: List[Any] = []
    hub = Hub(sync=cluster(channel="uni"))
    hub.subscribe("t", lambda m: got.append(m.data))
    assert hub.wait_ready(10)
    barrier.wait(20)
    if me == 0:
        for i in range(10):
            hub.publish("t", f"direct{i}", to=2)
        hub.publish("t", "marker")
    else:
        _wait(lambda: "marker" in got, 10)
    results.put((me, got))
    barrier.wait(20)
    hub.close()


def async_iter(results: Any, barrier: Any, count: int, on_loop: bool = False) -> None:
    """Read a subscription with ``async for`` while another worker publishes (``on_loop``: the loop reads
    the pipe, after ``hub.read_on_loop()``)."""
    me = current_worker().index
    hub = Hub(sync=cluster(channel="aio"))
    sub = hub.subscribe("t")
    assert hub.wait_ready(10)
    barrier.wait(20)
    if me == 0:
        for i in range(count):
            hub.publish("t", i)
        results.put((me, None))
    else:

        async def read() -> List[Any]:
            out = []
            if on_loop:
                assert hub.read_on_loop()
            async for msg in sub:
                out.append(msg.data)
                if len(out) == count:
                    break
            return out

        results.put((me, asyncio.run(asyncio.wait_for(read(), 20))))
    hub.close()


def nested_setup(results: Any) -> None:
    """setup_primary_cluster() in a worker returns None; current_worker() and the env say who we are."""
    me = current_worker()
    results.put(
        (
            me.index,
            me.count,
            me.pid == os.getpid(),
            setup_primary_cluster() is None,
            os.environ.get("CLUSTERSYNC_WORKER_ID"),
            os.environ.get("CLUSTERSYNC_WORKERS"),
        )
    )


def sleeper(results: Any) -> None:
    """Report the pid, then block forever (until the pipe to the primary closes)."""
    results.put(os.getpid())
    while True:
        time.sleep(3600)


def slow_consumer(results: Any, go: Any, again: Any, count: int) -> None:
    """Worker 0 publishes ``count`` 4 KiB messages and "end", then "final" once ``again`` is set.

    Worker 0 paces itself on worker 1's acknowledgements (channel "acks"), so
    only a stopped worker falls behind. Workers 1 and 2 count what they get;
    the test stops worker 2 meanwhile.
    """
    me = current_worker().index
    chunk = 200
    got: List[Any] = []
    acked: List[Any] = []
    hub = Hub(sync=cluster(channel="slow"))
    acks = Hub(sync=cluster(channel="acks")) if me in (0, 1) else None
    if me == 0:
        acks.subscribe("ack", lambda m: acked.append(m.data))
    hub.subscribe("t", lambda m: got.append(m.data))
    if me == 1:
        hub.subscribe("t", lambda m: len(got) % chunk == 0 and acks.publish("ack", len(got)))
        # (message by message: this callback runs after the one above for each message)
    assert hub.wait_ready(10) and (acks is None or acks.wait_ready(10))
    results.put(("ready", me))
    if me != 2:  # worker 2 is stopped by the test; it must not wait on a shared lock
        assert go.wait(20)
    if me == 0:
        for i in range(count):
            hub.publish("t", b"x" * 4096)
            if (i + 1) % chunk == 0:
                assert _wait(lambda: acked and acked[-1] >= i + 1, 20)
        hub.publish("t", "end")
        assert again.wait(30)
        hub.publish("t", "final")
    elif me == 1:
        _wait(lambda: "end" in got, 30)
        results.put(("done", me, len(got)))
    else:
        _wait(lambda: "final" in got, 30)
        results.put(("done", me, len(got) - 1))
    hub.close()
    if acks is not None:
        acks.close()


def garbage(results: Any, mode: str) -> None:
    """Write bytes that break the wire format straight to the pipe, then wait to be stopped."""
    import random
    import struct

    from clustersync.relay.link import current_link
    from clustersync.relay.wire import DATA, HEADER

    me = current_worker().index
    sock = current_link()._sock
    if mode == "random":
        sock.sendall(random.Random(1234).randbytes(4096))
    elif mode == "huge":
        sock.sendall(HEADER.pack(0xFFFFFFF0, DATA, 1, me, 0xFFFF, 1) + b"c" + b"\0" * 64)
    elif mode == "origin":
        sock.sendall(HEADER.pack(1, DATA, 1, me + 1, 0xFFFF, 1) + b"c")
    elif mode == "badbody":  # a whole frame, a valid header, a record cut short inside it
        body = b"c" + struct.pack("<IBBHH", 3, 1, 0, 0, 1) + b"ot" + struct.pack("<I", 2)  # sizes cut short
        sock.sendall(HEADER.pack(len(body), DATA, 1, me, 0xFFFF, 1) + body)
    elif mode == "badlength":  # a record whose size runs far past its frame
        body = b"c" + struct.pack("<IBBHH", 1, 1, 0, 0, 1) + b"ot" + struct.pack("<I", 0x7FFFFFF0) + b"data"
        sock.sendall(HEADER.pack(len(body), DATA, 1, me, 0xFFFF, 1) + body)
    elif mode == "truncated":
        sock.sendall(HEADER.pack(100, DATA, 1, me, 0xFFFF, 1) + b"c" + b"\0" * 9)
        results.put(("sent", me))
        os._exit(0)  # the pipe closes mid-frame
    else:
        raise ValueError(mode)
    results.put(("sent", me))
    while True:
        time.sleep(3600)


def pair(results: Any, barrier: Any, count: int) -> None:
    """Two workers exchange ``count`` messages each and report what they got."""
    exchange(results, barrier, "pair", count, [0, 1], "json")


def hang(results: Any, how: str) -> None:
    """Say hello, then hang: in a C loop that holds the GIL, or by SIGSTOP from the test."""
    hub = Hub(sync=cluster(channel="hang"))
    assert hub.wait_ready(10)
    results.put(("hanging", os.getpid()))
    if how == "gil":
        sum(range(10**13))  # one C call: the I/O threads never get the GIL back
    while True:
        time.sleep(3600)


def stream(results: Any, published: Any, ready: Any, go: Any) -> None:
    """Worker 0 publishes numbered messages until stopped; the others record them until stopped."""
    import signal as _signal

    me = current_worker().index
    stop = []
    _signal.signal(_signal.SIGTERM, lambda *a: stop.append(1))
    got: List[int] = []
    hub = Hub(sync=cluster(channel="stream"))
    hub.subscribe("n", lambda m: got.append(m.data))
    assert hub.wait_ready(10)
    ready.put(me)
    if me == 0:
        assert go.wait(20)  # no replay: publish once every receiver is subscribed
        i = 0
        while not stop:
            hub.publish("n", i)
            i += 1
            if i % 500 == 0:
                published.value = i
                time.sleep(0.005)  # paced: the promise is about stopping, not about outrunning receivers
        results.put((me, i))
    else:
        while not stop:
            time.sleep(0.005)
        # A summary, not the list: a large result would fill the queue's pipe before the test reads it.
        snapshot = list(got)  # the reader thread may still be appending
        bad = next((i for i, n in enumerate(snapshot) if n != i), None)
        detail = None if bad is None else snapshot[max(0, bad - 3) : bad + 3]
        results.put((me, (len(snapshot), bad is None, detail)))
    hub.close()


def churn(received: Any, gaps: Any, stop: Any, pace: int) -> None:
    """Publish numbered messages to everyone while checking what arrives, until ``stop`` is set.

    ``received[index]`` counts what this worker got; ``gaps[index]`` counts
    messages that arrived out of sequence from a publisher (a loss or a
    reordering). Shared memory, no locks: workers here die by SIGKILL.
    """
    me = current_worker().index
    last: dict = {}

    def on_message(msg: Message) -> None:
        prev = last.get(msg.origin)
        if prev is not None and msg.data != prev + 1:
            gaps[me] += 1
        last[msg.origin] = msg.data
        received[me] += 1

    hub = Hub(sync=cluster(channel="churn"))
    hub.subscribe("seq", on_message)
    assert hub.wait_ready(10)
    received[me] = 0
    i = 0
    while not stop.is_set():
        for _ in range(pace):
            hub.publish("seq", i)
            i += 1
        time.sleep(0.005)
    hub.close()


def busy(results: Any) -> None:
    """Report the pid, then publish to the other workers without pause until the pipe closes."""
    hub = Hub(sync=cluster(channel="busy"))
    hub.subscribe("t", lambda m: None)  # the relay starts routing once the primary's loop runs
    results.put(os.getpid())
    data = b"x" * 512
    while True:
        hub.publish("t", data)


def addressed(results: Any, barrier: Any) -> None:
    """``to=``: worker 0 learns the others' addresses from their hello (``msg.origin``), then addresses them.

    Worker 1 runs two hubs (A and B), worker 2 one. Worker 0 sends five
    messages to hub B alone, five to worker 2 (every hub there), two to
    destinations that do not exist, then a broadcast "end". Every hub answers
    "end" with an "ack" to ``msg.origin``. Each worker reports what each of
    its hubs received, and worker 0 the errors its hub was told of.
    """
    from clustersync import Address, DestinationUnreachable

    me = current_worker().index
    errors: List[Any] = []
    names = ["A", "B"] if me == 1 else ["A"]
    hubs = {n: Hub(sync=cluster(channel="addr"), on_error=lambda e, s: errors.append((type(e).__name__, s, e))) for n in names}
    got: Dict[str, List[Any]] = {n: [] for n in names}
    hellos: Dict[str, Any] = {}
    for name, hub in hubs.items():
        hub.subscribe("t", lambda m, name=name: got[name].append(m.data))
        hub.subscribe("ack", lambda m, name=name: got[name].append(("ack", m.origin.worker, m.data)))
        hub.subscribe("hello", lambda m: hellos.__setitem__(m.data, m.origin))
        hub.subscribe(
            "t", lambda m, hub=hub: m.data == "end" and hub.publish("ack", m.data, to=m.origin)
        )
        assert hub.wait_ready(10)
    barrier.wait(20)
    for name, hub in hubs.items():
        hub.publish("hello", f"{me}{name}")
    if me == 0:
        hub = hubs["A"]
        assert _wait(lambda: len(hellos) >= 4, 10), hellos
        assert hellos["1B"] == Address(1, hellos["1B"].hub) and hellos["0A"] == hub.address
        for i in range(5):
            hub.publish("t", f"only-B{i}", to=hellos["1B"])
        for i in range(5):
            hub.publish("t", f"only-w2-{i}", to=2)
        hub.publish("t", "nobody", to=7)
        hub.publish("t", "nobody", to=Address(1, "no-such-hub"))
        hub.publish("t", "end")
        _wait(lambda: len([x for x in got["A"] if isinstance(x, tuple)]) >= 4 and len(errors) >= 2, 10)
        results.put((me, got, sorted((n, s, str(e.destination), e.count) for n, s, e in errors if isinstance(e, DestinationUnreachable)), hubs["A"].stats()["unreachable"]))
    else:
        _wait(lambda: all("end" in g for g in got.values()), 10)
        results.put((me, got, [], 0))
    barrier.wait(20)
    for hub in hubs.values():
        hub.close()


def many_hubs(results: Any, count: int) -> None:
    """Make and close ``count`` hubs, each on a channel of its own and each reporting an error once."""
    import resource

    import clustersync.hub as hub_module
    from clustersync.relay.link import current_link

    link = current_link()

    def state() -> Tuple[int, ...]:
        return (len(link._members), len(link._acks), len(hub_module._ratelimited))

    def boom(msg: Message) -> None:
        raise RuntimeError("a subscriber that fails")

    before = state()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(count):
        hub = Hub(sync=cluster(channel=f"c{i}"))
        hub.subscribe("t", boom)
        hub.publish("t", "x")  # the subscriber raises: a rate-limited log line keyed for this error
        hub.close()
    link.flush(10)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results.put((current_worker().index, before, state(), rss_after - rss_before))


def ack_flood(results: Any, go: Any, stop: Any, count: int) -> None:
    """Worker 0's reader is stuck in a callback while it makes and closes ``count`` hubs; worker 1 floods it."""
    import threading

    me = current_worker().index
    hub = Hub(sync=cluster(channel="flood"))
    stuck = threading.Event()
    if me == 0:
        hub.subscribe("t", lambda m: stuck.wait())
    assert hub.wait_ready(10)
    results.put(("ready", me))
    assert go.wait(20)
    if me == 0:
        for _ in range(count):
            Hub(sync=cluster(channel="acks")).close()
        results.put(("done", me))
        while not stop.is_set():
            stop.wait(0.5)
    else:
        data = b"x" * 4096
        while not stop.is_set():
            hub.publish("t", data)
    os._exit(0)  # worker 0's reader thread is stuck on purpose: do not wait for it


def limits(results: Any, barrier: Any, relay_limit: int) -> None:
    """Worker 0 publishes at the limits; worker 1 reports the sizes it received."""
    me = current_worker().index
    got: List[Tuple[str, int]] = []
    small = Hub(sync=cluster(channel="lim"))  # the default max_message (8 MiB)
    big = Hub(sync=cluster(channel="lim"), max_message=64 * 1024 * 1024)
    for hub in (small, big):
        hub.subscribe("t", lambda m: got.append(("t", len(m.data))))
        hub.subscribe("x" * 65_535, lambda m: got.append(("long", len(m.data))))
        assert hub.wait_ready(10)
    barrier.wait(20)
    outcome: List[Any] = [small.max_message, big.max_message]
    if me == 0:
        for hub, size in ((small, relay_limit - 1), (small, relay_limit), (big, 10 * 1024 * 1024)):
            try:
                hub.publish("t", b"\0" * size)  # bytes: one tag byte more on the wire
                outcome.append(("sent", size))
            except ValueError as exc:
                outcome.append(("refused", size, "max_message" in str(exc)))
        # A message at the limit, with the longest topic, right behind a pending one.
        small.publish("t", b"a")
        small.publish("x" * 65_535, b"\1" * (relay_limit - 1))
        small.publish("t", "end")
    else:
        _wait(lambda: got.count(("t", 3)) >= 2, 30)  # "end", at both hubs
    barrier.wait(30)
    results.put((me, outcome, got, small.stats()["errors"] + big.stats()["errors"]))
    small.close()
    big.close()


def spin(results: Any) -> None:
    """Report the pid, then hold the GIL in one long C call (a regular expression that backtracks)."""
    import re

    results.put(os.getpid())
    re.match(r"(a+)+$", "a" * 64 + "b")  # hours of backtracking inside the C engine


def impersonate(results: Any, barrier: Any) -> None:
    """Worker 0 writes records that name worker 1's hub as their origin, straight to its pipe."""
    from clustersync.relay.link import current_link

    me = current_worker().index
    got: List[Any] = []
    ids: Dict[int, str] = {}
    hub = Hub(sync=cluster(channel="imp"))
    hub.subscribe("t", lambda m: got.append((m.origin, m.data)))
    hub.subscribe("id", lambda m: ids.__setitem__(m.origin.worker, m.data))
    assert hub.wait_ready(10)
    barrier.wait(20)
    hub.publish("id", hub.id)
    assert _wait(lambda: len(ids) == 2, 10)
    if me == 0:
        link = current_link()
        assert link is not None
        link.publish(link.route(b"imp", 0xFFFF, b"", ids[1].encode(), b"", b"t"), b"sforged")
        hub.publish("t", "end")
    else:
        _wait(lambda: any(data == "end" for _, data in got), 10)
    results.put((me, hub.address, got))
    barrier.wait(20)
    hub.close()


class TodoStore:
    """A service for the synced-events tests: create, patch, remove, and one custom method."""

    def __init__(self) -> None:
        self.items: Dict[int, Any] = {}

    def create(self, data: Dict[str, Any]) -> Dict[str, Any]:
        item = dict(data, id=len(self.items) + 1)
        self.items[item["id"]] = item
        return item

    def archive(self, item_id: int) -> Dict[str, Any]:
        return {"id": item_id, "archived": True}

    def fail(self) -> None:
        raise RuntimeError("a method that fails emits nothing")


def typed_values() -> Dict[str, Any]:
    """Values plain JSON loses, for the tagged codec."""
    import datetime
    import decimal
    import uuid

    return {
        "naive": datetime.datetime(2026, 12, 1, 3, 48, 53, 123456),
        "aware": datetime.datetime(2026, 12, 1, 3, 48, 53, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
        "date": datetime.date(2024, 2, 29),
        "time": datetime.time(23, 59, 59, 999999),
        "delta": datetime.timedelta(days=-2, seconds=5, microseconds=6),
        "money": decimal.Decimal("19.990"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "blob": b"\x00\xff",
        "pair": (1, (2, "3")),
        "tags": {"a", "b"},
        "nested": [{"when": datetime.date(2000, 1, 1)}],
        7: "an int key",
    }


def events_node(index: int, make_hub: Any, barrier: Any, put: Any) -> None:
    """One of three nodes (a worker, or a thread): the synced-events scenario, node 0 emitting."""
    from clustersync.codec import tagged_dumps, tagged_loads
    from clustersync.events import SYNC, SyncedEmitter

    errors: List[Any] = []
    hub = make_hub(on_error=lambda e, s: errors.append((type(e).__name__, s)))
    events = SyncedEmitter(hub, key="k", serializer=tagged_dumps, deserializer=tagged_loads)
    other_key = SyncedEmitter(hub, key="other")
    todos = events.service("todos", TodoStore(), custom_events={"archive": "archived"})
    got: List[Any] = []
    other_got: List[Any] = []

    def record(data: Any, ctx: Dict[str, Any]) -> None:
        got.append((ctx["event"], data, ctx["synced"], ctx["origin"], ctx.get("method"), ctx.get("tag")))

    for event in ("created", "archived", "local-only", "random", "typed", "after-bad", "end"):
        events.on("todos", event, record)
    other_key.on("todos", "created", lambda data, ctx: other_got.append(data))
    assert events.wait_ready(10) and other_key.wait_ready(10)
    barrier.wait(20)
    if index == 0:
        todos.create({"text": "a"})
        try:
            todos.fail()
        except RuntimeError:
            pass
        events.emit("todos", "local-only", 1, sync=False)
        events.emit("todos", "local-only", 2, {SYNC: False})
        todos.archive(5)
        todos.emit("random", 3)  # not declared by the service: stays local
        other_key.emit("todos", "created", "other key")
        events.emit("todos", "typed", typed_values())
        hub.publish(events.topic, b"not an event")  # a malformed payload on the events topic
        events.emit("todos", "after-bad", "ok")
        events.emit("todos", "end", None, {"tag": "x"})
    _wait(lambda: any(g[0] == "end" for g in got), 20)
    put((index, got, errors, events.stats(), other_got, events.sync_type))
    barrier.wait(20)
    events.close()
    hub.close()


def events_worker(results: Any, barrier: Any) -> None:
    """events_node in a worker, over the relay."""
    events_node(
        current_worker().index,
        lambda **kw: Hub(sync=cluster(channel="events"), **kw),
        barrier,
        results.put,
    )


def node_exchange(node: Any, rounds: int) -> List[Any]:
    """For clustersync.testing: every node publishes ``rounds`` messages; returns what it heard, sorted."""
    hub = node.hub()
    sub = hub.subscribe("t")
    assert hub.wait_ready(10)
    node.barrier()
    for i in range(rounds):
        hub.publish("t", [node.index, i])
    return sorted(tuple(sub.get(timeout=10).data) for _ in range(rounds * node.count))


def node_fails(node: Any) -> None:
    """For clustersync.testing: node 1 raises."""
    if node.index == 1:
        raise LookupError("node 1 fails on purpose")
    node.barrier(5)


def node_hangs(node: Any) -> None:
    """For clustersync.testing: node 0 never returns."""
    if node.index == 0:
        while True:
            time.sleep(3600)


class Unregistered(Exception):
    """Raised remotely, registered with nobody: arrives as RemoteError."""


class Registered(Exception):
    """Raised remotely and registered with Services(errors=...): arrives as itself."""


_REPORT: List[Any] = []  # services tests: [results queue, pings hub] once the node is set up


class ServiceStore:
    """The store the services tests expose: it says which worker served each call."""

    def __init__(self) -> None:
        self.calls = 0

    def get(self, item: Any) -> Dict[str, Any]:
        from clustersync.services import call_context

        self.calls += 1
        ctx = call_context()
        return {"item": item, "worker": current_worker().index, "remote": ctx.from_remote if ctx else None,
                "caller": ctx.caller if ctx else None}

    def find(self) -> int:
        return current_worker().index

    async def aget(self, item: Any) -> List[Any]:
        return [item, current_worker().index]

    def slow(self, seconds: float) -> List[float]:
        """Tell worker 0 it started (so it pings us meanwhile), then take ``seconds``."""
        started = time.monotonic()
        _REPORT[1].publish("slow-started", [current_worker().index, started], to=0)
        time.sleep(seconds)  # the slow method itself, not a synchronisation
        return [started, time.monotonic()]

    def hang(self) -> None:
        _REPORT[0].put(("hanging", current_worker().index))
        while True:
            time.sleep(3600)

    def maybe_hang(self) -> int:
        if current_worker().index == 2:
            self.hang()
        return current_worker().index

    def fail_builtin(self) -> None:
        raise ValueError("a bad value")

    def fail_registered(self) -> None:
        raise Registered("registered")

    def fail_unknown(self) -> None:
        raise Unregistered("not registered")


CUSTOM_METHODS = ["aget", "slow", "hang", "maybe_hang", "fail_builtin", "fail_registered", "fail_unknown"]


def services_node(results: Any, phase: Any, go_late: Any, finished: Any, expose: List[str]) -> None:
    """A worker of the services tests: exposes what ``expose`` names; worker 0 calls them all."""
    import asyncio as aio
    import threading

    from clustersync.services import RemoteError, Services, ServiceUnavailable

    me = current_worker().index
    hub = Hub(sync=cluster(channel="services"))
    pings = Hub(sync=cluster(channel="pings"))
    _REPORT[:] = [results, pings]
    pinged: List[float] = []
    slow_started: List[float] = []
    pings.subscribe("ping", lambda m: pinged.append(time.monotonic()))
    pings.subscribe("slow-started", lambda m: slow_started.append(m.data))
    services = Services(hub, timeout=10.0, methods=CUSTOM_METHODS, errors=[Registered])
    store = ServiceStore()
    for path in expose:
        services.expose(path, store, idempotent=("get", "find", "maybe_hang"))
    assert hub.wait_ready(10) and pings.wait_ready(10)
    phase.wait(20)  # every worker has exposed what it exposes
    if me == 4:  # the late one
        assert go_late.wait(30)
        services.expose("late", store)
    if me == 2:  # killed by the test: it must hold no shared lock, so it waits on nothing shared
        threading.Event().wait()
    if me != 0:
        assert finished.wait(60)
        results.put(("done", me, hub.stats()["received"], pinged))
        services.close()
        hub.close()
        pings.close()
        return
    out: Dict[str, Any] = {}
    todos = services.remote("todos")
    out["forms"] = [
        todos.get(1)["item"],
        services.call("todos", "get", 2)["item"],
        aio.run(services.remote_async("todos").aget(3))[0],
        aio.run(services.call_async("todos", "get", 4))["item"],
    ]
    out["context"] = todos.get(5)
    out["spread"] = sorted(services.call("todos", "get", i)["worker"] for i in range(99))
    out["available"] = services.available()
    out["gather"] = services.gather("todos", "find")
    errors: List[Any] = []
    for method in ("fail_builtin", "fail_registered", "fail_unknown", "missing"):
        try:
            services.call("todos", method)
        except RemoteError as exc:
            errors.append(("RemoteError", exc.type_name, exc.message, "fail_unknown" in exc.remote_traceback))
        except Exception as exc:
            errors.append((type(exc).__name__, str(exc)))
    started = time.monotonic()
    try:
        services.call("nowhere", "get", 1)
    except ServiceUnavailable:
        errors.append(("ServiceUnavailable", time.monotonic() - started < 1.0))
    try:
        services.call("todos", "slow", 3, timeout=0.3)
    except TimeoutError:
        errors.append(("TimeoutError",))
    out["errors"] = errors
    out["health"] = [services.healthcheck()[0], services.healthcheck(key="other")[0]]
    # "solo" lives in worker 1 alone: a slow call there must not hold up its pub/sub delivery.
    slow_result: List[Any] = []
    before = len(slow_started)  # an earlier slow call (the timeout case) may have reported already
    caller = threading.Thread(target=lambda: slow_result.append(services.call("solo", "slow", 1.5)))
    caller.start()
    assert _wait(lambda: any(w == 1 for w, _ in slow_started[before:]), 10)
    pings.publish("ping", "during the slow call", to=1)
    caller.join(10)
    out["solo"] = slow_result[0]
    go_late.set()
    out["late"] = services.call("late", "find", wait=True, timeout=10)  # exposed after the start
    results.put(("report", me, out))
    # Two calls that hang in worker 2 until the test kills it: one fails at once, one is retried.
    outcome: Dict[str, Any] = {}

    def victim() -> None:
        try:
            services.call("victim", "hang", timeout=30)
            outcome["victim"] = "returned"
        except ServiceUnavailable:
            outcome["victim"] = time.monotonic()

    def retried() -> None:
        outcome["retry"] = [services.call("retry", "maybe_hang", timeout=30) for _ in range(2)]

    threads = [threading.Thread(target=victim), threading.Thread(target=retried)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    results.put(("after-kill", me, outcome))
    finished.set()
    services.close()
    hub.close()
    pings.close()


def flood(results: Any, barrier: Any, count: int, size: int) -> None:
    """All-to-all flood at full speed: every worker publishes ``count`` messages of ``size`` bytes."""
    me = current_worker().index
    seen = [0] * current_worker().count
    bad = [0]
    hub = Hub(sync=cluster(channel="flood"))

    def on_message(msg: Message) -> None:
        sender = msg.data[0]
        seq = int.from_bytes(msg.data[1:5], "big")
        if seq != seen[sender]:
            bad[0] += 1
        seen[sender] = seq + 1

    hub.subscribe("t", on_message)
    assert hub.wait_ready(10)
    barrier.wait(20)
    pad = b"x" * (size - 5)
    errors = 0
    for i in range(count):
        hub.publish("t", bytes([me]) + i.to_bytes(4, "big") + pad)
    others = [w for w in range(current_worker().count) if w != me]
    _wait(lambda: all(seen[w] >= count for w in others), 60)
    results.put((me, [seen[w] for w in others], bad[0], hub.stats()["errors"] + errors))
    barrier.wait(60)
    hub.close()


def presence_node(results: Any, step: Any, role: str) -> None:
    """Presence over the relay: "owner" advertises; "watcher" and "late" report what they see."""
    import threading

    me = current_worker().index
    hub = Hub(sync=cluster(channel="presence"))
    assert hub.wait_ready(10)
    if role == "owner":
        extra = Hub(sync=cluster(channel="presence"))
        assert extra.wait_ready(10)
        hub.advertise("kept")
        extra.advertise("closed-with-its-hub")
        assert hub.sync_adverts(10)
        results.put(("advertised", me))
        assert step.wait(20)
        extra.close()  # its entry goes with it
        results.put(("closed", me))
        threading.Event().wait()  # until the test kills this worker: its other entry goes then
    seen: List[Any] = []
    changed = threading.Event()

    def watch(address: Any, entry: str, present: bool) -> None:
        seen.append((address.worker, entry, present))
        changed.set()

    hub.watch_adverts(watch)
    results.put(("table", me, sorted(seen)))  # what the table held when this hub became ready
    _wait(lambda: (0, "kept", False) in seen, 30)
    results.put(("final", me, seen))
    hub.close()


def tiny_mixed(results: Any, barrier: Any, count: int) -> None:
    """Worker 0 publishes ``count`` messages back to back, as small as they come, over three topics, a second
    hub and every 97th one addressed to worker 1: frames packed to the relay's bound. Worker 1 checks each."""
    me = current_worker().index
    hub = Hub(sync=cluster(channel="tiny"))
    other = Hub(sync=cluster(channel="tiny"))
    got: Dict[str, List[Any]] = {"a": [], "b": [], "c": []}
    for topic in got:
        hub.subscribe(topic, lambda msg: got[msg.topic].append(msg.data))
    assert hub.wait_ready(10) and other.wait_ready(10)
    barrier.wait(20)
    sent: Dict[str, List[Any]] = {"a": [], "b": [], "c": []}
    if me == 0:
        for i in range(count):
            if i % 97 == 0:
                value: Any = str(i % 10)
                hub.publish("c", value, to=1)
                sent["c"].append(value)
            elif i % 3:
                hub.publish("a", b"")
                sent["a"].append(b"")
            else:
                value = str(i % 7)
                other.publish("b", value)
                sent["b"].append(value)
        results.put((me, {t: len(v) for t, v in sent.items()}, hub.stats()["errors"] + other.stats()["errors"]))
    else:
        _wait(lambda: sum(map(len, got.values())) >= count, 60)
        expected = {"a": 0, "b": 0, "c": 0}
        ok = True
        for i in range(count):
            topic, value = ("c", str(i % 10)) if i % 97 == 0 else ("a", b"") if i % 3 else ("b", str(i % 7))
            ok = ok and got[topic][expected[topic]] == value
            expected[topic] += 1
        results.put((me, {t: len(v) for t, v in got.items()}, hub.stats()["errors"], ok))
    barrier.wait(60)
    other.close()
    hub.close()


#: What ``mixed_payloads`` writes (encoded, back to back, a run per topic), and what worker 1 must see of it.
MIXED_WIRE = (
    [("b", w) for w in [b"b1", b"b2", b"b3"] * 50]  # a run of bytes alone
    + [("s", w) for w in [b"sa", b"sb"] * 50]  # of str alone
    + [("s", w) for w in [b"sc", b"s\xff", b"sd"]]  # of str, one of them not UTF-8
    + [("m", w) for w in [b"b4", b"s5", b"v[6]", b"s\xff", b"", b"?7", b"s8"] * 20]  # mixed, some broken
)
MIXED_SEEN = (
    [("b", v) for v in [b"1", b"2", b"3"] * 50]
    + [("s", v) for v in ["a", "b"] * 50]
    + [("s", "c"), ("s", "d")]
    + [("m", v) for v in [b"4", "5", [6], "8"] * 20]
)
#: The str that is not UTF-8, the empty payload, the unknown tag: each reported, none delivered.
MIXED_ERRORS = 1 + 3 * 20


def mixed_payloads(results: Any, barrier: Any) -> None:
    """Worker 0 writes runs of encoded payloads (bytes, str, JSON and broken ones) straight to its link;
    worker 1's hub decodes them: every good one arrives, in order, and every broken one is a delivery error."""
    from clustersync.relay.link import current_link

    me = current_worker().index
    errors: List[str] = []
    hub = Hub(sync=cluster(channel="mixed"), on_error=lambda exc, stage: errors.append(stage))
    got: List[Any] = []
    for topic in ("b", "s", "m"):
        hub.subscribe(topic, lambda msg: got.append((msg.topic, msg.data)))
    assert hub.wait_ready(10)
    barrier.wait(20)
    if me == 0:
        link = current_link()
        assert link is not None
        routes = {t: link.route(b"mixed", 0xFFFF, b"", hub.id.encode(), b"", t.encode()) for t in ("b", "s", "m")}
        for topic, data in MIXED_WIRE:
            link.publish(routes[topic], data)
        hub.publish("m", "end")
    else:
        _wait(lambda: ("m", "end") in got, 20)
    results.put((me, got, errors))
    barrier.wait(20)
    hub.close()


def kept_senders(results: Any, barrier: Any) -> None:
    """Worker 0 publishes to topics before and after its own hub subscribes to them (and to a pattern), and after
    it unsubscribes: its local subscribers see exactly what was published while they were there; worker 1 all."""
    me = current_worker().index
    hub = Hub(sync=cluster(channel="kept"))
    got: List[Any] = []
    if me == 1:
        hub.subscribe("t", lambda msg: got.append(msg.data))
        hub.subscribe("t.x", lambda msg: got.append(msg.data))
    assert hub.wait_ready(10)
    barrier.wait(20)
    if me == 0:
        hub.publish("t", b"1")  # the topic's sender is kept from here on
        hub.publish("t.x", "2")
        sub = hub.subscribe("t", lambda msg: got.append(("t", msg.data)))
        hub.publish("t", b"3")
        pattern = hub.subscribe("t.*", lambda msg: got.append(("t.*", msg.data)))
        hub.publish("t.x", "4")
        hub.publish("t", {"five": 5})
        sub.unsubscribe()
        hub.publish("t", "6")
        pattern.unsubscribe()
        hub.publish("t.x", b"7")
        hub.publish("t", "end")
    else:
        _wait(lambda: "end" in got, 20)
    results.put((me, got, hub.stats()["errors"]))
    barrier.wait(20)
    hub.close()


def kept_sender_values(results: Any, barrier: Any) -> None:
    """Worker 0 publishes every kind of value twice to one topic (the second time through the kept sender):
    its own subscriber and worker 1 see the same values both times; bad values raise the same errors."""
    me = current_worker().index
    hub = Hub(sync=cluster(channel="values"))
    got: List[Any] = []
    hub.subscribe("t", lambda msg: got.append(msg.data))
    assert hub.wait_ready(10)
    barrier.wait(20)
    errors: List[str] = []
    if me == 0:
        values: List[Any] = [b"raw", "text", {"a": [1, 2.5, None]}, 7, bytearray(b"ba"), memoryview(b"mv")]
        for value in values + values:
            hub.publish("t", value)
        for bad in [(1, 2), {1: "x"}, "\ud800", object()]:
            for _ in range(2):
                try:
                    hub.publish("t", bad)
                except (TypeError, ValueError) as exc:
                    errors.append(type(exc).__name__)
        hub.publish("t", "end")
    else:
        _wait(lambda: "end" in got, 20)
    results.put((me, got, errors, hub.stats()["published"]))
    barrier.wait(20)
    hub.close()


def getter(results: Any) -> None:
    """Report the pid, then wait in ``get()`` forever: this thread reads the pipe, and sees it close."""
    hub = Hub(sync=cluster(channel="getter"))
    sub = hub.subscribe("never")
    hub.wait_ready(10)
    results.put(os.getpid())
    while True:
        sub.get()


def looper(results: Any) -> None:
    """Report the pid, then wait in ``async for`` forever on a loop that reads the pipe."""
    hub = Hub(sync=cluster(channel="looper"))
    sub = hub.subscribe("never")
    hub.wait_ready(10)

    async def main() -> None:
        assert hub.read_on_loop()
        results.put(os.getpid())
        async for _msg in sub:
            pass

    asyncio.run(main())


def _fg_readers(count: int) -> Any:
    """A predicate: ``count`` threads are reading this worker's pipe in get()."""
    from clustersync.relay.link import current_link

    link = current_link()
    assert link is not None
    return lambda: len(link._fg_conds) == count


def get_readers(results: Any, barrier: Any) -> None:
    """Worker 1 waits in get() on two threads, A (topic a) and B (topic b, twice); worker 0 publishes
    b1, then a1, then b2, each once worker 1 is in the state that step needs. A callback on each topic
    says which thread delivered."""
    import threading

    from clustersync.relay.link import current_link

    me = current_worker().index
    hub = Hub(sync=cluster(channel="readers"))
    if me == 0:
        assert hub.wait_ready(10)
        for topic, data in (("b", "b1"), ("a", "a1"), ("b", "b2"), ("c", "c1")):
            barrier.wait(20)
            hub.publish(topic, data)
        barrier.wait(20)
        results.put((me, None))
        hub.close()
        return
    from clustersync.services import Services

    services = Services(hub)
    delivered: Dict[str, int] = {}
    refused: List[str] = []

    def record(msg: Message) -> None:
        delivered[msg.data] = threading.get_ident()
        if msg.data == "b1":  # on thread A: a blocking call here would wait for itself
            try:
                services.call("nowhere", "get", timeout=5)
            except RuntimeError as exc:
                refused.append(str(exc))

    for topic in ("a", "b", "c"):
        hub.subscribe(topic, record)
    sub_a, sub_b = hub.subscribe("a"), hub.subscribe("b")
    assert hub.wait_ready(10)
    got: Dict[str, Any] = {}
    threads: Dict[str, int] = {}

    def take(name: str, sub: Any, count: int) -> None:
        threads[name] = threading.get_ident()
        for i in range(count):
            try:
                got[f"{name}{i}"] = sub.get(15).data
            except Exception as exc:  # a TimeoutError here is the failure the test looks for
                got[f"{name}{i}"] = repr(exc)

    a = threading.Thread(target=take, args=("A", sub_a, 1))
    a.start()
    link = current_link()
    assert link is not None
    assert _wait(lambda: link._fg_polling, 10)  # A, alone in get(), holds the reading role and polls
    b = threading.Thread(target=take, args=("B", sub_b, 2))
    b.start()
    assert _wait(_fg_readers(2), 10)
    barrier.wait(20)  # -> b1: A reads it, B gets it
    assert _wait(lambda: "B0" in got, 20)
    assert _wait(_fg_readers(2), 10)  # B waits again, A still
    a_waiting_when_b_got = a.is_alive()
    barrier.wait(20)  # -> a1: A gets it and leaves; B takes the role
    a.join(20)
    assert _wait(lambda: _fg_readers(1)() and link._fg_polling, 10)  # B alone, holding the role
    barrier.wait(20)  # -> b2: B reads it itself
    b.join(20)
    barrier.wait(20)  # -> c1, with nobody in get(): the reader thread delivers it
    assert _wait(lambda: "c1" in delivered, 10)
    barrier.wait(20)
    results.put((me, {
        "got": got,
        "a_waiting_when_b_got": a_waiting_when_b_got,
        "b1_on": "A" if delivered.get("b1") == threads["A"] else delivered.get("b1"),
        "a1_on": "A" if delivered.get("a1") == threads["A"] else delivered.get("a1"),
        "b2_on": "B" if delivered.get("b2") == threads["B"] else delivered.get("b2"),
        "c1_on_a_getter": delivered.get("c1") in (threads["A"], threads["B"]),
        "refused": refused,
    }))
    services.close()
    hub.close()


def loop_reader(results: Any, barrier: Any) -> None:
    """Worker 1 reads its pipe on an asyncio loop; worker 0 publishes at each step.

    Steps: m1 arrives on the loop; m2 arrives while the loop is blocked in a plain wait (the reader
    thread's watchdog reads it); wait_ready() called on the loop returns; after the loop closes, m3
    still arrives (the reader thread reads again).
    """
    import threading

    me = current_worker().index
    hub = Hub(sync=cluster(channel="loop"))
    if me == 0:
        assert hub.wait_ready(10)
        for data in ("m1", "m2", "m3"):
            barrier.wait(20)
            hub.publish("t", data)
        barrier.wait(20)
        results.put((me, None))
        hub.close()
        return
    on: Dict[str, int] = {}
    arrived = {name: threading.Event() for name in ("m1", "m2", "m3")}

    def record(msg: Message) -> None:
        on[msg.data] = threading.get_ident()
        arrived[msg.data].set()

    hub.subscribe("t", record)
    sub = hub.subscribe("t")
    assert hub.wait_ready(10)
    out: Dict[str, Any] = {}

    async def main() -> None:
        loop_thread = threading.get_ident()
        out["attached"] = hub.read_on_loop()
        from clustersync.relay.link import current_link

        link = current_link()
        assert link is not None
        loop = asyncio.get_running_loop()
        out["handed_over"] = not link._role.locked()  # read_on_loop() returned once the reader let go
        await loop.run_in_executor(None, barrier.wait, 20)  # -> m1, the loop idle
        out["m1_async"] = (await asyncio.wait_for(sub.__anext__(), 15)).data
        out["m1_on_loop"] = on.get("m1") == loop_thread
        barrier.wait(20)  # -> m2, while this loop is blocked below
        out["m2_arrived"] = arrived["m2"].wait(15)
        out["m2_on_loop"] = on.get("m2") == loop_thread
        hub.subscribe("later")
        out["ready_on_loop"] = hub.wait_ready(15)
        out["m2_async"] = (await asyncio.wait_for(sub.__anext__(), 15)).data
        second: Dict[str, Any] = {}

        def other_loop() -> None:  # a second loop, on a thread of its own, while this one reads
            try:
                second["outcome"] = asyncio.run(_attach(hub))
            except RuntimeError as exc:
                second["outcome"] = str(exc)

        t = threading.Thread(target=other_loop)
        t.start()
        t.join(15)
        out["second_loop"] = second.get("outcome")

    asyncio.run(main())
    barrier.wait(20)  # -> m3, with the loop closed
    out["m3_arrived"] = arrived["m3"].wait(15)
    from clustersync.relay.link import current_link

    link = current_link()
    out["loop_let_go"] = _wait(lambda: link is not None and link._loop is None, 10)  # its reader went with it
    barrier.wait(20)
    results.put((me, out))
    hub.close()


async def _attach(hub: Hub) -> bool:
    return hub.read_on_loop()


def get_interrupted(results: Any, barrier: Any) -> None:
    """A thread polling the pipe in get() also wakes for what comes another way: a message published by
    this process (delivered locally, never through the pipe), and the hub's close."""
    import threading

    from clustersync import SubscriptionClosed
    from clustersync.relay.link import current_link

    link = current_link()
    assert link is not None
    hub = Hub(sync=cluster(channel="interrupt"))
    sub = hub.subscribe("x")
    assert hub.wait_ready(10)
    out: Dict[str, Any] = {}

    def take(name: str, timeout: Any) -> None:
        try:
            out[name] = sub.get(timeout).data
        except SubscriptionClosed:
            out[name] = "closed"
        except Exception as exc:
            out[name] = repr(exc)

    try:  # read_until spends the time: the error still names the caller's timeout
        sub.get(0.05)
        out["timeout_error"] = "none"
    except TimeoutError as exc:
        out["timeout_error"] = str(exc)
    a = threading.Thread(target=take, args=("local", None), daemon=True)
    a.start()
    assert _wait(lambda: link._fg_polling, 10)  # in its poll, holding the pipe
    hub.publish("x", "published here")
    a.join(20)
    out["a_ended"] = not a.is_alive()
    b = threading.Thread(target=take, args=("close", None), daemon=True)
    b.start()
    assert _wait(lambda: link._fg_polling, 10)
    hub.close()
    b.join(20)
    out["b_ended"] = not b.is_alive()
    barrier.wait(20)
    results.put((current_worker().index, out))


def get_stress(results: Any, barrier: Any, threads: int, count: int) -> None:
    """Worker 0 publishes ``count`` numbered messages on each of ``threads`` topics, interleaved; worker 1
    takes each topic on a thread of its own with get() and short, varied timeouts (so the reading role
    passes between them all the time), and counts a callback subscription on every topic too."""
    import threading

    me = current_worker().index
    topics = [f"s{i}" for i in range(threads)]
    hub = Hub(sync=cluster(channel="stress"))
    if me == 0:
        assert hub.wait_ready(10)
        barrier.wait(20)
        for k in range(count):
            for topic in topics:
                hub.publish(topic, k)
        barrier.wait(60)
        results.put((me, None))
        hub.close()
        return
    seen: Dict[str, List[int]] = {t: [] for t in topics}
    called: Dict[str, int] = {t: 0 for t in topics}

    def count_call(msg: Message) -> None:
        called[msg.topic] += 1

    subs = {t: hub.subscribe(t) for t in topics}
    for t in topics:
        hub.subscribe(t, count_call)
    assert hub.wait_ready(10)
    errors: List[str] = []

    def take(topic: str, index: int) -> None:
        sub = subs[topic]
        timeouts = (0.0005, 0.003, 0.02, None)
        deadline = time.monotonic() + 60
        got = seen[topic]
        i = index
        while len(got) < count and time.monotonic() < deadline:
            try:
                got.append(sub.get(timeouts[i % len(timeouts)] if time.monotonic() + 1 < deadline else 1).data)
            except TimeoutError:
                pass
            except Exception as exc:
                errors.append(repr(exc))
                return
            i += 1

    workers_ = [threading.Thread(target=take, args=(t, i)) for i, t in enumerate(topics)]
    for w in workers_:
        w.start()
    barrier.wait(20)
    for w in workers_:
        w.join(70)
    barrier.wait(60)
    results.put((me, {
        "in_order": all(seen[t] == list(range(count)) for t in topics),
        "lengths": sorted({len(v) for v in seen.values()}),
        "called": sorted(set(called.values())),
        "errors": errors,
        "dropped": hub.stats()["dropped"],
    }))
    hub.close()
