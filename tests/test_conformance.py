"""One conformance suite: the delivery promises (docs/delivery.md), checked the same way on every driver.

Each test runs against ``cluster`` (worker processes of a primary, through the
relay), ``broadcast_channel`` (threads of this process) and the network
drivers ``redis``, ``postgres`` and ``nats`` (worker processes, each hub with
its own connections to a real server of tests/servers.py). Nothing is mocked
and nothing is skipped: a driver that breaks a promise fails here.

The hubs of a test live in the nodes of :func:`clustersync.testing.run_nodes`
(real forked processes, or threads for ``broadcast_channel``); a node gets a
:class:`Peer`, which makes hubs on the driver under test and closes them when
the node's function returns. Nodes wait on conditions with deadlines, never
on sleeps.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from clustersync import Address, Hub
from clustersync.sync import broadcast_channel, cluster, from_url, nats, postgres, redis
from clustersync.testing import Node, run_nodes

from .conftest import wait_for
from .servers import Server, free_port

DRIVERS = ["cluster", "broadcast_channel", "redis", "postgres", "nats"]
NETWORK = ["redis", "postgres", "nats"]
NODE_TIMEOUT = 25.0  # seconds for all the nodes of one test to finish
WAIT = 10.0  # seconds a node waits for a condition that should hold within milliseconds

pytestmark = pytest.mark.timeout(45)


# --------------------------------------------------------------- the drivers under test


class Backplane:
    """One driver under test: how to make its factories, and where its hubs live."""

    def __init__(self, name: str, mode: str, factory: Callable[..., Any], server: Optional[Server] = None) -> None:
        self.name = name
        self.mode = mode  # run_nodes mode: "processes" or "threads"
        self.factory = factory  # factory(channel=..., **options) -> DriverFactory
        self.server = server

    def make(self, channel: str, **options: Any) -> Any:
        """A driver factory on ``channel`` (for ``cluster``, usable in a worker only)."""
        return self.factory(channel=channel, **options)

    def unreachable(self, channel: str) -> Any:
        """A factory whose backplane is not up in this (test) process, or None if the driver is never down."""
        if self.name == "cluster":
            return cluster(channel=channel)  # outside a worker: subscribing fails
        if self.name == "broadcast_channel":
            return None
        dead = free_port()  # nothing listens there
        urls = {
            "redis": f"redis://127.0.0.1:{dead}/0",
            "postgres": f"postgresql://postgres@127.0.0.1:{dead}/postgres",
            "nats": f"nats://127.0.0.1:{dead}",
        }
        return from_url(urls[self.name], channel=channel)

    def run(self, fn: Callable[..., Any], count: int = 2, *args: Any, timeout: float = NODE_TIMEOUT) -> List[Any]:
        """``fn(peer, *args)`` in ``count`` nodes at once (processes, or threads); their results by index."""
        return run_nodes(_node_main, count, args=(self, fn, args), mode=self.mode, timeout=timeout)

    def __repr__(self) -> str:
        return f"<Backplane {self.name}>"


def _factory(name: str, server: Optional[Server]) -> Callable[..., Any]:
    if name == "cluster":
        return cluster
    if name == "broadcast_channel":
        return broadcast_channel
    assert server is not None
    url = server.url
    if name == "redis":
        return lambda channel, **options: redis(url=url, channel=channel, **options)
    if name == "postgres":
        return lambda channel, **options: postgres(conninfo=url, channel=channel, **options)
    return lambda channel, **options: nats(servers=url, channel=channel, **options)


@pytest.fixture(params=DRIVERS)
def backplane(request: pytest.FixtureRequest) -> Backplane:
    name = request.param
    server = request.getfixturevalue(f"{name}_server") if name in NETWORK else None
    mode = "threads" if name == "broadcast_channel" else "processes"
    return Backplane(name, mode, _factory(name, server), server)


@pytest.fixture(params=NETWORK)
def network(request: pytest.FixtureRequest) -> Backplane:
    name = request.param
    server = request.getfixturevalue(f"{name}_server")
    return Backplane(name, "processes", _factory(name, server), server)


# --------------------------------------------------------------- what a node gets


class Peer:
    """A node of a test: makes hubs on the backplane under test, closes them when the node returns."""

    def __init__(self, node: Node, backplane: Backplane) -> None:
        self.node = node
        self.index = node.index
        self.count = node.count
        self.channel = node.channel
        self.backplane = backplane
        self.hubs: List[Hub] = []

    def hub(self, channel: Optional[str] = None, **options: Any) -> Hub:
        hub = Hub(sync=self.backplane.make(channel or self.channel), **options)
        self.hubs.append(hub)
        return hub

    def ready(self, *hubs: Hub) -> None:
        """Every hub subscribed, in every node: what is published next reaches them all."""
        for hub in hubs:
            assert hub.wait_ready(WAIT), f"{self.backplane.name}: hub {hub.address} not ready within {WAIT} s"
        self.node.barrier()

    def barrier(self) -> None:
        self.node.barrier()

    def close(self) -> None:
        for hub in self.hubs:
            hub.close()


def _node_main(node: Node, backplane: Backplane, fn: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
    peer = Peer(node, backplane)
    try:
        return fn(peer, *args)
    finally:
        peer.close()


def until(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Wait for ``predicate`` with a deadline (in a node: an AssertionError there fails the test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.002)


class Inbox:
    """A thread-safe record of (origin, data) per topic, filled by subscriber callbacks."""

    def __init__(self, hub: Hub, *topics: str) -> None:
        self.got: Dict[str, List[Tuple[Address, Any]]] = {t: [] for t in topics}
        self.threads: Dict[str, List[int]] = {t: [] for t in topics}
        for topic in topics:
            hub.subscribe(topic, self._make(topic))

    def _make(self, topic: str) -> Callable[[Any], None]:
        got, threads = self.got[topic], self.threads[topic]

        def callback(msg: Any) -> None:
            threads.append(threading.get_ident())
            got.append((msg.origin, msg.data))

        return callback

    def data(self, topic: str, origin: Optional[Address] = None) -> List[Any]:
        return [d for o, d in list(self.got[topic]) if origin is None or o == origin]

    def origins(self, topic: str) -> List[Address]:
        return [o for o, _ in list(self.got[topic])]


# --------------------------------------------------------------- 1. local first


def _local_first(peer: Peer) -> List[Any]:
    hub = peer.hub()
    seen: List[Tuple[Any, int]] = []
    hub.subscribe("t", lambda msg: seen.append((msg.data, threading.get_ident())))
    peer.ready(hub)
    for i in range(20):
        hub.publish("t", {"n": peer.index, "i": i})
        # Before publish returned, on the publishing thread (remote messages may come in between).
        assert ({"n": peer.index, "i": i}, threading.get_ident()) in seen, seen[-3:]
    until(lambda: len(seen) == 20 * peer.count, "every node's messages")
    return [d for d, _ in seen]


def test_local_first(backplane: Backplane) -> None:
    """A hub's own subscribers have the message before publish returns: backplane up, or not up."""
    out = backplane.run(_local_first, 2)
    for index, got in enumerate(out):
        assert [d for d in got if d["n"] == index] == [{"n": index, "i": i} for i in range(20)]

    down = backplane.unreachable(f"local-first-{backplane.name}")
    if down is None:  # broadcast_channel: an in-process channel is never down
        return
    errors: List[Tuple[str, str]] = []
    states: List[bool] = []
    hub = Hub(sync=down, on_error=lambda e, s: errors.append((type(e).__name__, s)), on_backplane=states.append)
    try:
        seen: List[Any] = []
        hub.subscribe("t", lambda msg: seen.append(msg.data))
        assert hub.wait_ready(0.2) is False
        for i in range(5):
            start = time.monotonic()
            hub.publish("t", i)  # never raises because of the backplane
            assert time.monotonic() - start < 1.0
            assert seen == list(range(i + 1))
        wait_for(lambda: ("subscribe" in [s for _, s in errors]), timeout=WAIT)
        assert [s for _, s in errors] == ["subscribe"], errors  # once, not once per message
        if backplane.name in NETWORK:
            assert states == [False]
            assert hub.stats()["driver"]["lost"] == 5  # published while down: counted
            assert hub.stats()["driver"]["up"] is False
    finally:
        hub.close()


# --------------------------------------------------------------- 2. no echo


N_ECHO = 50


def _no_echo(peer: Peer) -> Dict[str, Any]:
    hub = peer.hub()
    inbox = Inbox(hub, "t", "ack")
    peer.ready(hub)
    for i in range(N_ECHO):
        hub.publish("t", i)
    hub.publish("t", "end")
    until(lambda: sum(d == "end" for d in inbox.data("t")) == peer.count, "every node's end")
    # Everyone has every node's messages: the acks come after any echo of ours the server had sent.
    hub.publish("ack", peer.index)
    until(lambda: len(inbox.data("ack")) == peer.count, "every node's ack")
    own = inbox.data("t", hub.address)
    return {"own": own, "own_acks": inbox.data("ack", hub.address), "received": hub.stats()["received"]}


def test_no_echo(backplane: Backplane) -> None:
    """A hub never gets its own message back from the backplane: its subscribers see it once, locally."""
    out = backplane.run(_no_echo, 2)
    for index, result in enumerate(out):
        assert result["own"] == list(range(N_ECHO)) + ["end"]
        assert result["own_acks"] == [index]
        assert result["received"] == N_ECHO + 2  # the other node's messages and ack, nothing of its own


# --------------------------------------------------------------- 3. exactly once, per-publisher FIFO

N_FIFO = 300
HUBS_PER_NODE = 2


def _exactly_once(peer: Peer) -> List[Dict[str, Any]]:
    hubs = [peer.hub() for _ in range(HUBS_PER_NODE)]
    inboxes = [Inbox(hub, "t") for hub in hubs]
    publishers = peer.count * HUBS_PER_NODE
    peer.ready(*hubs)
    for i in range(N_FIFO):  # interleaved: the hubs of a node publish turn by turn
        for hub in hubs:
            hub.publish("t", {"i": i, "by": peer.index})
    for hub in hubs:
        hub.publish("t", "end")
    for inbox in inboxes:
        until(lambda: inbox.data("t").count("end") == publishers, "every publisher's end")
    out = []
    for hub, inbox in zip(hubs, inboxes):
        per_origin: Dict[str, List[Any]] = {}
        for origin, data in inbox.got["t"]:
            per_origin.setdefault(str(origin), []).append(data if data == "end" else data["i"])
        out.append({"address": str(hub.address), "per_origin": per_origin, "received": hub.stats()["received"]})
    return out


def test_exactly_once_and_per_publisher_fifo(backplane: Backplane) -> None:
    """Every hub gets every other hub's messages once and in their order, its own once (locally)."""
    out = [hub for node in backplane.run(_exactly_once, 2) for hub in node]
    addresses = [hub["address"] for hub in out]
    assert len(set(addresses)) == len(addresses) == 2 * HUBS_PER_NODE
    for hub in out:
        assert sorted(hub["per_origin"]) == sorted(addresses), f"{hub['address']} heard from {sorted(hub['per_origin'])}"
        for origin, seq in hub["per_origin"].items():
            assert seq == list(range(N_FIFO)) + ["end"], f"{hub['address']} from {origin}: {_gaps(seq)}"
        assert hub["received"] == (len(addresses) - 1) * (N_FIFO + 1)  # nothing twice, nothing of its own


def _gaps(seq: List[Any]) -> str:
    nums = [x for x in seq if x != "end"]
    dup = len(nums) - len(set(nums))
    order = sum(1 for a, b in zip(nums, nums[1:]) if b <= a)
    return f"{len(nums)} messages, {dup} duplicates, {order} out of order, missing {sorted(set(range(N_FIFO)) - set(nums))[:10]}"


# --------------------------------------------------------------- 4. channels never bridge


def _no_bridge(peer: Peer) -> Dict[str, List[Any]]:
    # Names sharing a prefix, and one a NATS subject prefix of the other: neither may reach the other.
    a = peer.hub(peer.channel)
    b = peer.hub(peer.channel + ".b")
    in_a, in_b = Inbox(a, "t"), Inbox(b, "t")
    peer.ready(a, b)
    for i in range(20):
        a.publish("t", f"A{peer.index}-{i}")
        b.publish("t", f"B{peer.index}-{i}")
    a.publish("t", "endA")
    b.publish("t", "endB")
    until(lambda: in_a.data("t").count("endA") == peer.count, "every node's A end")
    until(lambda: in_b.data("t").count("endB") == peer.count, "every node's B end")
    peer.barrier()  # every node has every end: what crossed, if anything, had the time to
    a.publish("t", "finA")
    b.publish("t", "finB")
    until(lambda: in_a.data("t").count("finA") == peer.count, "every node's A fin")
    until(lambda: in_b.data("t").count("finB") == peer.count, "every node's B fin")
    return {"A": in_a.data("t"), "B": in_b.data("t")}


def test_channels_never_bridge(backplane: Backplane) -> None:
    out = backplane.run(_no_bridge, 2)
    for node in out:
        for name, other in (("A", "B"), ("B", "A")):
            got = node[name]
            assert not [d for d in got if d.startswith(other)], f"channel {name} got {other}'s messages"
            for index in range(2):
                assert [d for d in got if d.startswith(f"{name}{index}-")] == [f"{name}{index}-{i}" for i in range(20)]
            assert len(got) == 2 * 22


# --------------------------------------------------------------- 4b. pattern subscriptions


def _patterns(peer: Peer) -> Dict[str, List[Tuple[str, Any]]]:
    hub = peer.hub()
    got: Dict[str, List[Tuple[str, Any]]] = {"one": [], "many": [], "exact": []}
    hub.subscribe("orders.*", lambda m: got["one"].append((m.topic, m.data)))
    hub.subscribe("orders.>", lambda m: got["many"].append((m.topic, m.data)))
    hub.subscribe("orders.new", lambda m: got["exact"].append((m.topic, m.data)))
    peer.ready(hub)
    if peer.index == 0:
        for topic in ("orders.new", "orders.new.eu", "orders", "invoices.new", "orders.paid"):
            hub.publish(topic, topic)
        hub.publish("orders.end", "end")
    until(lambda: ("orders.end", "end") in got["one"], "the end")
    return got


def test_pattern_subscriptions_get_the_concrete_topics_they_match(backplane: Backplane) -> None:
    """``*`` is one token, a final ``>`` one or more; each subscription gets each message once, with its topic."""
    for got in backplane.run(_patterns, 2):  # the publisher (local delivery) and the other node alike
        assert got["one"] == [("orders.new", "orders.new"), ("orders.paid", "orders.paid"), ("orders.end", "end")]
        assert got["many"] == [("orders.new", "orders.new"), ("orders.new.eu", "orders.new.eu"),
                               ("orders.paid", "orders.paid"), ("orders.end", "end")]
        assert got["exact"] == [("orders.new", "orders.new")]


# --------------------------------------------------------------- 5. types round-trip

VALUES: List[Any] = [
    "text",
    "",
    "ünïcødé € 𝄞 \u2028",
    '{"looks": "like json"}',
    "null",
    b"",
    b"\x00\x01\xfe\xff" * 16,
    b'{"a": 1}',
    bytearray(b"arrives as bytes"),
    0,
    -7,
    2**60,
    1.5,
    -2.25e-300,
    1.0,
    None,
    True,
    False,
    {},
    [],
    {"a": 1, "b": [1, 2.5, None, True, False, "x"], "nested": {"deeper": {"deepest": [[], {}]}}},
    [1, "two", 3.0, None, {"k": False}, [[]]],
    {"ü": "🙂", "": 0},
]


def _expected(value: Any) -> Any:
    return bytes(value) if isinstance(value, bytearray) else value


def _same(expected: Any, got: Any) -> bool:
    """Equal, with the same type all the way down (1 is not 1.0 is not True)."""
    expected = _expected(expected)
    if type(expected) is not type(got):
        return False
    if isinstance(expected, dict):
        return expected.keys() == got.keys() and all(_same(expected[k], got[k]) for k in expected)
    if isinstance(expected, list):
        return len(expected) == len(got) and all(_same(e, g) for e, g in zip(expected, got))
    return bool(expected == got)


def _round_trip(peer: Peer) -> Dict[str, List[Any]]:
    hub = peer.hub()
    inbox = Inbox(hub, "t")
    peer.ready(hub)
    if peer.index == 0:
        for value in VALUES:
            hub.publish("t", value)
        hub.publish("t", "end")
        return {"local": inbox.data("t")}
    until(lambda: inbox.data("t")[-1:] == ["end"], "the end")
    return {"remote": inbox.data("t")}


def test_types_round_trip(backplane: Backplane) -> None:
    """str stays str, bytes stay bytes, JSON values stay JSON values: locally and remotely alike."""
    local, remote = backplane.run(_round_trip, 2)
    for side, got in (("local", local["local"]), ("remote", remote["remote"])):
        assert len(got) == len(VALUES) + 1, side
        for value, arrived in zip(VALUES, got):
            assert _same(value, arrived), f"{side}: sent {value!r} ({type(value).__name__}), got {arrived!r} ({type(arrived).__name__})"


N_BIG = 24
BIG = 512 * 1024  # under every backplane's limit (NATS: 1 MiB with the envelope)


def _big_messages(peer: Peer) -> Dict[str, Any]:
    import hashlib

    errors: List[Tuple[str, str, str]] = []
    hub = peer.hub(on_error=lambda exc, stage: errors.append((type(exc).__name__, stage, str(exc))))
    inbox = Inbox(hub, "t")
    peer.ready(hub)
    if peer.index == 0:
        sent = [os.urandom(BIG) for _ in range(N_BIG)]
        for payload in sent:
            hub.publish("t", payload)
        hub.publish("t", "end")
        digests = [hashlib.sha256(p).hexdigest() for p in sent]
        peer.barrier()  # the receiver has everything: close only then
        return {"digests": digests, "errors": errors}
    try:
        until(lambda: inbox.data("t")[-1:] == ["end"], "the end, after the big messages")
    finally:
        peer.barrier()
    got = inbox.data("t")[:-1]
    return {
        "digests": [hashlib.sha256(d).hexdigest() if type(d) is bytes else repr(d)[:40] for d in got],
        "errors": errors,
    }


def test_big_messages_arrive_whole_in_a_row(backplane: Backplane) -> None:
    """Messages that take many reads to arrive come whole, in order, without the backplane faltering."""
    sender, receiver = backplane.run(_big_messages, 2)
    assert receiver["errors"] == [] and sender["errors"] == [], receiver["errors"][:3] + sender["errors"][:3]
    assert receiver["digests"] == sender["digests"]


# --------------------------------------------------------------- 6. to= addressing

NO_SUCH_WORKER = 97


def _addressed(peer: Peer) -> Dict[str, Any]:
    hubs = [peer.hub() for _ in range(2)]
    inboxes = [Inbox(hub, "t", "hello") for hub in hubs]
    everyone = peer.count * len(hubs)
    sender = hubs[0] if peer.index == 0 else None
    for hub, inbox in zip(hubs, inboxes):
        if hub is not sender:  # answer the sender's "end": to its origin alone
            def reply(msg: Any, hub: Hub = hub) -> None:
                if msg.data == "end":
                    hub.publish("t", f"reply:{hub.address}", to=msg.origin)

            hub.subscribe("t", reply)
    peer.ready(*hubs)
    for hub in hubs:
        hub.publish("hello", str(hub.address))
    for inbox in inboxes:
        until(lambda: len(inbox.data("hello")) == everyone, "every hub's hello")
    if sender is not None:
        others = sorted({o for o in inboxes[0].origins("hello") if o != sender.address})
        for address in others:
            sender.publish("t", f"to:{address}", to=address)
        sender.publish("t", "self", to=sender.address)
        for worker in sorted({o.worker for o in inboxes[0].origins("hello")} | {NO_SUCH_WORKER}):
            sender.publish("t", f"w:{worker}", to=worker)
        sender.publish("t", "end")
        until(lambda: len([d for d in inboxes[0].data("t") if d.startswith("reply:")]) == everyone - 1, "every reply")
        sender.publish("t", "fin")
    for inbox in inboxes:
        until(lambda: "fin" in inbox.data("t"), "the fin")
    return {
        "hubs": [(str(hub.address), hub.address.worker, inbox.data("t")) for hub, inbox in zip(hubs, inboxes)],
        "sender": str(sender.address) if sender is not None else None,
    }


def test_to_reaches_only_the_addressed_hub_or_worker(backplane: Backplane) -> None:
    """to=msg.origin reaches that hub alone; to=<worker index> every hub of that worker, and no other."""
    out = backplane.run(_addressed, 2)
    sender = out[0]["sender"]
    hubs = [hub for node in out for hub in node["hubs"]]
    sender_worker = next(worker for address, worker, _ in hubs if address == sender)
    for address, worker, got in hubs:
        if address == sender:
            replies = sorted(d for d in got if d.startswith("reply:"))
            assert replies == sorted(f"reply:{a}" for a, _, _ in hubs if a != sender)
            assert [d for d in got if not d.startswith("reply:")] == ["self", f"w:{sender_worker}", "end", "fin"]
        else:
            # Only what was addressed to it (in publish order): nobody else's reply, no other worker's.
            assert got == [f"to:{address}", f"w:{worker}", "end", "fin"], f"hub {address} got {got}"


# --------------------------------------------------------------- 7. on_error stages


def _raising_subscriber(peer: Peer) -> Dict[str, Any]:
    errors: List[Tuple[str, str, str]] = []
    hub = peer.hub(on_error=lambda exc, stage: errors.append((type(exc).__name__, stage, str(exc))))

    def broken(msg: Any) -> None:
        raise ValueError(f"broken subscriber: {msg.data}")

    hub.subscribe("t", broken)
    inbox = Inbox(hub, "t")  # subscribed after the broken one: it must still get everything
    peer.ready(hub)
    if peer.index == 0:
        for i in range(5):
            hub.publish("t", i)  # the local broken subscriber: reported, never raised here
        hub.publish("t", "end")
    else:
        until(lambda: inbox.data("t")[-1:] == ["end"], "the end")
    return {"got": inbox.data("t"), "errors": errors}


def test_a_raising_subscriber_is_reported_as_delivery_and_the_others_still_get_messages(backplane: Backplane) -> None:
    for node in backplane.run(_raising_subscriber, 2):  # node 0: local delivery; node 1: remote
        assert node["got"] == [0, 1, 2, 3, 4, "end"]
        assert node["errors"] == [("ValueError", "delivery", f"broken subscriber: {d}") for d in node["got"]]


# --------------------------------------------------------------- 8. wait_ready, stats, close


def _lifecycle(peer: Peer) -> Dict[str, Any]:
    before = set(threading.enumerate())
    errors: List[Any] = []
    hub = peer.hub(on_error=lambda exc, stage: errors.append((type(exc).__name__, stage)))
    assert hub.wait_ready(WAIT) is True
    stats = hub.stats()
    assert hub.wait_ready(0) is True  # and stays so
    sub = hub.subscribe("t")
    hub.publish("t", "before close")
    # Bad arguments raise at once, and the hub goes on.
    bad: List[Tuple[Any, Any, Any, Any]] = [
        (5, "x", None, TypeError),
        ("t", {1, 2}, None, TypeError),
        ("t", (1, 2), None, TypeError),
        ("t", {1: "int key"}, None, TypeError),
        ("t", "x", "w0", TypeError),
        ("t", "x", 1.5, TypeError),
        ("t", "\ud800", None, ValueError),
        ("t" * 70_000, "x", None, ValueError),
    ]
    for topic, data, to, kind in bad:
        try:
            hub.publish(topic, data, to=to)
        except kind:
            pass
        else:
            raise AssertionError(f"publish({topic!r:.20}, {data!r}, to={to!r}) did not raise {kind.__name__}")
    hub.close()
    hub.close()  # twice is fine
    assert hub.closed
    outcomes = []
    for call in (lambda: hub.publish("t", "after close"), lambda: hub.subscribe("t")):
        try:
            call()
            outcomes.append("no error")
        except RuntimeError:
            outcomes.append("RuntimeError")
    assert sub.get(timeout=1).data == "before close"  # what was queued stays readable, then the end
    try:
        sub.get(timeout=1)
        ended = False
    except Exception as exc:
        ended = type(exc).__name__ == "SubscriptionClosed"
    # The hub's threads end with it (the relay's link threads are the worker's, not the hub's).
    relay = {"clustersync-reader", "clustersync-writer"}
    until(lambda: not [t for t in set(threading.enumerate()) - before if t.is_alive() and t.name not in relay],
          "the hub's threads to end", timeout=6)
    return {
        "sync_type": hub.sync_type,
        "backplane": stats["backplane"],
        "up": stats.get("driver", {}).get("up"),
        "outcomes": outcomes,
        "ended": ended,
        "errors": errors,
    }


def test_wait_ready_close_twice_and_publish_after_close(backplane: Backplane) -> None:
    (out,) = backplane.run(_lifecycle, 1)
    assert out["sync_type"] == backplane.name
    assert out["backplane"] is True
    if backplane.name in NETWORK:
        assert out["up"] is True
    assert out["outcomes"] == ["RuntimeError", "RuntimeError"]
    assert out["ended"] is True
    assert out["errors"] == []


N_CLOSE = 2000


def _publish_then_close(peer: Peer) -> Optional[List[Any]]:
    hub = peer.hub()
    inbox = Inbox(hub, "t")
    peer.ready(hub)
    if peer.index == 0:
        for i in range(N_CLOSE):
            hub.publish("t", i)
        hub.close()  # at once: what publish accepted while up is on its way, not thrown away
        return None
    try:
        until(lambda: len(inbox.data("t")) >= N_CLOSE, f"all {N_CLOSE} messages published before close()", 5.0)
    except AssertionError:
        pass  # the test says what is missing
    return inbox.data("t")


def test_what_was_published_before_close_is_delivered(backplane: Backplane) -> None:
    """A hub that publishes and closes at once (a script's last words) loses nothing it had accepted."""
    _, got = backplane.run(_publish_then_close, 2)
    assert got == list(range(N_CLOSE)), f"{len(got)} of {N_CLOSE} arrived; the last: {got[-1:]}"


# --------------------------------------------------------------- 9. bad arguments at construction


@pytest.mark.parametrize("channel", ["", None, 5, b"bytes", "x" * 256])
def test_a_bad_channel_raises_at_once(backplane: Backplane, channel: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="channel"):
        backplane.make(channel)


def _dead_url(scheme: str) -> str:
    return f"{scheme}://127.0.0.1:1/x"


BAD_ARGUMENTS: List[Tuple[str, Callable[[], Any], Any]] = [
    ("postgres-channel-64-bytes", lambda: postgres(conninfo=_dead_url("postgresql"), channel="x" * 64), ValueError),
    ("postgres-channel-64-utf8-bytes", lambda: postgres(conninfo=_dead_url("postgresql"), channel="é" * 32), ValueError),
    ("postgres-channel-64-bytes-from-url", lambda: from_url(_dead_url("postgres"), channel="c" * 64), ValueError),
    ("postgres-channel-nul", lambda: postgres(conninfo=_dead_url("postgresql"), channel="a\0b"), ValueError),
    ("postgres-neither", lambda: postgres(channel="c"), TypeError),
    ("postgres-both", lambda: postgres(channel="c", conninfo=_dead_url("postgresql"), connection=object()), TypeError),
    ("postgres-connection-str", lambda: postgres(channel="c", connection=_dead_url("postgresql")), TypeError),
    ("postgres-connection-object", lambda: postgres(channel="c", connection=object()), TypeError),
    ("postgres-conninfo-not-str", lambda: postgres(channel="c", conninfo=b"host=x"), TypeError),  # type: ignore[arg-type]
    ("postgres-conninfo-garbage", lambda: postgres(channel="c", conninfo="host=x port"), ValueError),
    ("nats-channel-space", lambda: nats(servers=_dead_url("nats"), channel="a b"), ValueError),
    ("nats-channel-star", lambda: nats(servers=_dead_url("nats"), channel="a.*"), ValueError),
    ("nats-channel-star-alone", lambda: nats(servers=_dead_url("nats"), channel="*"), ValueError),
    ("nats-channel-gt", lambda: nats(servers=_dead_url("nats"), channel="a.>"), ValueError),
    ("nats-channel-empty-token", lambda: nats(servers=_dead_url("nats"), channel="a..b"), ValueError),
    ("nats-channel-tab", lambda: from_url(_dead_url("nats"), channel="a\tb"), ValueError),
    ("nats-servers-scheme", lambda: nats(servers="http://127.0.0.1:1", channel="c"), ValueError),
    ("nats-servers-type", lambda: nats(servers=4222, channel="c"), TypeError),
    ("nats-servers-empty", lambda: nats(servers=[], channel="c"), TypeError),
    ("nats-connect-options-clash", lambda: nats(channel="c", connect_options={"allow_reconnect": True}), ValueError),
    ("redis-neither", lambda: redis(channel="c"), TypeError),
    ("redis-both", lambda: redis(channel="c", url=_dead_url("redis"), client=object()), TypeError),
    ("redis-client-not-redis", lambda: redis(channel="c", client=object()), TypeError),
    ("redis-url-scheme", lambda: redis(channel="c", url="http://127.0.0.1:1"), ValueError),
    ("redis-url-type", lambda: redis(channel="c", url=6379), ValueError),  # type: ignore[arg-type]
    ("redis-unknown-option", lambda: redis(channel="c", url=_dead_url("redis"), ping_every=1), TypeError),
    ("redis-ping-interval-zero", lambda: redis(channel="c", url=_dead_url("redis"), ping_interval=0), ValueError),
    ("redis-ping-timeout-bool", lambda: redis(channel="c", url=_dead_url("redis"), ping_timeout=True), ValueError),
    ("redis-reconnect-max-below-min", lambda: redis(channel="c", url=_dead_url("redis"), reconnect_min=2, reconnect_max=1), ValueError),
    ("redis-queue-size-zero", lambda: redis(channel="c", url=_dead_url("redis"), queue_size=0), ValueError),
    ("nats-max-queued-bytes-float", lambda: nats(channel="c", max_queued_bytes=1.5), ValueError),
    ("postgres-max-message-zero", lambda: postgres(channel="c", conninfo=_dead_url("postgresql"), max_message=0), ValueError),
    ("from-url-unknown-scheme", lambda: from_url("mqtt://127.0.0.1:1883", channel="c"), ValueError),
    ("from-url-no-scheme", lambda: from_url("127.0.0.1:6379", channel="c"), ValueError),
    ("from-url-http", lambda: from_url("http://127.0.0.1:6379", channel="c"), ValueError),
    ("from-url-not-str", lambda: from_url(None, channel="c"), TypeError),  # type: ignore[arg-type]
    ("from-url-bad-channel", lambda: from_url(_dead_url("redis"), channel=""), ValueError),
]


@pytest.mark.parametrize("make, error", [pytest.param(m, e, id=i) for i, m, e in BAD_ARGUMENTS])
def test_bad_driver_arguments_raise_at_once(make: Callable[[], Any], error: Any) -> None:
    start = time.monotonic()
    with pytest.raises(error):
        make()
    assert time.monotonic() - start < 1.0  # at once: no connection attempted


def test_longest_postgres_channel_is_accepted() -> None:
    postgres(conninfo=_dead_url("postgresql"), channel="x" * 63)
    postgres(conninfo=_dead_url("postgresql"), channel="é" * 31 + "x")  # 63 bytes


def test_postgres_refuses_a_connection_that_is_not_a_psycopg_connection(postgres_server: Server) -> None:
    """A pool, an async connection or a cursor is not a dedicated synchronous connection: TypeError."""
    import asyncio

    import psycopg

    async def async_connection() -> Any:
        conn = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)
        try:
            with pytest.raises(TypeError, match="psycopg.Connection"):
                postgres(channel="c", connection=conn)
        finally:
            await conn.close()

    asyncio.run(async_connection())
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        with conn.cursor() as cursor:
            with pytest.raises(TypeError, match="psycopg.Connection"):
                postgres(channel="c", connection=cursor)

    class ConnectionPool:  # what psycopg_pool's pool is to the driver: not a Connection
        def connection(self) -> Any:
            return psycopg.connect(postgres_server.url)

    with pytest.raises(TypeError, match="pool"):
        postgres(channel="c", connection=ConnectionPool())


# --------------------------------------------------------------- the network factories' other forms


def _mixed_forms(peer: Peer, name: str, url: str) -> Dict[str, Any]:
    """Node 0: a hub from from_url; node 1: a hub from the user's own client/connection (left open)."""
    user: Any = None
    if peer.index == 0:
        hub = Hub(sync=from_url(url, channel=peer.channel))
    elif name == "redis":
        import redis as lib

        user = lib.Redis.from_url(url)
        hub = Hub(sync=redis(client=user, channel=peer.channel))
    elif name == "postgres":
        import psycopg

        user = psycopg.connect(url, autocommit=True)
        hub = Hub(sync=postgres(connection=user, channel=peer.channel))
    else:
        hub = Hub(sync=nats(servers=[url], channel=peer.channel, connect_options={"name": "conformance"}))
    peer.hubs.append(hub)
    inbox = Inbox(hub, "t")
    peer.ready(hub)
    hub.publish("t", f"from {peer.index}")
    until(lambda: len(inbox.data("t")) == 2, "both messages")
    hub.close()
    still_open = None
    if name == "redis" and user is not None:
        still_open = user.ping() is True
        user.close()
    elif name == "postgres" and user is not None:
        still_open = user.execute("SELECT 1").fetchone() == (1,)
        user.close()
    return {"sync_type": hub.sync_type, "got": sorted(inbox.data("t")), "user_still_open": still_open}


def test_from_url_and_a_users_own_client(network: Backplane) -> None:
    """from_url picks the driver by scheme; a user's client or connection is only read, never closed."""
    assert network.server is not None
    out = network.run(_mixed_forms, 2, network.name, network.server.url)
    for node in out:
        assert node["sync_type"] == network.name
        assert node["got"] == ["from 0", "from 1"]
    if network.name in ("redis", "postgres"):
        assert out[1]["user_still_open"] is True


def test_a_network_hub_counts_what_other_hubs_sent_it_not_the_servers_echo(network: Backplane) -> None:
    """``stats()["driver"]["received"]``: the server sends a publisher its own messages back; they are not counted."""
    a = Hub(sync=network.make("counted"))
    b = Hub(sync=network.make("counted"))
    try:
        got: List[Any] = []
        b.subscribe("t", got.append)
        assert a.wait_ready(WAIT) and b.wait_ready(WAIT)
        for i in range(10):
            a.publish("t", i)
        until(lambda: len(got) == 10, "the ten messages")
        b.publish("t", "back")
        until(lambda: a.stats()["driver"]["received"] == 1, "b's one message at a")
        assert b.stats()["driver"]["received"] == 10
    finally:
        a.close()
        b.close()
