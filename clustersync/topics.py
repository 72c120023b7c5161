"""Subscriptions: how a hub hands messages to its subscribers.

A :class:`Subscription` with a callback calls it on the delivering thread;
one without queues messages in a bounded queue (the shared
:class:`~clustersync.message.BoundedQueue`, oldest dropped and counted) for
``get()``, ``for`` and ``async for``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from threading import get_ident
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, List, Optional, Sequence, Tuple

from ._log import RateLimitedLog
from .message import BoundedQueue, Matcher, Message, compile_pattern, is_pattern

if TYPE_CHECKING:  # pragma: no cover
    from .hub import Hub

__all__ = ["Subscription", "SubscriptionClosed", "Callback", "is_pattern", "compile_pattern", "Matcher"]  # the last three from message

Callback = Callable[[Message], Any]
_ratelimited = RateLimitedLog()


class SubscriptionClosed(RuntimeError):
    """Raised by :meth:`Subscription.get` once the subscription is closed and drained."""


class Subscription:
    """A hub's subscription to one topic, or to a pattern of topics (``orders.*``, ``orders.>``).

    With a callback, messages are handed to it on the delivering thread.
    Without one, they wait in a bounded queue (oldest dropped on overflow)
    for :meth:`get`, ``for msg in sub`` or ``async for msg in sub``.
    """

    __slots__ = ("hub", "topic", "callback", "maxsize", "_queue", "_closed", "_waiters", "_active", "_idle", "_readers")

    def __init__(self, hub: "Hub", topic: str, callback: Optional[Callback], maxsize: int) -> None:
        self.hub = hub
        self.topic = topic
        self.callback = callback
        self.maxsize = maxsize
        self._queue: BoundedQueue[Message] = BoundedQueue(maxsize, self._overflow)
        self._closed = False
        self._waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []
        # Callbacks: the threads delivering right now (see _deliver), and what wakes unsubscribe().
        self._active: List[int] = []
        self._idle = threading.Event()
        # Threads in get() reading the backplane themselves (capability "reading"): a message that reaches
        # the queue another way, or a close, must interrupt the one that polls.
        self._readers: List[int] = []

    @property
    def closed(self) -> bool:
        """True once :meth:`unsubscribe` ran (or the hub closed)."""
        return self._closed

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue was full."""
        return self._queue.dropped

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription topic={self.topic!r} {state} queued={len(self._queue)}>"

    # -- delivery (called by the hub) -------------------------------------

    # No callback starts after unsubscribe() returns. A delivering thread first
    # puts its id in ``_active``, then checks ``_closed``; unsubscribe() first sets
    # ``_closed``, then waits until ``_active`` holds no other thread. Under the GIL
    # each step is atomic and seen in order, so either unsubscribe() sees the
    # delivery and waits for it, or the delivery sees ``_closed`` and skips.

    def _deliver(self, msg: Message) -> None:
        callback = self.callback
        if callback is None:
            self._enqueue((msg,))
            return
        me = get_ident()
        active = self._active
        active.append(me)
        try:
            if self._closed:
                return
            try:
                callback(msg)
            except Exception as exc:
                self.hub._report(exc, "delivery")
            else:
                self.hub._delivered += 1
        finally:
            active.remove(me)
            if self._closed:
                self._idle.set()

    def _deliver_many(self, msgs: Sequence[Message]) -> None:
        callback = self.callback
        if callback is None:
            self._enqueue(msgs)
            return
        me = get_ident()
        active = self._active
        active.append(me)
        hub = self.hub
        delivered = 0
        try:
            for msg in msgs:
                if self._closed:
                    break
                try:
                    callback(msg)
                except Exception as exc:
                    hub._report(exc, "delivery")
                else:
                    delivered += 1
        finally:
            hub._delivered += delivered
            active.remove(me)
            if self._closed:
                self._idle.set()

    def _enqueue(self, msgs: Sequence[Message]) -> None:
        queue = self._queue
        if queue.closed:
            return
        queue.put_many(msgs)
        self.hub._delivered += len(msgs)
        readers = self._readers
        if readers and (len(readers) > 1 or readers[0] != get_ident()):  # not the reader delivering to itself
            self.hub._interrupt_reading()
        if self._waiters:
            with queue.cond:
                self._wake_async()

    def _overflow(self, count: int) -> None:
        self.hub._dropped += count
        _ratelimited(
            ("queue", id(self)),
            logging.WARNING,
            "subscription to %r is full (%d messages): dropped the oldest, %d so far",
            self.topic,
            self.maxsize,
            self._queue.dropped,
        )

    def _wake_async(self) -> None:
        waiters, self._waiters = self._waiters, []
        try:
            running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, fut in waiters:
            if loop is running:  # delivered on that loop (Hub.read_on_loop): no wake-up through its self-pipe
                _resolve(fut)
                continue
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
        queue = self._queue
        read = self.hub._read_until
        wait = timeout  # what is left of it for the queue, once this thread has read
        if read is not None and not queue.ready():
            # Read the backplane on this thread (capability "reading"): the message comes with no hand-off.
            deadline = None if timeout is None else time.monotonic() + timeout
            me = get_ident()
            readers = self._readers
            readers.append(me)  # list.append and .remove are atomic: no lock
            try:
                read(queue.ready, timeout, queue.cond)
            finally:
                readers.remove(me)
            if deadline is not None:
                wait = max(0.0, deadline - time.monotonic())
        try:
            return queue.get(wait)
        except TimeoutError:
            raise TimeoutError(f"no message on {self.topic!r} within {timeout} s") from None
        except EOFError:
            raise SubscriptionClosed(f"subscription to {self.topic!r} is closed") from None

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
        queue = self._queue
        while True:
            with queue.cond:
                msg = queue.get_nowait_locked()
                if msg is not None:
                    return msg
                if queue.closed:
                    raise StopAsyncIteration
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await fut
            finally:
                with queue.cond:
                    try:
                        self._waiters.remove((loop, fut))
                    except ValueError:
                        pass

    def qsize(self) -> int:
        """Messages waiting in the queue."""
        return len(self._queue)

    # -- closing -----------------------------------------------------------

    def unsubscribe(self) -> None:
        """Stop receiving: no callback of this subscription starts after this returns.

        Waits for callbacks in progress on other threads to return (a
        callback may unsubscribe its own subscription). Queued messages can
        still be read; safe to call twice.
        """
        if self._closed:
            return
        self.hub._remove(self)
        self._close()

    def _close(self) -> None:
        me = get_ident()
        self._closed = True
        while any(t != me for t in list(self._active)):  # a delivery in progress on another thread
            self._idle.wait(0.05)
            self._idle.clear()
        queue = self._queue
        queue.close()
        if self._readers:
            self.hub._interrupt_reading()
        with queue.cond:
            self._wake_async()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


def _resolve(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)
