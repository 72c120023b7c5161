"""What the Redis, Postgres and NATS drivers share: a session with a server that survives outages.

A :class:`Backend` opens two kinds of connection to its server: a
:class:`Listener` (subscribe, receive, ping) and a :class:`Sender`
(publish). A :class:`Session` owns one of each and two threads:

- the **reader** connects, subscribes to the session's channels and hands
  every payload to ``on_message(channel, payload)``. After
  ``ping_interval`` seconds of silence it pings the server, and a ping not
  answered within ``ping_timeout`` is an outage: a frozen server (a
  half-open connection) is found this way, not only a closed one. On an
  outage it closes both connections and reconnects with jittered
  exponential backoff (reset on success), resubscribing to every channel;
- the **writer** takes what :meth:`Session.publish` queued and sends it in
  batches. While the backplane is down it sends nothing: what is queued or
  published then is dropped and counted as ``lost``.

``publish`` only queues, and never raises because of the server. The
queue is bounded in messages and in bytes: when it is full, ``publish``
waits up to ``publish_timeout`` for the writer to make room (a flood is
slowed, not dropped), then drops the oldest, counted as ``lost``. ``on_state(up, exc)`` is
called once when an outage starts (``up=False``, with its cause) and once
when it ends (``up=True``), never once per message.

:class:`BackplaneDriver` is the :class:`~clustersync.sync.base.SyncDriver`
built on a session: one hub on one channel, with the binary envelope of
:mod:`clustersync.sync.envelope`, echo suppression by node id, ``to=``
filtering on receipt, and a delivery thread behind a bounded queue so a
slow subscriber never delays the reader's pings.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, FrozenSet, List, Optional, Protocol, Sequence, Set, Tuple

from .._log import RateLimitedLog
from ..message import DEFAULT_QUEUE_SIZE, Address, BoundedQueue, Destination, Message, delivering_on
from .base import Deliver, DeliverBatch, OnUnreachable, deliver_in_runs, one_by_one
from .envelope import is_for, pack, unpack

__all__ = [
    "Backend",
    "Listener",
    "Sender",
    "Session",
    "BackplaneDriver",
    "Options",
    "OnState",
    "DEFAULT_MAX_QUEUED_BYTES",
    "check_options",
    "BackplaneDown",
]

logger = logging.getLogger("clustersync")
_ratelimited = RateLimitedLog()
_new_message = tuple.__new__  # Message(...) without the Python-level __new__

#: ``on_state(up, exc)``: the backplane was lost (``False``, with the cause) or is back (``True``, ``None``).
OnState = Callable[[bool, Optional[BaseException]], Any]
#: The outgoing queue of a session holds at most this many bytes by default.
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
_BATCH = 256  # messages sent in one round trip at most
_BATCH_BYTES = 1024 * 1024
_POLL = 0.25  # the reader looks at channel changes and close() at least this often


class BackplaneDown(ConnectionError):
    """The backplane was lost: passed to ``on_error(exc, "subscribe")`` once per outage; ``__cause__`` says why."""


class Listener(Protocol):
    """A backend's receiving connection, used by the session's reader thread alone."""

    def subscribe(self, channels: Sequence[str], timeout: float) -> None:
        """Subscribe to ``channels``; return once the server has them (raise on failure or past ``timeout``)."""

    def unsubscribe(self, channels: Sequence[str], timeout: float) -> None:
        """Stop receiving ``channels``."""

    def receive(self, timeout: float) -> List[Tuple[str, bytes]]:
        """Wait up to ``timeout`` for payloads; return every ``(channel, payload)`` at hand ([] if none)."""

    def ping(self, timeout: float) -> List[Tuple[str, bytes]]:
        """A round trip to the server; raise ``TimeoutError`` past ``timeout``. Returns payloads read meanwhile."""

    def close(self) -> None:
        """Close the connection (never raises)."""


class Sender(Protocol):
    """A backend's publishing connection, used by the session's writer thread alone."""

    def publish(self, items: Sequence[Tuple[str, bytes]], timeout: float) -> None:
        """Send every ``(channel, payload)`` in order; raise on failure or past ``timeout``."""

    def close(self) -> None:
        """Close the connection (never raises)."""


class Backend(Protocol):
    """One kind of server: how to open its connections."""

    #: The driver's name: ``"redis"``, ``"postgres"``, ``"nats"``.
    name: str
    #: The largest payload one message may be on this server.
    max_payload: int

    def check_channel(self, channel: str) -> None:
        """Raise ``ValueError`` if this server cannot carry ``channel``."""

    def open_listener(self, timeout: float) -> Listener:
        """Connect a listener (raise on failure or past ``timeout``)."""

    def open_sender(self, timeout: float) -> Sender:
        """Connect a sender (raise on failure or past ``timeout``)."""

    def close(self) -> None:
        """Release what the backend holds beyond its connections (never raises)."""


class Options:
    """The timing and bounds every network driver takes (see :func:`check_options`)."""

    __slots__ = (
        "ping_interval", "ping_timeout", "reconnect_min", "reconnect_max",
        "queue_size", "max_queued_bytes", "publish_timeout",
    )

    def __init__(
        self,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        reconnect_min: float = 0.05,
        reconnect_max: float = 1.0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        publish_timeout: float = 1.0,
    ) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.queue_size = queue_size
        self.max_queued_bytes = max_queued_bytes
        self.publish_timeout = publish_timeout


def check_options(**options: Any) -> Options:
    """Return :class:`Options` from keyword arguments, raising ``TypeError``/``ValueError`` for bad ones."""
    known = set(Options.__slots__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    opts = Options(**options)
    for name in ("ping_interval", "ping_timeout", "reconnect_min", "reconnect_max", "publish_timeout"):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    if opts.reconnect_max < opts.reconnect_min:
        raise ValueError("reconnect_max must be at least reconnect_min")
    for name in ("queue_size", "max_queued_bytes"):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, not {value!r}")
    return opts


class _Outbox:
    """The writer's queue: bounded in messages and bytes, the oldest dropped on overflow."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size = 0
        self.closed = False
        self.items: Deque[Tuple[str, bytes]] = deque()
        self.cond = threading.Condition(threading.Lock())

    def _full(self) -> bool:
        return len(self.items) >= self.max_items or self.size >= self.max_bytes

    def put(self, item: Tuple[str, bytes], wait: float) -> int:
        """Queue ``item``, waiting up to ``wait`` seconds for room; return how many old ones fell out."""
        with self.cond:
            if self._full() and not self.closed:
                self.cond.wait_for(lambda: not self._full() or self.closed, wait)
            if self.closed:
                return 0
            self.items.append(item)
            self.size += len(item[1])
            dropped = 0
            while len(self.items) > self.max_items or (self.size > self.max_bytes and len(self.items) > 1):
                old = self.items.popleft()
                self.size -= len(old[1])
                dropped += 1
            self.cond.notify()
            return dropped

    def take(self) -> List[Tuple[str, bytes]]:
        """Wait for items; return a batch ([] once closed and empty)."""
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            batch: List[Tuple[str, bytes]] = []
            size = 0
            items = self.items
            while items and len(batch) < _BATCH and size < _BATCH_BYTES:
                item = items.popleft()
                size += len(item[1])
                batch.append(item)
            self.size -= size
            self.cond.notify_all()  # publishers waiting for room
            return batch

    def clear(self) -> int:
        """Drop everything queued; return how many."""
        with self.cond:
            n = len(self.items)
            self.items.clear()
            self.size = 0
            self.cond.notify_all()
            return n

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Session:
    """One listener, one sender and their two threads, on a set of channels (see the module's text)."""

    def __init__(
        self,
        backend: Backend,
        channels: Sequence[str],
        on_message: Callable[[str, bytes], Any],
        on_state: Optional[OnState] = None,
        options: Optional[Options] = None,
        label: str = "",
    ) -> None:
        self.backend = backend
        self.options = options or Options()
        self.label = label or backend.name
        self.on_message = on_message
        self.on_state = on_state
        #: Called on the reader thread with the channels the server has just confirmed.
        self.on_subscribed: Optional[Callable[[List[str]], Any]] = None
        #: 8 random bytes naming this session on the backplane (echo suppression).
        self.node = os.urandom(8)
        self._channels: Set[str] = set(channels)
        self._changes: List[Tuple[bool, str]] = []
        self._lock = threading.Lock()
        self._outbox = _Outbox(self.options.queue_size, self.options.max_queued_bytes)
        self._sender: Optional[Sender] = None
        self._up = False
        self._down_reported = False  # the current outage has been told
        self._fault: Optional[BaseException] = None
        self._closing = False
        self._closed = threading.Event()
        self._ready = threading.Event()
        self.published = 0
        self.received = 0
        self.lost = 0
        #: Messages over the server's limit, dropped before they were queued.
        self.too_big = 0
        self.outages = 0
        self.reconnects = 0
        self._reader = threading.Thread(target=self._read_loop, name=f"clustersync-{self.label}-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"clustersync-{self.label}-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    # -- what the driver calls --------------------------------------------------

    @property
    def up(self) -> bool:
        """True while connected and subscribed."""
        return self._up

    def publish(self, channel: str, payload: bytes, wait: Optional[float] = None) -> bool:
        """Queue ``payload`` for ``channel``.

        When the queue is full, waits up to ``wait`` (default
        ``publish_timeout``) seconds for room, then drops the oldest (counted as lost). Dropped at once, and counted,
        while the backplane is down. Returns True if the message was queued.
        """
        if not self._up:
            self._lose(1)
            return False
        if len(payload) > self.backend.max_payload:
            # The server would refuse it and drop the connection: it alone is dropped, and counted.
            with self._lock:
                self.too_big += 1
            _ratelimited(
                ("backplane-too-big", self.label), logging.ERROR,
                "%s: dropped a message of %d bytes, over the server's limit of %d (%d so far)",
                self.label, len(payload), self.backend.max_payload, self.too_big,
            )
            return False
        dropped = self._outbox.put((channel, payload), self.options.publish_timeout if wait is None else wait)
        if dropped:
            self._lose(dropped)
            _ratelimited(
                ("backplane-full", self.label), logging.WARNING,
                "%s: the outgoing queue is full, dropped the %d oldest message(s) (%d lost so far)",
                self.label, dropped, self.lost,
            )
        return True

    def add_channel(self, channel: str) -> None:
        """Subscribe to one more channel.

        The reader applies it within a quarter of a second; :attr:`on_subscribed` tells when.
        """
        with self._lock:
            if channel not in self._channels:
                self._channels.add(channel)
                self._changes.append((True, channel))

    def remove_channel(self, channel: str) -> None:
        """Stop receiving ``channel``."""
        with self._lock:
            if channel in self._channels:
                self._channels.discard(channel)
                self._changes.append((False, channel))

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait until connected and subscribed; True if so."""
        return self._ready.wait(timeout) and self._up

    def stats(self) -> Dict[str, Any]:
        """Counters: published, received, lost, outages, reconnects; whether it is up, and what is queued."""
        return {
            "driver": self.backend.name,
            "up": self._up,
            "published": self.published,
            "received": self.received,
            "lost": self.lost,
            "too_big": self.too_big,
            "outages": self.outages,
            "reconnects": self.reconnects,
            "queued": len(self._outbox.items),
        }

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (while the backplane is up, within ``timeout``), then stop both threads and
        close both connections. Safe to call twice."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._outbox.close()  # the writer sends what is queued, then ends
        if self._writer is not threading.current_thread():
            self._writer.join(timeout)
        self._closed.set()  # only now may the reader close the sender's connection
        if self._reader is not threading.current_thread():
            self._reader.join(timeout)
        self.backend.close()

    # -- state ----------------------------------------------------------------

    def _lose(self, count: int) -> None:
        """Count ``count`` messages that will never be sent (from any thread: exact)."""
        if count:
            with self._lock:
                self.lost += count

    def _went_up(self) -> None:
        with self._lock:
            self._up = True
            was_down = self._down_reported
            self._down_reported = False
            if was_down:
                self.reconnects += 1
        self._ready.set()
        if was_down:
            self._tell(True, None)

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            self._up = False
            first = not self._down_reported
            self._down_reported = True
            if first:
                self.outages += 1
        self._ready.clear()
        self._lose(self._outbox.clear())
        if first and not self._closed.is_set():
            self._tell(False, exc)

    def _tell(self, up: bool, exc: Optional[BaseException]) -> None:
        fn = self.on_state
        if fn is None:
            if up:
                logger.warning("%s: the backplane is back", self.label)
            else:
                logger.error("%s: the backplane is down: %s", self.label, exc)
            return
        try:
            fn(up, exc)
        except Exception:
            logger.exception("%s: a backplane state handler failed", self.label)

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking at close(); True if closed."""
        return self._closed.wait(seconds)

    # -- the reader -------------------------------------------------------------

    def _read_loop(self) -> None:
        opts = self.options
        delay = opts.reconnect_min
        while not self._closed.is_set():
            listener: Optional[Listener] = None
            try:
                listener = self.backend.open_listener(opts.ping_timeout)
                with self._lock:
                    channels = sorted(self._channels)
                    self._changes.clear()
                if channels:
                    listener.subscribe(channels, opts.ping_timeout)
                sender = self.backend.open_sender(opts.ping_timeout)
            except Exception as exc:
                if listener is not None:
                    listener.close()
                if self._closed.is_set():
                    return
                self._went_down(exc)
                if self._wait(random.uniform(delay / 2, delay)):
                    return
                delay = min(delay * 2, opts.reconnect_max)
                continue
            delay = opts.reconnect_min
            with self._lock:
                self._sender = sender
                self._fault = None
            self._went_up()
            self._subscribed(channels)
            try:
                self._listen(listener)
            except Exception as exc:
                if not self._closed.is_set():
                    self._went_down(exc)
            finally:
                with self._lock:
                    self._sender = None
                listener.close()
                sender.close()

    def _listen(self, listener: Listener) -> None:
        opts = self.options
        last = time.monotonic()
        while not self._closed.is_set():
            if self._changes:
                with self._lock:
                    changes, self._changes = self._changes, []
                for on, channel in changes:
                    if on:
                        listener.subscribe([channel], opts.ping_timeout)
                        self._subscribed([channel])
                    else:
                        listener.unsubscribe([channel], opts.ping_timeout)
            fault = self._fault
            if fault is not None:
                raise fault
            items = listener.receive(min(_POLL, opts.ping_interval))
            now = time.monotonic()
            if not items and now - last >= opts.ping_interval:
                items = listener.ping(opts.ping_timeout)
                now = time.monotonic()
                last = now
            if items:
                last = now
                self._hand_over(items)

    def _subscribed(self, channels: List[str]) -> None:
        fn = self.on_subscribed
        if fn is not None and channels:
            try:
                fn(channels)
            except Exception:
                logger.exception("%s: a subscription handler failed", self.label)

    def _hand_over(self, items: List[Tuple[str, bytes]]) -> None:
        self.received += len(items)
        on_message = self.on_message
        for channel, payload in items:
            try:
                on_message(channel, payload)
            except Exception:
                _ratelimited(("backplane-deliver", self.label), logging.ERROR,
                             "%s: handing a message over failed", self.label, exc_info=True)

    # -- the writer -------------------------------------------------------------

    def _write_loop(self) -> None:
        outbox = self._outbox
        timeout = self.options.ping_timeout
        while True:
            batch = outbox.take()
            if not batch:
                return
            sender = self._sender
            if sender is None or not self._up:
                self._lose(len(batch))
                continue
            try:
                sender.publish(batch, timeout)
            except Exception as exc:
                self._lose(len(batch))
                with self._lock:
                    current = self._sender is sender  # not a connection the reader has already replaced
                    if current and self._fault is None:
                        self._fault = exc  # the reader tears the session down and reconnects
                if current:
                    self._went_down(exc)
            else:
                self.published += len(batch)


class BackplaneDriver:
    """One hub on one channel of a network backplane: the :class:`SyncDriver` the Redis, Postgres and NATS factories return."""

    capabilities: FrozenSet[str] = frozenset({"batch", "parts", "ready", "stats", "limit", "state"})

    def __init__(self, address: Address, channel: str, backend: Backend, options: Options, queue_size: int) -> None:
        self.name = backend.name
        self.address = address
        self.channel = channel
        self._backend = backend
        self._options = options
        self._queue: BoundedQueue[Message] = BoundedQueue(queue_size, self._overflow)
        self._deliver: Optional[DeliverBatch] = None
        self._on_state: Optional[OnState] = None
        self._session: Optional[Session] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        #: Messages from other hubs for this one (the server's echo of our own, and others' ``to=``, aside).
        self.received = 0
        self.max_message = max(1, backend.max_payload - 1024)

    def watch_state(self, fn: OnState) -> None:
        """Capability ``"state"``: call ``fn(up, exc)`` once when an outage starts and once when it ends."""
        self._on_state = fn

    def subscribe(self, deliver: Deliver, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Connect, subscribe and start delivering (connecting goes on in the background)."""
        self.subscribe_batch(one_by_one(deliver), on_unreachable)

    def subscribe_batch(self, deliver_batch: DeliverBatch, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Like :meth:`subscribe`, runs of one origin and topic at a time."""
        if self._deliver is not None:
            raise RuntimeError("subscribe() called twice")
        self._deliver = deliver_batch
        label = f"{self.name} {self.channel!r} hub {self.address}"
        self._thread = threading.Thread(target=self._run, name=f"clustersync-{self.name}-deliver", daemon=True)
        self._thread.start()
        self._session = Session(self._backend, [self.channel], self._on_message, self._state, self._options, label)

    def _state(self, up: bool, exc: Optional[BaseException]) -> None:
        fn = self._on_state
        if fn is not None:
            if exc is not None:
                down = BackplaneDown(f"{self.name} {self.channel!r}: the backplane is down: {type(exc).__name__}: {exc}")
                down.__cause__ = exc
                exc = down
            fn(up, exc)
        elif up:
            logger.warning("%s %r: the backplane is back", self.name, self.channel)
        else:
            logger.error("%s %r: the backplane is down: %s", self.name, self.channel, exc)

    def _on_message(self, channel: str, payload: bytes) -> None:
        session = self._session
        unpacked = unpack(payload)
        if unpacked is None:
            _ratelimited(("backplane-malformed", self.name), logging.WARNING,
                         "%s %r: dropped a payload that is not a clustersync message", self.name, channel)
            return
        node, origin, ns, topic, data, to = unpacked
        if session is not None and node == session.node:
            return  # our own echo
        if to is not None and not is_for(to, self.address):
            return
        self.received += 1
        self._queue.put(_new_message(Message, (ns, topic, data, origin)))

    def _overflow(self, count: int) -> None:
        _ratelimited(("backplane-slow", id(self)), logging.WARNING,
                     "%s %r: hub %s is slow, dropped its oldest message (%d so far)",
                     self.name, self.channel, self.address, self._queue.dropped)

    def _run(self) -> None:
        deliver = self._deliver
        assert deliver is not None
        queue = self._queue
        delivering_on(True)  # this thread does nothing else (a blocking call here waits for itself)
        while True:
            batch = queue.take_all(None)
            if queue.closed:
                return
            deliver_in_runs(batch, deliver)

    def publish_parts(self, namespace: str, topic: str, data: bytes, to: Optional[Destination] = None) -> None:
        """Queue one encoded message for the backplane (never blocks)."""
        session = self._session
        if session is None:
            raise RuntimeError(f"the {self.name} driver is not subscribed")
        payload = pack(session.node, self.address, namespace, topic, data, to)
        if len(payload) > self._backend.max_payload:
            raise ValueError(f"message of {len(payload)} bytes with its envelope is over the {self.name} limit ({self._backend.max_payload})")
        session.publish(self.channel, payload)

    def publish(self, msg: Message, to: Optional[Destination] = None) -> None:
        """Queue ``msg`` for every other hub on the channel (or ``to``)."""
        self.publish_parts(msg.namespace, msg.topic, msg.data, to)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once connected and subscribed (False while the backplane is down)."""
        session = self._session
        return session is not None and session.wait_ready(timeout)

    def stats(self) -> Dict[str, Any]:
        """The session's counters, the channel, and what the delivery queue dropped."""
        session = self._session
        out: Dict[str, Any] = session.stats() if session is not None else {"driver": self.name, "up": False}
        out["channel"] = self.channel
        out["received"] = self.received
        out["dropped"] = self._queue.dropped
        return out

    def close(self) -> None:
        """Close the session and stop delivering. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        session = self._session
        if session is not None:
            session.close()
        else:
            self._backend.close()
        self._queue.close(clear=True)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
