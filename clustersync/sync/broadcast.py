"""``broadcast_channel``: hubs in one process (any threads) reach each other.

Each subscribed driver owns a delivery thread and a bounded queue (the
shared :class:`~clustersync.message.BoundedQueue`, oldest dropped), so a
message is delivered on a thread of the receiving hub, never inside the
publisher's call, and a slow hub only fills its own queue. ``to=`` is
routed at once: the message is queued for the addressed hub alone (or the
hubs of that worker index), and a destination that is not on the channel
raises :class:`~clustersync.message.DestinationUnreachable` to the hub.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from .._log import RateLimitedLog
from ..message import (
    DEFAULT_QUEUE_SIZE,
    Address,
    BoundedQueue,
    Destination,
    DestinationUnreachable,
    Message,
    check_channel,
    delivering_on,
)
from .base import (
    Deliver,
    DeliverBatch,
    DriverFactory,
    OnUnreachable,
    PresenceWatcher,
    deliver_in_runs,
    one_by_one,
    tell_watcher,
)

__all__ = ["broadcast_channel", "BroadcastDriver"]

_registry_lock = threading.Lock()
_registry: Dict[str, Tuple["BroadcastDriver", ...]] = {}
_ratelimited = RateLimitedLog()
# The presence tables: channel -> {(address, entry): None}, and their watchers.
_adverts: Dict[str, Dict[Tuple[Address, str], None]] = {}
_watchers: Dict[str, Tuple["PresenceWatcher", ...]] = {}


def _drop_watcher(channel: str, fn: "PresenceWatcher") -> None:
    """With the registry lock held: stop telling ``fn`` about ``channel``."""
    kept = tuple(f for f in _watchers.get(channel, ()) if f is not fn)
    if kept:
        _watchers[channel] = kept
    else:
        _watchers.pop(channel, None)


class BroadcastDriver:
    """One hub's membership of an in-process channel."""

    #: The driver's name (``Hub.sync_type``).
    name = "broadcast_channel"
    capabilities: FrozenSet[str] = frozenset({"batch", "ready", "stats", "presence"})

    def __init__(self, address: Address, channel: str, queue_size: int) -> None:
        self.address = address
        self.channel = channel
        self.queue_size = queue_size
        self._queue: BoundedQueue[Message] = BoundedQueue(queue_size, self._dropped)
        self._deliver: Optional[DeliverBatch] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._watching: List[PresenceWatcher] = []
        self.published = 0
        self.received = 0

    @property
    def dropped(self) -> int:
        """Messages this hub lost because its queue was full."""
        return self._queue.dropped

    def subscribe(self, deliver: Deliver, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Join the channel and start the delivery thread."""
        self.subscribe_batch(one_by_one(deliver), on_unreachable)

    def subscribe_batch(self, deliver_batch: DeliverBatch, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Join the channel; the delivery thread hands over runs of one origin and topic at a time."""
        if self._deliver is not None:
            raise RuntimeError("subscribe() called twice")
        if self._closed:
            raise RuntimeError("driver is closed")
        self._deliver = deliver_batch
        self._thread = threading.Thread(
            target=self._run, name=f"clustersync-broadcast-{self.channel}-{self.address.hub}", daemon=True
        )
        self._thread.start()
        with _registry_lock:
            _registry[self.channel] = _registry.get(self.channel, ()) + (self,)

    def publish(self, msg: Message, to: Optional[Destination] = None) -> None:
        """Queue ``msg`` for every other member of the channel, or for ``to`` alone."""
        self.published += 1
        members = _registry.get(self.channel, ())
        if to is None:
            for member in members:
                if member is not self:
                    member._queue.put(msg)
            return
        if isinstance(to, Address):
            targets = [m for m in members if m.address == to and m is not self]
        elif isinstance(to, int) and not isinstance(to, bool):
            targets = [m for m in members if m.address.worker == to and m is not self]
        else:
            raise ValueError(f"to must be an Address or a worker index, not {to!r}")
        if not targets:
            raise DestinationUnreachable(to)
        for member in targets:
            member._queue.put(msg)

    def _dropped(self, count: int) -> None:
        _ratelimited(
            ("broadcast", id(self)),
            logging.WARNING,
            "broadcast_channel %r: hub %s is slow, dropped its oldest message (%d so far)",
            self.channel,
            self.address,
            self._queue.dropped,
        )

    def _run(self) -> None:
        deliver = self._deliver
        assert deliver is not None
        queue = self._queue
        delivering_on(True)  # this thread does nothing else (a blocking service call here is refused)
        while True:
            batch = queue.take_all(None)
            if queue.closed:
                return
            self.received += len(batch)
            deliver_in_runs(batch, deliver)

    def advertise(self, entry: str, on: bool = True) -> None:
        """Add or withdraw ``entry`` in the channel's presence table (this process's)."""
        key = (self.address, entry)
        with _registry_lock:
            table = _adverts.setdefault(self.channel, {})
            if on == (key in table):
                return
            if on:
                table[key] = None
            else:
                del table[key]
            watchers = list(_watchers.get(self.channel, ()))
        for fn in watchers:
            tell_watcher(fn, self.address, entry, on)

    def watch(self, fn: PresenceWatcher) -> Callable[[], None]:
        """Call ``fn`` for every entry in the table now, then for every change."""
        with _registry_lock:
            _watchers[self.channel] = _watchers.get(self.channel, ()) + (fn,)
            current = list(_adverts.get(self.channel, {}))
            self._watching.append(fn)
        for address, entry in current:
            tell_watcher(fn, address, entry, True)

        def unwatch() -> None:
            with _registry_lock:
                _drop_watcher(self.channel, fn)

        return unwatch

    def sync_presence(self, timeout: Optional[float] = None) -> bool:
        """Presence changes reach the watchers before ``advertise`` returns: nothing to wait for."""
        return not self._closed

    def _withdraw_all(self) -> None:
        with _registry_lock:
            table = _adverts.get(self.channel, {})
            mine = [key for key in table if key[0] == self.address]
            for key in mine:
                del table[key]
            if not table:
                _adverts.pop(self.channel, None)
            for fn in self._watching:
                _drop_watcher(self.channel, fn)
            watchers = list(_watchers.get(self.channel, ()))
        for address, entry in mine:
            for fn in watchers:
                tell_watcher(fn, address, entry, False)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Ready once subscribed: membership is immediate."""
        return self._deliver is not None and not self._closed

    def stats(self) -> Dict[str, Any]:
        """Published, received, dropped and queued counts."""
        return {
            "driver": "broadcast_channel",
            "channel": self.channel,
            "published": self.published,
            "received": self.received,
            "dropped": self.dropped,
            "queued": len(self._queue),
        }

    def close(self) -> None:
        """Leave the channel and stop the delivery thread."""
        with _registry_lock:
            members = tuple(m for m in _registry.get(self.channel, ()) if m is not self)
            if members:
                _registry[self.channel] = members
            else:
                _registry.pop(self.channel, None)
        self._closed = True
        self._withdraw_all()  # its entries go the moment it closes, and its watchers with it
        self._queue.close(clear=True)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


def broadcast_channel(*, channel: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> DriverFactory:
    """A driver factory joining hubs of this process on ``channel``.

    ``queue_size`` bounds each hub's inbound queue; on overflow the oldest
    message is dropped and counted.
    """
    check_channel(channel)
    if not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError("queue_size must be a positive int")

    def factory(address: Address) -> BroadcastDriver:
        return BroadcastDriver(address, channel, queue_size)

    return factory


