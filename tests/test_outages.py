"""The network drivers (redis, postgres, nats) through real server outages.

A server killed mid-traffic and restarted on its port, a server frozen with
SIGSTOP (a half-open connection: only the application-level ping finds it),
a 1 MiB message over PostgreSQL's 8000-byte NOTIFY, and PostgreSQL's 63-byte
channel limit. The servers are the session-scoped ones of tests/conftest.py;
every test leaves its server running and thawed, whatever happens.

Bounds, not timings: ``publish`` never takes more than PUBLISH_BOUND seconds,
an outage is noticed within ping_interval + ping_timeout + slack, delivery
resumes within RESUME_BOUND seconds of the server's return.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from clustersync import Hub
from clustersync.sync import BackplaneDown, from_url, postgres

from .conftest import wait_for
from .servers import Server

NETWORK = ["redis", "postgres", "nats"]
PUBLISH_BOUND = 2.0  # seconds: no single publish call may take longer, server up, down or frozen
RESUME_BOUND = 2.0  # seconds from the server's return to the first message delivered again
DETECT_SLACK = 1.0  # seconds beyond ping_interval + ping_timeout to notice a frozen server
_channels = itertools.count(1)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=NETWORK)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The session server of one network driver; running and thawed again after the test."""
    srv: Server = request.getfixturevalue(f"{request.param}_server")
    srv.ensure_running()
    try:
        yield srv
    finally:
        srv.ensure_running()


def channel(what: str) -> str:
    return f"outage-{what}-{os.getpid()}-{next(_channels)}"


class Watched:
    """A hub on ``server`` with a record of its on_error and on_backplane calls (monotonic times)."""

    def __init__(self, server: Server, chan: str, **options: Any) -> None:
        self.errors: List[Tuple[float, BaseException, str]] = []
        self.states: List[Tuple[float, bool]] = []
        self.hub = Hub(
            sync=from_url(server.url, channel=chan, **options),
            on_error=lambda exc, stage: self.errors.append((time.monotonic(), exc, stage)),
            on_backplane=lambda up: self.states.append((time.monotonic(), up)),
        )

    def ups(self) -> List[bool]:
        return [up for _, up in self.states]

    def went(self, up: bool, nth: int = 1) -> Optional[float]:
        """When the ``nth`` on_backplane(up) came, or None."""
        times = [t for t, u in self.states if u is up]
        return times[nth - 1] if len(times) >= nth else None

    def stages(self) -> List[Tuple[str, str]]:
        return [(type(exc).__name__, stage) for _, exc, stage in self.errors]

    def driver(self) -> Any:
        return self.hub.stats()["driver"]


class Traffic:
    """A thread publishing 0, 1, 2... from ``hub``, timing every call; never expecting it to raise."""

    def __init__(self, hub: Hub, interval: float = 0.002) -> None:
        self.hub = hub
        self.interval = interval
        self.calls: List[Tuple[int, float, float]] = []  # (seq, start, end)
        self.raised: List[BaseException] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="outage-traffic", daemon=True)

    def _run(self) -> None:
        for seq in itertools.count():
            if self.stop_event.wait(self.interval):
                return
            start = time.monotonic()
            try:
                self.hub.publish("t", seq)
            except BaseException as exc:  # publish must never raise because of the backplane
                self.raised.append(exc)
                return
            self.calls.append((seq, start, time.monotonic()))

    def start(self) -> "Traffic":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the publishing thread is stuck in publish()"

    @property
    def count(self) -> int:
        return len(self.calls)

    def longest(self) -> float:
        return max((end - start for _, start, end in self.calls), default=0.0)

    def between(self, after: float, before: float) -> int:
        """How many publish calls ran entirely within (after, before)."""
        return sum(1 for _, start, end in self.calls if start > after and end < before)


class Received:
    """What a hub got on topic "t": (data, monotonic arrival time)."""

    def __init__(self, hub: Hub) -> None:
        self.got: List[Tuple[Any, float]] = []
        hub.subscribe("t", lambda msg: self.got.append((msg.data, time.monotonic())))

    def seqs(self) -> List[int]:
        return [d for d, _ in list(self.got) if isinstance(d, int)]

    def first_at_or_after(self, seq: int) -> Optional[float]:
        """When the first message numbered ``seq`` or later arrived, or None."""
        for data, at in list(self.got):
            if isinstance(data, int) and data >= seq:
                return at
        return None

    def has(self, data: Any) -> bool:
        return any(d == data for d, _ in list(self.got))


def _check_increasing(seqs: List[int]) -> None:
    """Once each, in publish order: nothing delivered twice or out of order across the outage."""
    bad = [(a, b) for a, b in zip(seqs, seqs[1:]) if b <= a]
    assert not bad, f"out of order or repeated: {bad[:10]}"


def _close(*hubs: Watched) -> None:
    for w in hubs:
        w.hub.close()


# --------------------------------------------------------------- killed, restarted on the same port


def _resumes_and_finishes(back: float, traffic: Any, inbox: Any, pub: Any, sub: Any) -> None:
    """The server is back (since ``back``): delivery resumes within the bound, then the run ends cleanly.

    What is published from now on may reach the subscriber; publish never raised nor took long; each
    hub saw one outage and one recovery, reported once.
    """
    next_seq = traffic.count
    wait_for(lambda: inbox.first_at_or_after(next_seq) is not None, timeout=RESUME_BOUND + 8)
    resumed = inbox.first_at_or_after(next_seq)
    assert resumed is not None
    wait_for(lambda: pub.went(True) and sub.went(True), timeout=10)
    traffic.stop()
    pub.hub.publish("t", "end")
    wait_for(lambda: inbox.has("end"), timeout=10)
    assert not traffic.raised, f"publish raised: {traffic.raised!r}"
    assert traffic.longest() < PUBLISH_BOUND, f"a publish call took {traffic.longest():.2f} s"
    assert resumed - back <= RESUME_BOUND, f"delivery resumed {resumed - back:.2f} s after the server's return"
    for w in (pub, sub):
        assert w.ups() == [False, True], w.states  # once down, once back: never per message
        assert w.stages() == [("BackplaneDown", "subscribe")], w.stages()  # told once per outage


def test_server_killed_mid_traffic_and_restarted(server: Server) -> None:
    chan = channel("kill")
    pub, sub = Watched(server, chan), Watched(server, chan)  # the defaults, as users get them
    traffic: Optional[Traffic] = None
    try:
        inbox = Received(sub.hub)
        assert pub.hub.wait_ready(10) and sub.hub.wait_ready(10)
        traffic = Traffic(pub.hub).start()
        wait_for(lambda: len(inbox.seqs()) >= 50, timeout=10)

        server.kill()
        wait_for(lambda: pub.went(False) and sub.went(False), timeout=10)
        down_at = traffic.count
        wait_for(lambda: traffic.count >= down_at + 50, timeout=10)  # published while down: lost, counted

        server.start()  # same port; returns once the server answers
        _resumes_and_finishes(time.monotonic(), traffic, inbox, pub, sub)
        for w in (pub, sub):
            stats = w.driver()
            assert stats["up"] is True and stats["outages"] == 1 and stats["reconnects"] == 1, stats
        down, up = pub.went(False), pub.went(True)
        assert down is not None and up is not None
        while_down = traffic.between(down, up)
        lost = pub.driver()["lost"]
        assert while_down >= 50 and lost >= while_down, f"{while_down} published while down, {lost} counted lost"
        seqs = inbox.seqs()
        _check_increasing(seqs)
        assert len(seqs) + lost <= traffic.count  # nothing both delivered and counted lost, nothing twice
        assert seqs[-1] == traffic.calls[-1][0]  # the tail, after the outage, all arrived
    finally:
        if traffic is not None:
            traffic.stop_event.set()
        _close(pub, sub)
        server.ensure_running()


# --------------------------------------------------------------- frozen (SIGSTOP): found by the ping

PING_INTERVAL = 0.5
PING_TIMEOUT = 0.5


def test_frozen_server_is_found_by_the_ping_and_delivery_resumes_after_thaw(server: Server) -> None:
    chan = channel("freeze")
    opts = dict(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT)
    pub, sub = Watched(server, chan, **opts), Watched(server, chan, **opts)
    traffic: Optional[Traffic] = None
    try:
        inbox = Received(sub.hub)  # the subscriber publishes nothing: only its ping can notice
        assert pub.hub.wait_ready(10) and sub.hub.wait_ready(10)
        traffic = Traffic(pub.hub).start()
        wait_for(lambda: len(inbox.seqs()) >= 50, timeout=10)

        server.freeze()
        frozen = time.monotonic()
        bound = PING_INTERVAL + PING_TIMEOUT + DETECT_SLACK
        wait_for(lambda: pub.went(False) and sub.went(False), timeout=bound + 5)
        for w in (pub, sub):
            noticed = w.went(False)
            assert noticed is not None
            assert noticed - frozen <= bound, f"noticed {noticed - frozen:.2f} s after the freeze"
        assert isinstance(sub.errors[0][1], BackplaneDown)

        server.thaw()
        _resumes_and_finishes(time.monotonic(), traffic, inbox, pub, sub)
        for w in (pub, sub):
            assert w.driver()["up"] is True
        _check_increasing(inbox.seqs())
        assert pub.driver()["lost"] > 0
    finally:
        if traffic is not None:
            traffic.stop_event.set()
        server.thaw()
        _close(pub, sub)
        server.ensure_running()


def test_a_publish_stuck_on_the_frozen_connection_does_not_bring_the_backplane_down_again(server: Server) -> None:
    """The writer's call on the old connection fails only after the reader has reconnected: that is no new outage.

    Timeline (seconds after the freeze): the publisher's reader pings at
    0.5-0.75 and gives up at 2.0-2.25; the server is thawed as soon as that
    is noticed, and the reader reconnects within ~0.1 s. The publish made at
    1.3 is already on its way over the old connection (the writer waits up
    to ping_timeout, until 2.8): its failure, after the reconnection, must
    not mark the backplane down again, nor report a second outage.
    """
    chan = channel("stale")
    pub_opts = dict(ping_interval=0.5, ping_timeout=1.5)
    stop_watching = threading.Event()
    pub = Watched(server, chan, **pub_opts)
    sub = Watched(server, chan)
    watcher_done = threading.Event()

    def thaw_when_noticed() -> None:  # thaw the moment the publisher notices the outage
        try:
            while not stop_watching.wait(0.005):
                if pub.went(False) is not None:
                    server.thaw()
                    return
        finally:
            watcher_done.set()

    watcher = threading.Thread(target=thaw_when_noticed, daemon=True)
    try:
        inbox = Received(sub.hub)
        assert pub.hub.wait_ready(10) and sub.hub.wait_ready(10)
        pub.hub.publish("t", "warm-up")  # the publisher's reader hears its echo: its silence starts now
        wait_for(lambda: inbox.has("warm-up"), timeout=10)
        server.freeze()
        frozen = time.monotonic()
        watcher.start()
        # Placed in time on purpose (not a wait for a condition): after the reader's ping went out, before it gave up.
        time.sleep(max(0.0, frozen + 1.3 - time.monotonic()))
        pub.hub.publish("t", "while frozen")
        wait_for(lambda: pub.went(True) is not None, timeout=10)
        # The writer's call on the old connection is over: it went through after the thaw, or failed (lost).
        wait_for(lambda: pub.driver()["published"] + pub.driver()["lost"] >= 2, timeout=10)  # with the warm-up
        for last in ("after", "and after"):
            pub.hub.publish("t", last)
            try:
                wait_for(lambda: inbox.has(last), timeout=5)
            except AssertionError:
                raise AssertionError(
                    f"{last!r} never arrived: on_backplane {pub.ups()}, on_error {pub.stages()}, stats {pub.driver()}"
                ) from None
        assert pub.ups() == [False, True], pub.states
        assert pub.stages() == [("BackplaneDown", "subscribe")], pub.stages()
        assert pub.hub.wait_ready(0) is True
        assert pub.driver()["outages"] == 1
    finally:
        stop_watching.set()
        watcher_done.wait(5)
        server.thaw()
        _close(pub, sub)
        server.ensure_running()


# --------------------------------------------------------------- postgres: size and name limits


def test_a_1_mib_bytes_message_arrives_whole_over_postgres(postgres_server: Server) -> None:
    """NOTIFY carries 8000 bytes: the driver splits 1 MiB into many, in one transaction, and puts it back."""
    chan = channel("big")
    a, b = Watched(postgres_server, chan), Watched(postgres_server, chan)
    try:
        inbox = Received(b.hub)
        assert a.hub.wait_ready(10) and b.hub.wait_ready(10)
        big = os.urandom(1 << 20)
        a.hub.publish("t", "before")
        a.hub.publish("t", big)
        a.hub.publish("t", "after")
        wait_for(lambda: inbox.has("after"), timeout=20)
        got = [d for d, _ in inbox.got]
        assert len(got) == 3 and got[0] == "before" and got[2] == "after"
        assert type(got[1]) is bytes and len(got[1]) == len(big) and got[1] == big
        assert a.errors == [] and b.errors == []
    finally:
        _close(a, b)


@pytest.mark.parametrize("name", ["x" * 64, "é" * 32, "a" * 63 + "é"], ids=["64-ascii", "32-two-byte", "63-ascii-and-one-more"])
def test_a_postgres_channel_over_63_bytes_is_refused(postgres_server: Server, name: str) -> None:
    with pytest.raises(ValueError, match="63 bytes"):
        postgres(conninfo=postgres_server.url, channel=name)
    with pytest.raises(ValueError, match="63 bytes"):
        from_url(postgres_server.url, channel=name)
    postgres(conninfo=postgres_server.url, channel=name.encode()[:63].decode(errors="ignore"))  # at the limit: fine


# --------------------------------------------------------------- a slow link: messages arrive in pieces


class SlowLink:
    """A TCP relay to a server that hands the server's bytes on in small pieces, a little apart.

    What a slow or congested network does: a message arrives over many reads,
    and a read may end in the middle of one. Client-to-server bytes pass as they are.
    """

    def __init__(self, port: int, piece: int = 1000, gap: float = 0.001) -> None:
        self.target = port
        self.piece = piece
        self.gap = gap
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.sockets: List[socket.socket] = []
        self.threads: List[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, fn: Any, *args: Any) -> None:
        thread = threading.Thread(target=fn, args=args, name="slow-link", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            self.sockets += [client, server]
            self._spawn(self._pump, client, server, 0)
            self._spawn(self._pump, server, client, self.piece)

    def _pump(self, src: socket.socket, dst: socket.socket, piece: int) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                step = piece or len(data)
                for start in range(0, len(data), step):
                    dst.sendall(data[start : start + step])
                    if piece:
                        time.sleep(self.gap)  # the link's pace, not a synchronisation
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def url(self, server: Server) -> str:
        return server.url.replace(f":{server.port}", f":{self.port}")

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for thread in self.threads:
            thread.join(5)


def test_messages_arriving_in_pieces_over_a_slow_link_are_no_outage(server: Server) -> None:
    """A read that ends mid-message is normal on a slow network: wait for the rest, never call it an outage."""
    chan = channel("slow")
    link = SlowLink(server.port)
    a = Watched(server, chan)
    b_errors: List[Tuple[str, str, str]] = []
    b_states: List[bool] = []
    b = Hub(
        sync=from_url(link.url(server), channel=chan),
        on_error=lambda exc, stage: b_errors.append((type(exc).__name__, stage, str(exc))),
        on_backplane=b_states.append,
    )
    try:
        got: List[Any] = []
        b.subscribe("t", lambda msg: got.append(msg.data))
        assert a.hub.wait_ready(10) and b.wait_ready(10)
        sent = [bytes([i]) * 20_000 for i in range(20)]  # each over many reads, ends mid-read
        for payload in sent:
            a.hub.publish("t", payload)
        a.hub.publish("t", "end")
        wait_for(lambda: "end" in got or b_states, timeout=20)
        assert b_errors == [] and b_states == [], f"an outage over a slow link: {b_errors[:1]}"
        assert got == sent + ["end"]
    finally:
        b.close()
        _close(a)
        link.close()
