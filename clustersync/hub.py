"""The Hub: the pub/sub API an application uses.

A hub keeps a local topic registry, delivers to its own subscribers before
``publish`` returns, and hands every message to its sync driver (if any) so
that hubs elsewhere get it too. See docs/hub.md and docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from itertools import repeat
from operator import itemgetter
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from ._log import RateLimitedLog, logger
from .codec import TAG_BYTES, TAG_STR, TAG_VALUE, Codec, Deserializer, Serializer
from .message import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_QUEUE_SIZE,
    MAX_NAME,
    NO_WORKER,
    Address,
    Destination,
    DestinationUnreachable,
    Message,
    check_name,
)
from .sync.base import DriverFactory, SyncDriver, cluster_transport
from .topics import Callback, Matcher, Subscription, SubscriptionClosed, compile_pattern, is_pattern

__all__ = ["Hub", "Message", "Subscription", "SubscriptionClosed", "DEFAULT_MAX_MESSAGE", "DEFAULT_QUEUE_SIZE"]

STAGES = ("subscribe", "publish", "delivery")

_hub_numbers = itertools.count(1)
_process_tag = os.urandom(3).hex()


def _new_process_tag() -> None:
    global _process_tag
    _process_tag = os.urandom(3).hex()


os.register_at_fork(after_in_child=_new_process_tag)  # a forked child's hubs are not its parent's
_B = b"b"
_ratelimited = RateLimitedLog()
#: Topics a hub keeps a driver's sender for, at most (then it starts again).
MAX_SENDERS = 4096
_new_message = tuple.__new__  # Message(...) without the Python-level __new__, on hot paths
_S = b"s"
_tag_of = itemgetter(slice(0, 1))  # a payload's tag byte (b"" for an empty payload)
_after_tag = itemgetter(slice(1, None))

ErrorHandler = Callable[[BaseException, str], Any]
#: Failures that are conditions, not bugs: logged as one line, without a traceback.
_EXPECTED = (BufferError, DestinationUnreachable, ConnectionError, TimeoutError)


def _nothing() -> None:
    """No thread reads a backplane in get() without the capability "reading": nothing to interrupt."""


class Hub:
    """Publish and subscribe to topics, locally and across a sync backplane.

    ``sync`` is a driver factory such as ``cluster(channel="app")`` or
    ``broadcast_channel(channel="app")``; ``None`` keeps the hub local.
    ``on_error(exc, stage)`` observes backplane and subscriber failures, with
    stage ``"subscribe"``, ``"publish"`` or ``"delivery"``; without it they
    are logged. With a network backplane (Redis, Postgres, NATS),
    ``on_backplane(up)`` is called with ``False`` once when the backplane is
    lost and ``True`` once when it is back, and each outage is reported to
    ``on_error(exc, "subscribe")`` once. ``serializer``/``deserializer`` replace JSON for values that
    are neither ``str`` nor ``bytes``. ``max_message`` bounds one encoded
    message (``ValueError`` in ``publish`` above it), lowered to the
    backplane's own limit when it has one; ``queue_size`` bounds each queue
    subscription.
    """

    def __init__(
        self,
        sync: Optional[DriverFactory] = None,
        *,
        namespace: str = "",
        on_error: Optional[ErrorHandler] = None,
        on_backplane: Optional[Callable[[bool], Any]] = None,
        serializer: Optional[Serializer] = None,
        deserializer: Optional[Deserializer] = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        check_name("namespace", namespace)
        if not isinstance(max_message, int) or max_message < 1:
            raise ValueError("max_message must be a positive int")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError("queue_size must be a positive int")
        if on_error is not None and not callable(on_error):
            raise TypeError("on_error must be callable")
        if on_backplane is not None and not callable(on_backplane):
            raise TypeError("on_backplane must be callable")
        if sync is not None and not callable(sync):
            raise TypeError("sync must be a driver factory such as cluster(channel=...)")
        #: This hub's id: the process id, a number, and a random tag that keeps it unique across hosts.
        self.id = f"{os.getpid()}.{next(_hub_numbers)}.{_process_tag}"
        transport = cluster_transport()
        #: This hub's address: ``msg.origin`` of what it publishes, and what ``publish(..., to=)`` takes.
        self.address = Address(transport.index if transport is not None else NO_WORKER, self.id)
        self.namespace = namespace
        self.on_error = on_error
        self.on_backplane = on_backplane
        self.max_message = max_message
        self.queue_size = queue_size
        self._codec = Codec(serializer, deserializer)
        self._topics: Dict[str, Tuple[Subscription, ...]] = {}
        # Pattern subscriptions, their matchers, and what each concrete topic seen since the last change matched.
        self._patterns: Dict[str, Tuple[Subscription, ...]] = {}
        self._matchers: Dict[str, Matcher] = {}
        self._matched: Dict[str, Tuple[Subscription, ...]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._published = 0
        self._delivered = 0
        self._received = 0
        self._dropped = 0
        self._errors = 0
        self._unreachable = 0
        self._sync_live = False
        self._driver: Optional[SyncDriver] = None
        self._caps: FrozenSet[str] = frozenset()
        self._publish_parts: Optional[Callable[..., Any]] = None
        # The driver's read_until (capability "reading"): a thread waiting in get() reads the backplane itself;
        # and what tells it that its queue got a message another way.
        self._read_until: Optional[Callable[..., Any]] = None
        self._interrupt_reading: Callable[[], Any] = _nothing
        # Topics published to all before -> the driver's sender for each (capability "sender") and the topic's
        # local subscriptions: the fast path. Any change of the subscriptions empties it.
        self._senders: Dict[str, Tuple[Callable[[bytes], Any], Tuple[Subscription, ...]]] = {}
        self._has_sync = sync is not None
        self._sync_type = "local"
        if sync is not None:
            driver = sync(self.address)
            if not isinstance(driver, SyncDriver):
                raise TypeError(
                    f"the driver factory returned {type(driver).__name__}, which lacks the SyncDriver "
                    "protocol (capabilities, publish, subscribe, close): see docs/drivers.md"
                )
            self._driver = driver
            self._caps = frozenset(driver.capabilities)
            self._sync_type = str(driver.name)
            try:
                if "state" in self._caps:
                    driver.watch_state(self._on_state)  # type: ignore[attr-defined]
                # Optional fast paths, as the driver declares them: whole runs in, encoded parts out.
                if "tagged" in self._caps:
                    driver.subscribe_tagged(self._on_remote_tagged, self._on_unreachable)  # type: ignore[attr-defined]
                elif "batch" in self._caps:
                    driver.subscribe_batch(self._on_remote_batch, self._on_unreachable)  # type: ignore[attr-defined]
                else:
                    driver.subscribe(self._on_remote, self._on_unreachable)
                if "parts" in self._caps:
                    self._publish_parts = driver.publish_parts  # type: ignore[attr-defined]
                if "reading" in self._caps:
                    self._read_until = driver.read_until  # type: ignore[attr-defined]
                    self._interrupt_reading = driver.interrupt_reading  # type: ignore[attr-defined]
                if "address" in self._caps:  # the backplane says where this hub is (a bus peer's index)
                    self.address = driver.address  # type: ignore[attr-defined]
                if "limit" in self._caps:
                    # One limit: what this hub accepts, the backplane carries.
                    self.max_message = min(self.max_message, driver.max_message)  # type: ignore[attr-defined]
                self._sync_live = True
            except Exception as exc:
                self._report(exc, "subscribe")

    # -- publishing ----------------------------------------------------------

    def publish(
        self, topic: str, data: Any, *, namespace: Optional[str] = None, to: Optional[Destination] = None
    ) -> None:
        """Publish ``data`` on ``topic``.

        Local subscribers get it before this returns; other hubs on the
        backplane get it at most once, in publish order. ``data`` is ``str``,
        ``bytes`` or a value the serializer accepts (JSON by default).
        ``namespace`` sends to another namespace than the hub's own (local
        subscribers then do not get it). ``to`` sends to one hub (an
        :class:`Address`, such as ``msg.origin``) or to every hub on the
        channel in one worker (an ``int``) instead of to all; a destination
        that turns out not to exist is counted and reported to
        ``on_error(DestinationUnreachable, "publish")``. Raises
        ``TypeError``/``ValueError`` for bad arguments and ``RuntimeError``
        after :meth:`close`; never because of the backplane.
        """
        if to is None and namespace is None:
            try:
                kept = self._senders.get(topic)  # a topic published to all before (checked then)
            except TypeError:  # unhashable: the checks below say what is wrong with it
                kept = None
            if kept is not None:
                kind = type(data)
                if kind is bytes:
                    wire = _B + data
                else:
                    wire = self._codec.encode(data)
                    if kind is not str and isinstance(data, (bytearray, memoryview)):
                        data = wire[1:]  # subscribers everywhere see bytes
                if len(wire) > self.max_message:
                    self._too_big(len(wire))
                self._published += 1
                send, here = kept
                if here:
                    msg = _new_message(Message, (self.namespace, topic, data, self.address))
                    for sub in here:
                        sub._deliver(msg)
                try:
                    send(wire)
                except Exception as exc:
                    self._report(exc, "publish")
                return
        if self._closed:
            raise RuntimeError("publish() on a closed Hub")
        if type(topic) is not str or not topic.isascii() or len(topic) > MAX_NAME:
            check_name("topic", topic)
        if ("*" in topic or ">" in topic) and is_pattern(topic):
            raise ValueError(f"publish to a concrete topic, not the pattern {topic!r}: wildcards are for subscribe")
        if namespace is None:
            namespace = self.namespace
        else:
            check_name("namespace", namespace)
        local = True
        remote = True
        if to is not None:
            if isinstance(to, Address):
                local = to == self.address
                remote = not local
            elif isinstance(to, int) and not isinstance(to, bool):
                local = to == self.address.worker
            else:
                raise TypeError(f"to must be an Address or a worker index (int), not {type(to).__name__}")
        driver = self._driver
        kind = type(data)
        if kind is bytes:
            if len(data) >= self.max_message:
                self._too_big(len(data) + 1)
            wire = _B + data if driver is not None else b""
        elif kind is str and driver is None and len(data) * 4 < self.max_message and data.isascii():
            wire = b""  # local only, and valid on any backplane: nothing to encode
        else:
            wire = self._codec.encode(data)
            if len(wire) > self.max_message:
                self._too_big(len(wire))
            if kind is not str and isinstance(data, (bytearray, memoryview)):
                data = wire[1:]  # subscribers everywhere see bytes
        self._published += 1
        if local and namespace == self.namespace:
            subs = self._subs_for(topic) if self._patterns else self._topics.get(topic)
            if subs:
                msg = _new_message(Message, (namespace, topic, data, self.address))
                for sub in subs:
                    sub._deliver(msg)
        if not remote:
            return
        if driver is not None and self._sync_live:
            try:
                fast = self._publish_parts
                if fast is not None:
                    fast(namespace, topic, wire, to)
                    if to is None and namespace == self.namespace and "sender" in self._caps and topic not in self._senders:
                        self._keep_sender(topic)
                else:
                    driver.publish(Message(namespace, topic, wire, self.address), to)
            except Exception as exc:
                if isinstance(exc, DestinationUnreachable):
                    self._unreachable += exc.count
                self._report(exc, "publish")
        elif to is not None and not local:
            self._on_unreachable(to, 1)

    def _keep_sender(self, topic: str) -> None:
        """Keep the driver's sender for ``topic``: the next publish to it, to all, takes the fast path."""
        with self._lock:
            if self._closed or not self._sync_live:
                return
            senders = self._senders
            if len(senders) >= MAX_SENDERS:
                senders = self._senders = {}
            subs = self._subs_for(topic) if self._patterns else self._topics.get(topic, ())
            senders[topic] = (self._driver.sender(self.namespace, topic), subs)  # type: ignore[union-attr]

    def _too_big(self, size: int) -> None:
        raise ValueError(f"message of {size} bytes is over max_message ({self.max_message} bytes)")

    # -- subscribing -------------------------------------------------------

    def subscribe(self, topic: str, callback: Optional[Callback] = None) -> Subscription:
        """Subscribe to ``topic``, or to a pattern of topics.

        A pattern follows NATS's rules: topics are tokens split on ``.``;
        ``*`` matches exactly one token (``orders.*`` matches ``orders.new``,
        not ``orders`` or ``orders.new.eu``) and a final ``>`` one or more
        (``orders.>`` matches both). ``msg.topic`` is the concrete topic.
        With ``callback(msg)``, each message is passed to it (on the
        publishing thread for local messages, on the driver's delivery thread
        for remote ones). Without, read the returned subscription with
        ``get()``, ``for`` or ``async for``.
        """
        if self._closed:
            raise RuntimeError("subscribe() on a closed Hub")
        check_name("topic", topic)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        matcher = compile_pattern(topic) if is_pattern(topic) else None
        sub = Subscription(self, topic, callback, self.queue_size)
        with self._lock:
            table = self._topics if matcher is None else self._patterns
            first = topic not in table
            table[topic] = table.get(topic, ()) + (sub,)
            if matcher is not None:
                self._matchers[topic] = matcher
            self._matched = {}
            self._senders = {}  # they hold each topic's local subscriptions
            if first:
                self._interest(topic, True)  # under the lock: the backplane hears on and off in order
        return sub

    def _interest(self, topic: str, on: bool) -> None:
        driver = self._driver
        if driver is not None and "interest" in self._caps and self._sync_live:
            try:
                driver.interest(topic, on)  # type: ignore[attr-defined]
            except Exception as exc:
                self._report(exc, "subscribe")

    def _subs_for(self, topic: str) -> Tuple[Subscription, ...]:
        """The subscriptions a concrete ``topic`` reaches: its own, then the patterns' that match it."""
        cache = self._matched  # a change replaces the dict: a result computed before it lands in the old one
        subs = cache.get(topic)
        if subs is None:
            subs = self._topics.get(topic, ())
            matchers = self._matchers
            for pattern, psubs in list(self._patterns.items()):
                matcher = matchers.get(pattern)
                if matcher is not None and matcher(topic):
                    subs = subs + psubs
            if len(cache) >= 4096:
                cache.clear()
            cache[topic] = subs
        return subs

    # -- presence --------------------------------------------------------------

    def advertise(self, entry: str, on: bool = True) -> None:
        """Add (or, ``on=False``, withdraw) ``entry`` in the backplane's presence table, as this hub's.

        Every hub on the channel that watches the table sees it come, and go
        when this hub closes or its worker dies. Needs a driver with the
        ``"presence"`` capability (``cluster``, ``broadcast_channel``).
        """
        check_name("entry", entry)
        self._presence().advertise(entry, on)

    def watch_adverts(self, fn: Callable[[Address, str, bool], Any]) -> Callable[[], None]:
        """Call ``fn(address, entry, present)`` for every entry in the table now, then for every change.

        Returns the function that stops it. ``fn`` runs on the driver's thread.
        """
        if not callable(fn):
            raise TypeError("fn must be callable")
        unwatch: Callable[[], None] = self._presence().watch(fn)
        return unwatch

    def sync_adverts(self, timeout: Optional[float] = None) -> bool:
        """Wait until every advert change the backplane had seen when called has reached this hub's watchers.

        With ``cluster``, a round trip to the primary: whatever another worker
        advertised before it told you so (through any channel) is then known here.
        """
        return bool(self._presence().sync_presence(timeout))

    def _presence(self) -> Any:
        if self._closed:
            raise RuntimeError("a closed Hub has no presence table")
        if "presence" not in self._caps or self._driver is None or not self._sync_live:
            raise RuntimeError(
                f"this hub's backplane ({self._sync_type}) has no presence table: use cluster() or broadcast_channel()"
            )
        return self._driver

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            table = self._patterns if sub.topic in self._patterns else self._topics
            subs = tuple(s for s in table.get(sub.topic, ()) if s is not sub)
            if subs:
                table[sub.topic] = subs
            elif sub.topic in table:
                del table[sub.topic]
                if table is self._patterns:
                    self._matchers.pop(sub.topic, None)
                if not self._closed:
                    self._interest(sub.topic, False)
            self._matched = {}
            self._senders = {}

    # -- from the backplane --------------------------------------------------

    def _on_remote(self, msg: Message) -> None:
        """A per-message driver's ``deliver``: fan a remote message out to local subscribers."""
        self._on_remote_batch(msg.namespace, msg.topic, msg.origin, [msg.data])

    def _on_remote_batch(self, namespace: str, topic: str, origin: Address, datas: List[bytes]) -> None:
        """A batch-aware driver's deliver: many messages of one origin and topic."""
        if self._closed or namespace != self.namespace or origin == self.address:
            return
        tags = b"".join(map(_tag_of, datas))
        if len(tags) != len(datas):  # an empty payload has no tag: 0, which the codec does not use
            tags = bytes(d[0] if d else 0 for d in datas)
        self._from_remote(namespace, topic, origin, tags, list(map(_after_tag, datas)))

    def _on_remote_tagged(self, namespace: str, topic: str, origin: Address, tags: bytes, values: List[bytes]) -> None:
        """A ``"tagged"`` driver's deliver: a run with each payload's tag byte split off."""
        if self._closed or namespace != self.namespace or origin == self.address:
            return
        self._from_remote(namespace, topic, origin, tags, values)

    def _from_remote(self, namespace: str, topic: str, origin: Address, tags: bytes, values: List[bytes]) -> None:
        """Decode a run from another hub and hand it to the topic's subscribers."""
        self._received += len(values)
        subs = self._subs_for(topic) if self._patterns else self._topics.get(topic)
        if not subs:
            return
        n = len(values)
        decoded: Optional[List[Any]] = None
        if tags.count(_B) == n:  # every one bytes, or every one str: the run is decoded in C loops
            decoded = values
        elif tags.count(_S) == n:
            try:
                decoded = list(map(str, values, repeat("utf-8")))
            except UnicodeDecodeError:  # one is not UTF-8: the loop below reports it and keeps the others
                decoded = None
        if decoded is not None:
            msgs = list(map(_new_message, repeat(Message), zip(repeat(namespace), repeat(topic), decoded, repeat(origin))))
        else:
            msgs = self._decode_each(namespace, topic, origin, tags, values)
        if len(subs) == 1:
            subs[0]._deliver_many(msgs)
        else:  # message by message, as local delivery does: each message reaches every subscriber first
            for msg in msgs:
                for sub in subs:
                    sub._deliver(msg)

    def _decode_each(
        self, namespace: str, topic: str, origin: Address, tags: bytes, values: List[bytes]
    ) -> List[Message]:
        """Decode messages one by one; report (stage ``"delivery"``) and skip those that do not decode."""
        deserialize = self._codec.deserializer
        msgs = []
        for tag, data in zip(tags, values):
            value: Any
            try:
                if tag == TAG_BYTES:
                    value = data
                elif tag == TAG_STR:
                    value = data.decode("utf-8")
                elif tag == TAG_VALUE:
                    value = deserialize(data)
                else:
                    raise ValueError(f"unknown payload tag {tag!r}")
            except Exception as exc:
                self._report(exc, "delivery")
                continue
            msgs.append(_new_message(Message, (namespace, topic, value, origin)))
        return msgs

    def _on_state(self, up: bool, exc: Optional[BaseException]) -> None:
        """The driver says the backplane was lost (with its cause) or is back: once each, never per message."""
        if not up and exc is not None:
            self._report(exc, "subscribe")
        fn = self.on_backplane
        if fn is None and up:
            logger.warning("hub %s: the %s backplane is back", self.address, self._sync_type)
        if fn is not None:
            try:
                fn(up)
            except Exception:
                logger.exception("on_backplane raised")

    def _on_unreachable(self, destination: Destination, count: int) -> None:
        """The driver says ``count`` addressed messages found no such hub or worker."""
        self._unreachable += count
        self._report(DestinationUnreachable(destination, count), "publish")

    # -- errors --------------------------------------------------------------

    def report(self, exc: BaseException, stage: str) -> None:
        """Report a failure as the hub reports its own: to ``on_error(exc, stage)``, else to the log (rate-limited).

        For layers built on the hub (synced events, services) that decode
        what it delivers. ``stage`` is one of ``"subscribe"``, ``"publish"``
        and ``"delivery"``; it is counted in ``stats()["errors"]``.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        self._report(exc, stage)

    def _report(self, exc: BaseException, stage: str) -> None:
        self._errors += 1
        handler = self.on_error
        if handler is not None:
            try:
                handler(exc, stage)
                return
            except Exception:
                logger.exception("on_error raised while handling a %s error", stage)
        _ratelimited(
            (stage, type(exc)),  # one budget for all hubs: a key per hub would grow with the hubs
            logging.ERROR,
            "hub %s: %s error: %s",
            self.id,
            stage,
            exc,
            exc_info=None if isinstance(exc, _EXPECTED) else (type(exc), exc, exc.__traceback__),
        )

    def read_on_loop(self) -> bool:
        """Read this process's backplane on the running event loop from now on; call it on that loop.

        With the ``cluster`` driver, the worker's pipe is then read by the
        loop itself: ``async for msg in sub`` gets each message with no
        hand-off from another thread, and every callback subscription of
        every hub in the worker runs on the loop (so it must not block it).
        It lasts until this hub closes or the loop does. Returns False, and
        changes nothing, when the backplane has no such mode (every other
        driver, or a hub without one): delivery stays on the driver's thread.
        Raises ``RuntimeError`` outside a running loop, or while another
        loop of this process reads the pipe.
        """
        loop = asyncio.get_running_loop()  # RuntimeError: no running event loop
        driver = self._driver
        if driver is None or "reading" not in self._caps or not self._sync_live:
            return False
        driver.read_on_loop(loop)  # type: ignore[attr-defined]
        return True

    # -- state -------------------------------------------------------------

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait until the backplane subscription is live; True if it is.

        A hub without a backplane is ready at once; one whose driver failed to
        subscribe returns False at once.
        """
        if not self._has_sync:
            return not self._closed
        if not self._sync_live:
            return False
        if "ready" not in self._caps:
            return True
        return bool(self._driver.wait_ready(timeout))  # type: ignore[union-attr]

    @property
    def sync_type(self) -> str:
        """The backplane's name: ``"cluster"``, ``"broadcast_channel"``, ...; ``"local"`` without one."""
        return self._sync_type

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def stats(self) -> Dict[str, Any]:
        """Counters: published, delivered, received, dropped, errors, subscriptions, and the driver's."""
        out: Dict[str, Any] = {
            "id": self.id,
            "address": str(self.address),
            "namespace": self.namespace,
            "published": self._published,
            "delivered": self._delivered,
            "received": self._received,
            "dropped": self._dropped,
            "errors": self._errors,
            "unreachable": self._unreachable,
            "subscriptions": sum(len(s) for s in self._topics.values()) + sum(len(s) for s in self._patterns.values()),
            "backplane": self._sync_live,
        }
        if "stats" in self._caps and self._driver is not None:
            try:
                out["driver"] = self._driver.stats()  # type: ignore[attr-defined]
            except Exception as exc:  # a custom driver's stats must not break ours
                out["driver"] = {"error": repr(exc)}
        return out

    def close(self) -> None:
        """Close every subscription and the driver. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._senders = {}  # first: the fast path checks nothing else
            topics, self._topics = self._topics, {}
            patterns, self._patterns = self._patterns, {}
            self._matchers, self._matched = {}, {}
        for subs in list(topics.values()) + list(patterns.values()):
            for sub in subs:
                sub._close()
        driver, self._driver = self._driver, None
        self._sync_live = False
        self._publish_parts = None
        self._read_until = None
        if driver is not None:
            try:
                driver.close()
            except Exception:
                logger.exception("hub %s: the sync driver failed to close", self.address)

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hub id={self.id} namespace={self.namespace!r} {'closed' if self._closed else 'open'}>"
