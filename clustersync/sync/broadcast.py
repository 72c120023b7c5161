"""``broadcast_channel``: hubs in one process (any threads) reach each other.

Each subscribed driver owns a delivery thread and a bounded queue, so a
message is delivered on a thread of the receiving hub, never inside the
publisher's call, and a slow hub only fills its own queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Deque, Dict, List, Optional

from .._log import RateLimitedLog
from ..hub import DEFAULT_QUEUE_SIZE, Message
from .base import Deliver, DeliverBatch, DriverFactory, check_channel, one_by_one

__all__ = ["broadcast_channel", "BroadcastDriver"]

_registry_lock = threading.Lock()
_registry: Dict[str, List["BroadcastDriver"]] = {}
_ratelimited = RateLimitedLog()


class BroadcastDriver:
    """One hub's membership of an in-process channel."""

    def __init__(self, hub_id: str, channel: str, queue_size: int) -> None:
        self.hub_id = hub_id
        self.channel = channel
        self.queue_size = queue_size
        self._queue: Deque[Message] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._deliver: Optional[DeliverBatch] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.published = 0
        self.received = 0
        self.dropped = 0

    def subscribe(self, deliver: Deliver) -> None:
        """Join the channel and start the delivery thread."""
        self.subscribe_batch(one_by_one(deliver))

    def subscribe_batch(self, deliver_batch: DeliverBatch) -> None:
        """Join the channel; the delivery thread hands over runs of one origin and topic at a time."""
        if self._deliver is not None:
            raise RuntimeError("subscribe() called twice")
        if self._closed:
            raise RuntimeError("driver is closed")
        self._deliver = deliver_batch
        self._thread = threading.Thread(
            target=self._run, name=f"clustersync-broadcast-{self.channel}-{self.hub_id}", daemon=True
        )
        self._thread.start()
        with _registry_lock:
            members = _registry.get(self.channel, [])
            _registry[self.channel] = members + [self]

    def publish(self, msg: Message) -> None:
        """Queue ``msg`` for every other member of the channel."""
        self.published += 1
        for member in _registry.get(self.channel, ()):
            if member is not self:
                member._put(msg)

    def _put(self, msg: Message) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.dropped += 1
                _ratelimited(
                    id(self),
                    logging.WARNING,
                    "broadcast_channel %r: hub %s is slow, dropped its oldest message (%d so far)",
                    self.channel,
                    self.hub_id,
                    self.dropped,
                )
            self._queue.append(msg)
            if len(self._queue) == 1:
                self._cond.notify()

    def _run(self) -> None:
        deliver = self._deliver
        assert deliver is not None
        queue = self._queue
        cond = self._cond
        while True:
            with cond:
                while not queue and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                batch = list(queue)
                queue.clear()
            self.received += len(batch)
            start = 0
            end = len(batch)
            while start < end:  # runs of one namespace, topic and origin, in order
                ns, topic, _data, origin = first = batch[start]
                stop = start + 1
                while stop < end:
                    m = batch[stop]
                    if m[1] != topic or m[3] != origin or m[0] != ns:
                        break
                    stop += 1
                datas = [first[2]] if stop == start + 1 else [m[2] for m in batch[start:stop]]
                deliver(ns, topic, origin, datas)  # the hub contains subscriber errors itself
                start = stop

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
            members = [m for m in _registry.get(self.channel, ()) if m is not self]
            if members:
                _registry[self.channel] = members
            else:
                _registry.pop(self.channel, None)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
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

    def factory(hub_id: str) -> BroadcastDriver:
        return BroadcastDriver(hub_id, channel, queue_size)

    return factory
