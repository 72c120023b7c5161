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
from collections import deque
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Tuple,
)

from ._log import RateLimitedLog, logger
from .codec import TAG_BYTES, TAG_STR, TAG_VALUE, Codec, Deserializer, Serializer

__all__ = ["Hub", "Message", "Subscription", "SubscriptionClosed"]

DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 10_000
STAGES = ("subscribe", "publish", "delivery")

_hub_numbers = itertools.count(1)
_B = b"b"
_ratelimited = RateLimitedLog()


class Message(NamedTuple):
    """One published message.

    Subscribers see ``data`` as the value that was published. Inside a sync
    driver, ``data`` is the encoded payload (``bytes``) that the driver moves
    as it is.
    """

    namespace: str
    topic: str
    data: Any
    origin: str = ""


_new_message = tuple.__new__  # Message(...) without the Python-level __new__, on hot paths

ErrorHandler = Callable[[BaseException, str], Any]
Callback = Callable[[Message], Any]


class SubscriptionClosed(RuntimeError):
    """Raised by :meth:`Subscription.get` once the subscription is closed and drained."""


class Subscription:
    """A hub's subscription to one topic.

    With a callback, messages are handed to it on the delivering thread.
    Without one, they wait in a bounded queue (oldest dropped on overflow)
    for :meth:`get`, ``for msg in sub`` or ``async for msg in sub``.
    """

    __slots__ = (
        "hub",
        "topic",
        "callback",
        "maxsize",
        "dropped",
        "_queue",
        "_cond",
        "_closed",
        "_waiters",
    )

    def __init__(self, hub: "Hub", topic: str, callback: Optional[Callback], maxsize: int) -> None:
        self.hub = hub
        self.topic = topic
        self.callback = callback
        self.maxsize = maxsize
        #: Messages dropped because the queue was full.
        self.dropped = 0
        self._queue: Deque[Message] = deque(maxlen=maxsize)
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []

    @property
    def closed(self) -> bool:
        """True once :meth:`unsubscribe` ran (or the hub closed)."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription topic={self.topic!r} {state} queued={len(self._queue)}>"

    # -- delivery (called by the hub) -------------------------------------

    def _deliver(self, msg: Message) -> None:
        callback = self.callback
        hub = self.hub
        if callback is not None:
            try:
                callback(msg)
            except Exception as exc:
                hub._report(exc, "delivery")
            else:
                hub._delivered += 1
            return
        self._enqueue((msg,))

    def _deliver_many(self, msgs: List[Message]) -> None:
        callback = self.callback
        if callback is None:
            self._enqueue(msgs)
            return
        hub = self.hub
        failed = 0
        for msg in msgs:
            try:
                callback(msg)
            except Exception as exc:
                failed += 1
                hub._report(exc, "delivery")
        hub._delivered += len(msgs) - failed

    def _enqueue(self, msgs: "Tuple[Message, ...] | List[Message]") -> None:
        with self._cond:
            if self._closed:
                return
            queue = self._queue
            overflow = len(queue) + len(msgs) - self.maxsize
            queue.extend(msgs)  # a deque with maxlen: the oldest fall out
            self.hub._delivered += len(msgs)
            if overflow > 0:
                self._overflow(overflow)
            self._cond.notify()
            if self._waiters:
                self._wake_async()

    def _overflow(self, count: int) -> None:
        self.dropped += count
        self.hub._dropped += count
        _ratelimited(
            ("queue", id(self)),
            logging.WARNING,
            "subscription to %r is full (%d messages): dropped the oldest, %d so far",
            self.topic,
            self.maxsize,
            self.dropped,
        )

    def _wake_async(self) -> None:
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that event loop is closed
                pass

    # -- consuming ---------------------------------------------------------

    def get(self, timeout: Optional[float] = None) -> Message:
        """Return the next message, waiting up to ``timeout`` seconds (None: forever).

        Raises ``TimeoutError`` when the time runs out and
        :class:`SubscriptionClosed` once the subscription is closed and empty.
        """
        if self.callback is not None:
            raise RuntimeError("this subscription has a callback; get() is for queue subscriptions")
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._closed, timeout):
                raise TimeoutError(f"no message on {self.topic!r} within {timeout} s")
            if self._queue:
                return self._queue.popleft()
            raise SubscriptionClosed(f"subscription to {self.topic!r} is closed")

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        try:
            return self.get()
        except SubscriptionClosed:
            raise StopIteration from None

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        if self.callback is not None:
            raise RuntimeError("this subscription has a callback; async for is for queue subscriptions")
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._queue:
                    return self._queue.popleft()
                if self._closed:
                    raise StopAsyncIteration
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await fut
            finally:
                with self._cond:
                    try:
                        self._waiters.remove((loop, fut))
                    except ValueError:
                        pass

    def qsize(self) -> int:
        """Messages waiting in the queue."""
        return len(self._queue)

    # -- closing -----------------------------------------------------------

    def unsubscribe(self) -> None:
        """Stop receiving. Queued messages can still be read; safe to call twice."""
        if self._closed:
            return
        self.hub._remove(self)
        self._close()

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_async()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


def _resolve(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


class Hub:
    """Publish and subscribe to topics, locally and across a sync backplane.

    ``sync`` is a driver factory such as ``cluster(channel="app")`` or
    ``broadcast_channel(channel="app")``; ``None`` keeps the hub local.
    ``on_error(exc, stage)`` observes backplane and subscriber failures, with
    stage ``"subscribe"``, ``"publish"`` or ``"delivery"``; without it they
    are logged. ``serializer``/``deserializer`` replace JSON for values that
    are neither ``str`` nor ``bytes``. ``max_message`` bounds one encoded
    message (``ValueError`` in ``publish`` above it); ``queue_size`` bounds
    each queue subscription.
    """

    def __init__(
        self,
        sync: Optional[Callable[[str], Any]] = None,
        *,
        namespace: str = "",
        on_error: Optional[ErrorHandler] = None,
        serializer: Optional[Serializer] = None,
        deserializer: Optional[Deserializer] = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
        if not isinstance(max_message, int) or max_message < 1:
            raise ValueError("max_message must be a positive int")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError("queue_size must be a positive int")
        if on_error is not None and not callable(on_error):
            raise TypeError("on_error must be callable")
        #: This hub's id, unique among the hubs of a host; ``Message.origin`` of what it publishes.
        self.id = f"{os.getpid()}.{next(_hub_numbers)}"
        self.namespace = namespace
        self.on_error = on_error
        self.max_message = max_message
        self.queue_size = queue_size
        self._codec = Codec(serializer, deserializer)
        self._topics: Dict[str, Tuple[Subscription, ...]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._published = 0
        self._delivered = 0
        self._received = 0
        self._dropped = 0
        self._errors = 0
        self._sync_live = False
        self._driver: Any = None
        self._publish_parts: Optional[Callable[[str, str, bytes], Any]] = None
        self._has_sync = sync is not None
        if sync is not None:
            try:
                driver = self._driver = sync(self.id)
                # Optional fast paths: whole runs in, encoded parts out, no Message in between.
                if hasattr(driver, "subscribe_batch"):
                    driver.subscribe_batch(self._on_remote_batch)
                else:
                    driver.subscribe(self._on_remote)
                self._publish_parts = getattr(driver, "publish_parts", None)
                self._sync_live = True
            except Exception as exc:
                self._report(exc, "subscribe")

    # -- publishing ----------------------------------------------------------

    def publish(self, topic: str, data: Any, *, namespace: Optional[str] = None) -> None:
        """Publish ``data`` on ``topic``.

        Local subscribers get it before this returns; other hubs on the
        backplane get it at most once, in publish order. ``data`` is ``str``,
        ``bytes`` or a value the serializer accepts (JSON by default).
        ``namespace`` sends to another namespace than the hub's own (local
        subscribers then do not get it). Raises ``TypeError``/``ValueError``
        for bad arguments and ``RuntimeError`` after :meth:`close`; never
        because of the backplane.
        """
        if self._closed:
            raise RuntimeError("publish() on a closed Hub")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, not {type(topic).__name__}")
        if namespace is None:
            namespace = self.namespace
        elif not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
        driver = self._driver
        kind = type(data)
        if kind is bytes:
            if len(data) >= self.max_message:
                self._too_big(len(data) + 1)
            wire = _B + data if driver is not None else b""
        elif kind is str and driver is None and len(data) * 4 < self.max_message:
            wire = b""  # local only: nothing to encode
        else:
            wire = self._codec.encode(data)
            if len(wire) > self.max_message:
                self._too_big(len(wire))
            if kind is not str and isinstance(data, (bytearray, memoryview)):
                data = wire[1:]  # subscribers everywhere see bytes
        self._published += 1
        if namespace == self.namespace:
            subs = self._topics.get(topic)
            if subs:
                msg = _new_message(Message, (namespace, topic, data, self.id))
                for sub in subs:
                    sub._deliver(msg)
        if driver is not None and self._sync_live:
            try:
                fast = self._publish_parts
                if fast is not None:
                    fast(namespace, topic, wire)
                else:
                    driver.publish(Message(namespace, topic, wire, self.id))
            except Exception as exc:
                self._report(exc, "publish")

    def _too_big(self, size: int) -> None:
        raise ValueError(f"message of {size} bytes is over max_message ({self.max_message} bytes)")

    # -- subscribing -------------------------------------------------------

    def subscribe(self, topic: str, callback: Optional[Callback] = None) -> Subscription:
        """Subscribe to ``topic``.

        With ``callback(msg)``, each message is passed to it (on the
        publishing thread for local messages, on the driver's delivery thread
        for remote ones). Without, read the returned subscription with
        ``get()``, ``for`` or ``async for``.
        """
        if self._closed:
            raise RuntimeError("subscribe() on a closed Hub")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, not {type(topic).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        sub = Subscription(self, topic, callback, self.queue_size)
        with self._lock:
            self._topics[topic] = self._topics.get(topic, ()) + (sub,)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            subs = tuple(s for s in self._topics.get(sub.topic, ()) if s is not sub)
            if subs:
                self._topics[sub.topic] = subs
            else:
                self._topics.pop(sub.topic, None)

    # -- from the backplane --------------------------------------------------

    def _on_remote(self, msg: Message) -> None:
        """The driver's ``deliver``: fan a remote message out to local subscribers."""
        if self._closed or msg.namespace != self.namespace or msg.origin == self.id:
            return
        self._received += 1
        subs = self._topics.get(msg.topic)
        if not subs:
            return
        try:
            value = self._codec.decode(msg.data)
        except Exception as exc:
            self._report(exc, "delivery")
            return
        out = Message(msg.namespace, msg.topic, value, msg.origin)
        for sub in subs:
            sub._deliver(out)

    def _on_remote_batch(self, namespace: str, topic: str, origin: str, datas: List[bytes]) -> None:
        """A batch-aware driver's deliver: many messages of one origin and topic."""
        if self._closed or namespace != self.namespace or origin == self.id:
            return
        self._received += len(datas)
        subs = self._topics.get(topic)
        if not subs:
            return
        deserialize = self._codec.deserializer
        msgs = []
        for data in datas:
            value: Any
            try:
                tag = data[0]
                if tag == TAG_BYTES:
                    value = data[1:]
                elif tag == TAG_STR:
                    value = data[1:].decode("utf-8")
                elif tag == TAG_VALUE:
                    value = deserialize(data[1:])
                else:
                    raise ValueError(f"unknown payload tag {tag!r}")
            except Exception as exc:
                self._report(exc, "delivery")
                continue
            msgs.append(_new_message(Message, (namespace, topic, value, origin)))
        if len(subs) == 1:
            subs[0]._deliver_many(msgs)
        else:  # message by message, as local delivery does: each message reaches every subscriber first
            for msg in msgs:
                for sub in subs:
                    sub._deliver(msg)

    # -- errors --------------------------------------------------------------

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
            ("hub", self.id, stage, type(exc)),
            logging.ERROR,
            "hub %s: %s error: %s",
            self.id,
            stage,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
        )

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
        waiter = getattr(self._driver, "wait_ready", None)
        if waiter is None:
            return True
        return bool(waiter(timeout))

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def stats(self) -> Dict[str, Any]:
        """Counters: published, delivered, received, dropped, errors, subscriptions, and the driver's."""
        out: Dict[str, Any] = {
            "id": self.id,
            "namespace": self.namespace,
            "published": self._published,
            "delivered": self._delivered,
            "received": self._received,
            "dropped": self._dropped,
            "errors": self._errors,
            "subscriptions": sum(len(s) for s in self._topics.values()),
            "backplane": self._sync_live,
        }
        driver_stats = getattr(self._driver, "stats", None)
        if driver_stats is not None:
            try:
                out["driver"] = driver_stats()
            except Exception as exc:  # a custom driver's stats must not break ours
                out["driver"] = {"error": repr(exc)}
        return out

    def close(self) -> None:
        """Close every subscription and the driver. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            topics, self._topics = self._topics, {}
        for subs in topics.values():
            for sub in subs:
                sub._close()
        driver, self._driver = self._driver, None
        self._sync_live = False
        self._publish_parts = None
        if driver is not None:
            close = getattr(driver, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    logger.exception("hub %s: the sync driver failed to close", self.id)

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hub id={self.id} namespace={self.namespace!r} {'closed' if self._closed else 'open'}>"
