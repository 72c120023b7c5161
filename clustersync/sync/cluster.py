"""``cluster``: the worker side of the primary's relay.

Hubs in workers forked by :func:`clustersync.sync.setup_primary_cluster`
reach every other hub on the same channel, in any worker, through the
primary. Outside such a worker, ``subscribe`` raises ``RuntimeError``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..hub import Message
from ..link import DeliverBatch, WorkerLink, current_link
from ..wire import BROADCAST, MAX_WORKERS
from .base import Deliver, DriverFactory, check_channel, one_by_one

__all__ = ["cluster", "ClusterDriver"]

_NOT_A_WORKER = (
    "cluster() sync works only in a worker forked by a clustersync primary: call "
    "setup_primary_cluster() in the primary process and start workers with primary.fork(...) "
    "(or run the app with `python -m clustersync run`)"
)


class ClusterDriver:
    """One hub's membership of a channel on the primary's relay."""

    def __init__(self, hub_id: str, channel: str) -> None:
        self.hub_id = hub_id
        self.channel = channel
        self._hid = hub_id.encode()
        self._chan = channel.encode()
        self._link: Optional[WorkerLink] = None
        self._seq = 0
        self._encoded: Dict[str, bytes] = {}

    def subscribe(self, deliver: Deliver) -> None:
        """Join the channel; raises ``RuntimeError`` outside a worker."""
        self.subscribe_batch(one_by_one(deliver))

    def subscribe_batch(self, deliver_batch: DeliverBatch) -> None:
        """Join the channel, taking messages a run at a time: ``deliver_batch(namespace, topic, origin, datas)``."""
        link = current_link()
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        self._seq = link.add_member(self._chan, self._hid, deliver_batch)
        self._link = link

    def _names(self, name: str) -> bytes:
        """The UTF-8 bytes of a topic or namespace, one shared object per name (the link batches on identity)."""
        encoded = self._encoded.get(name)
        if encoded is None:
            if len(self._encoded) >= 4096:
                self._encoded.clear()
            encoded = self._encoded[name] = name.encode()
        return encoded

    def publish_parts(self, namespace: str, topic: str, data: bytes, dest: int = BROADCAST) -> None:
        """Send one encoded message without building a ``Message`` (the hub's fast path)."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        names = self._encoded
        ns = names.get(namespace)
        if ns is None:
            ns = self._names(namespace)
        tp = names.get(topic)
        if tp is None:
            tp = self._names(topic)
        link.publish(self._chan, dest, self._hid, ns, tp, data)

    def publish(self, msg: Message) -> None:
        """Send ``msg`` to every other hub on the channel."""
        self.publish_parts(msg.namespace, msg.topic, msg.data)

    def publish_to(self, worker: int, msg: Message) -> None:
        """Send ``msg`` to the hubs on the channel in worker ``worker`` only."""
        if not isinstance(worker, int) or not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker must be a worker index, not {worker!r}")
        self.publish_parts(msg.namespace, msg.topic, msg.data, worker)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once the primary routes the channel to this worker."""
        link = self._link
        return link is not None and link.wait_acked(self._chan, self._seq, timeout)

    def stats(self) -> Dict[str, Any]:
        """The worker link's counters."""
        link = self._link
        return link.stats() if link is not None else {"driver": "cluster", "connected": False}

    def close(self) -> None:
        """Leave the channel."""
        link, self._link = self._link, None
        if link is not None:
            link.remove_member(self._chan, self._hid)


def cluster(*, channel: str) -> DriverFactory:
    """A driver factory joining hubs of all workers of this primary on ``channel``."""
    check_channel(channel)

    def factory(hub_id: str) -> ClusterDriver:
        return ClusterDriver(hub_id, channel)

    return factory
