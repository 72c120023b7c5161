"""Values every layer shares: ``Message``, ``Address``, the limits, and one bounded queue.

This module imports nothing of clustersync's; everything else may import it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, Generic, List, NamedTuple, Optional, Sequence, TypeVar, Union

__all__ = [
    "Message",
    "Address",
    "Destination",
    "DestinationUnreachable",
    "BoundedQueue",
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_QUEUE_SIZE",
    "MAX_NAME",
    "MAX_CHANNEL",
    "NO_WORKER",
    "UPLINK_WORKER",
    "check_channel",
    "check_name",
    "is_pattern",
    "compile_pattern",
    "Matcher",
    "delivering",
    "delivering_on",
]

#: The largest encoded message (tag byte and payload) a hub accepts by default.
DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024
#: Each queue subscription (and each in-process driver queue) holds at most this many messages by default.
DEFAULT_QUEUE_SIZE = 10_000
#: A topic or namespace is at most this many bytes in UTF-8.
MAX_NAME = 65_535
#: A channel name is at most this many bytes in UTF-8.
MAX_CHANNEL = 255
#: ``Address.worker`` of a hub that does not run in a worker of a primary.
NO_WORKER = -1
#: ``Address.worker`` of a hub on another host, as a host's uplink presents it (``hub`` is then ``"<worker>/<hub id>"``).
UPLINK_WORKER = 0xFFFD


class Address(NamedTuple):
    """Where a hub is: the ``worker`` index it runs in (``-1`` outside a worker) and its ``hub`` id.

    Hashable, comparable and printable (``w2/4133.1``). ``msg.origin`` is the
    publishing hub's address, so ``hub.publish(topic, data, to=msg.origin)``
    answers that hub alone. The relay stamps the worker part itself, so a
    worker cannot publish under another worker's address.
    """

    worker: int
    hub: str

    def __str__(self) -> str:
        where = "main" if self.worker == NO_WORKER else "remote" if self.worker == UPLINK_WORKER else f"w{self.worker}"
        return f"{where}/{self.hub}"


#: What ``publish(..., to=)`` takes: one hub's ``Address``, or a worker index (every hub on the channel there).
Destination = Union[Address, int]


class Message(NamedTuple):
    """One published message.

    Subscribers see ``data`` as the value that was published and ``origin`` as
    the publishing hub's :class:`Address`. Inside a sync driver, ``data`` is the
    encoded payload (``bytes``) that the driver moves as it is.
    """

    namespace: str
    topic: str
    data: Any
    origin: Address = Address(NO_WORKER, "")


class DestinationUnreachable(LookupError):
    """Messages published with ``to=`` that found no such hub or worker on the channel.

    Passed to ``on_error(exc, "publish")``, never raised by ``publish``:
    ``destination`` is the ``Address`` or worker index, ``count`` how many
    messages were lost.
    """

    def __init__(self, destination: Destination, count: int = 1) -> None:
        super().__init__(f"{count} message(s) for {destination} found no such hub or worker on the channel")
        self.destination = destination
        self.count = count


T = TypeVar("T")


_delivery = threading.local()


def delivering() -> bool:
    """True on a thread that is handing messages to hubs right now (inside a subscriber's callback).

    A blocking call made there that waits for a message could only be answered
    by the same thread: callers refuse it (see ``Services.call``).
    """
    return bool(getattr(_delivery, "on", False))


def delivering_on(on: bool) -> None:
    """Mark (or unmark) the current thread as delivering (drivers do, around a delivery on a thread they
    do not own: a thread waiting in ``get()``, an event loop)."""
    _delivery.on = on


class BoundedQueue(Generic[T]):
    """A thread-safe FIFO of at most ``maxsize`` items; on overflow the oldest are dropped and counted.

    ``on_drop(count)`` (optional) is called, with the lock held, each time
    items fall out. ``get`` waits on a condition with a deadline.
    """

    __slots__ = ("maxsize", "dropped", "on_drop", "_items", "cond", "closed")

    def __init__(self, maxsize: int, on_drop: Optional[Callable[[int], Any]] = None) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError("maxsize must be a positive int")
        self.maxsize = maxsize
        #: Items dropped because the queue was full.
        self.dropped = 0
        self.on_drop = on_drop
        self._items: Deque[T] = deque(maxlen=maxsize)
        self.cond = threading.Condition(threading.Lock())
        self.closed = False

    def put_many(self, items: Sequence[T]) -> int:
        """Append ``items``; return how many old ones fell out (0 if closed: nothing is added)."""
        with self.cond:
            if self.closed:
                return 0
            q = self._items
            overflow = len(q) + len(items) - self.maxsize
            q.extend(items)  # a deque with maxlen: the oldest fall out
            if overflow > 0:
                self.dropped += overflow
                if self.on_drop is not None:
                    self.on_drop(overflow)
            else:
                overflow = 0
            self.cond.notify()
            return overflow

    def put(self, item: T) -> int:
        """Append one item; return how many old ones fell out (0 or 1)."""
        with self.cond:
            if self.closed:
                return 0
            q = self._items
            full = len(q) == self.maxsize
            q.append(item)
            if full:
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop(1)
            self.cond.notify()
            return 1 if full else 0

    def take_all(self, timeout: Optional[float] = None) -> List[T]:
        """Wait up to ``timeout`` for items, then return and remove all of them ([] if closed or none)."""
        with self.cond:
            if not self._items and not self.closed:
                self.cond.wait_for(lambda: self._items or self.closed, timeout)
            items = list(self._items)
            self._items.clear()
            return items

    def get(self, timeout: Optional[float] = None) -> T:
        """Remove and return the oldest item, waiting up to ``timeout``.

        Raises ``TimeoutError`` when the time runs out, ``EOFError`` once closed and empty.
        """
        with self.cond:
            if self._items:  # the common case, without building the predicate
                return self._items.popleft()
            if not self.cond.wait_for(lambda: self._items or self.closed, timeout):
                raise TimeoutError("no item within the timeout")
            if self._items:
                return self._items.popleft()
            raise EOFError("the queue is closed")

    def ready(self) -> bool:
        """Would :meth:`get` return at once (an item waits, or the queue is closed)?"""
        return bool(self._items) or self.closed

    def get_nowait_locked(self) -> Optional[T]:
        """With :attr:`cond` held: the oldest item, or None if there is none."""
        return self._items.popleft() if self._items else None

    def close(self, clear: bool = False) -> None:
        """No more items go in; waiters wake. ``clear``: drop what is queued."""
        with self.cond:
            self.closed = True
            if clear:
                self._items.clear()
            self.cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a str of at most :data:`MAX_NAME` UTF-8 bytes; else raise."""
    if type(value) is not str:
        raise TypeError(f"{kind} must be a str, not {type(value).__name__}")
    if len(value) * 3 > MAX_NAME or not value.isascii():
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"{kind} is not valid Unicode text (a lone surrogate?)") from None
        if size > MAX_NAME:
            raise ValueError(f"{kind} is {size} bytes in UTF-8; the most is {MAX_NAME}")
    return value


def check_channel(channel: object) -> str:
    """Return ``channel`` if it is a non-empty str of at most 255 UTF-8 bytes, else raise ``ValueError``."""
    if not isinstance(channel, str):
        raise ValueError(f"channel must be a non-empty str naming the cluster, not {type(channel).__name__}")
    if not channel:
        raise ValueError("channel must be a non-empty str naming the cluster")
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("channel is not valid Unicode text") from None
    if size > MAX_CHANNEL:
        raise ValueError(f"channel must be at most {MAX_CHANNEL} bytes in UTF-8")
    return channel


#: ``match(topic) -> bool`` for one pattern.
Matcher = Callable[[str], bool]


def is_pattern(topic: str) -> bool:
    """True if ``topic`` has a wildcard token: ``*`` (one token) or ``>`` (one or more, last only)."""
    return ("*" in topic or ">" in topic) and any(t == "*" or t == ">" for t in topic.split("."))


def compile_pattern(pattern: str) -> Matcher:
    """A matcher for ``pattern``, NATS's rules: tokens split on ``.``, ``*`` matches exactly one token,
    a final ``>`` one or more. Raises ``ValueError`` for a ``>`` that is not the last token."""
    tokens = pattern.split(".")
    if ">" in tokens[:-1]:
        raise ValueError(f"in the pattern {pattern!r}, '>' may only be the last token")
    tail = tokens[-1] == ">"
    if tail:
        tokens = tokens[:-1]
    size = len(tokens)
    fixed = [(i, t) for i, t in enumerate(tokens) if t != "*"]

    def match(topic: str) -> bool:
        parts = topic.split(".")
        if (len(parts) <= size) if tail else (len(parts) != size):
            return False
        for i, token in fixed:
            if parts[i] != token:
                return False
        return True

    return match
