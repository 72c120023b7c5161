"""``cluster``: a worker's end of the primary's relay.

Hubs in workers started by a primary (:func:`clustersync.setup_primary_cluster`
or ``clustersync run``) reach every other hub on the same channel, in any
worker, through the primary. ``to=`` is routed by the relay: to one worker's
pipe, then to the one hub there. Outside such a worker, ``subscribe`` raises
``RuntimeError``. This module knows the relay only through the
:class:`~clustersync.sync.base.ClusterTransport` protocol.
"""

from __future__ import annotations

import asyncio
import os
import threading
from functools import partial
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple

from ..message import UPLINK_WORKER, Address, Destination, Message, check_channel
from .base import (
    BusTransport,
    ClusterTransport,
    Deliver,
    DeliverBatch,
    DeliverTagged,
    DriverFactory,
    OnUnreachable,
    PresenceWatcher,
    bus_transport,
    cluster_transport,
    one_by_one,
)

__all__ = ["cluster", "ClusterDriver"]

#: The relay's "every worker" destination.
_BROADCAST = 0xFFFF
_MAX_WORKERS = 0xFFFE

_NOT_A_WORKER = (
    "cluster() sync works in a worker started by a clustersync primary (setup_primary_cluster() and "
    "primary.fork(...), or `python -m clustersync run`), or in any process given the path of a "
    "primary's bus: cluster(channel=..., address=PATH) or CLUSTERSYNC_BUS=PATH"
)


_CAPABILITIES = frozenset(
    {"batch", "tagged", "parts", "sender", "ready", "stats", "limit", "presence", "interest", "reading"}
)
#: The environment variable that names the bus a process outside the workers joins.
BUS_ENV = "CLUSTERSYNC_BUS"


class ClusterDriver:
    """One hub's membership of a channel on the primary's relay (as a worker, or a process on its bus)."""

    #: The driver's name (``Hub.sync_type``).
    name = "cluster"

    def __init__(self, address: Address, channel: str, bus: Optional[str] = None) -> None:
        self.address = address
        self.channel = channel
        #: The bus path this hub joins, or None in a worker.
        self.bus = bus
        self.capabilities: FrozenSet[str] = _CAPABILITIES | {"address", "state"} if bus else _CAPABILITIES
        self._on_state: Optional[Callable[[bool, Optional[BaseException]], Any]] = None
        self._hid = address.hub.encode()
        self._chan = channel.encode()
        self._link: Optional[ClusterTransport] = None
        self._seq = 0
        # topic -> (namespace, route) of the last broadcast on it: routes are kept, not rebuilt
        self._broadcast: Dict[str, Tuple[str, Any]] = {}
        # (namespace, topic, to) -> route, for addressed messages (answers, service calls)
        self._addressed: Dict[Tuple[str, str, Any], Any] = {}
        self._adverts: Set[str] = set()
        self._interests: Set[str] = set()
        self._unwatch: List[Callable[[], None]] = []
        self._loops: List[asyncio.AbstractEventLoop] = []  # read_on_loop() calls, undone by close()

    def subscribe(self, deliver: Deliver, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Join the channel; raises ``RuntimeError`` outside a worker."""
        self.subscribe_batch(one_by_one(deliver), on_unreachable)

    def subscribe_batch(self, deliver_batch: DeliverBatch, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Join the channel, taking messages a run at a time: ``deliver_batch(namespace, topic, origin, datas)``."""
        self._join(deliver_batch, on_unreachable, False)

    def subscribe_tagged(self, deliver_tagged: DeliverTagged, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Join the channel, taking runs with each payload's tag byte split off:
        ``deliver_tagged(namespace, topic, origin, tags, values)``."""
        self._join(deliver_tagged, on_unreachable, True)

    def _join(self, deliver: Callable[..., Any], on_unreachable: Optional[OnUnreachable], tagged: bool) -> None:
        link: Optional[ClusterTransport]
        if self.bus is not None:
            bus: BusTransport = bus_transport(self.bus)
            self.address = Address(bus.index, self.address.hub)
            self._unwatch.append(bus.watch_state(self._state))
            link = bus
        else:
            link = cluster_transport()
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        self._seq = link.add_member(self._chan, self._hid, deliver, on_unreachable, tagged)
        self._link = link

    def watch_state(self, fn: Callable[[bool, Optional[BaseException]], Any]) -> None:
        """Capability ``"state"`` (on a bus): ``fn(False, exc)`` once the relay goes away."""
        self._on_state = fn

    def _state(self, up: bool, exc: Optional[BaseException]) -> None:
        fn = self._on_state
        if fn is not None:
            fn(up, exc)

    @property
    def max_message(self) -> int:
        """The relay's limit on one encoded message (0 outside a worker: nothing travels)."""
        link = self._link
        return link.max_message if link is not None else 0

    def _route(self, namespace: str, topic: str, to: Optional[Destination]) -> Any:
        """The link's route for one message: one object per destination, namespace and topic."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        if to is None:
            dest, hub = _BROADCAST, ""
        elif isinstance(to, Address):
            if not 0 <= to.worker < _MAX_WORKERS:
                raise ValueError(f"{to} is not the address of a hub in a worker")
            dest, hub = to.worker, to.hub
        elif isinstance(to, int) and not isinstance(to, bool) and 0 <= to < _MAX_WORKERS and to != UPLINK_WORKER:
            dest, hub = to, ""
        else:
            raise ValueError(f"to must be an Address or a worker index, not {to!r}")
        return link.route(self._chan, dest, hub.encode(), self._hid, namespace.encode(), topic.encode())

    def publish_parts(self, namespace: str, topic: str, data: bytes, to: Optional[Destination] = None) -> None:
        """Send one encoded message without building a ``Message``."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        if to is None:
            hit = self._broadcast.get(topic)
            if hit is not None and hit[0] == namespace:
                link.publish(hit[1], data)
                return
            route = self._route(namespace, topic, None)
            if len(self._broadcast) >= 4096:
                self._broadcast.clear()
            self._broadcast[topic] = (namespace, route)
        else:
            key = (namespace, topic, to)
            try:
                route = self._addressed.get(key)
            except TypeError:  # not hashable: _route says what is wrong with it
                route = None
            if route is None:
                route = self._route(namespace, topic, to)
                if len(self._addressed) >= 4096:
                    self._addressed.clear()
                self._addressed[key] = route
        link.publish(route, data)

    def sender(self, namespace: str, topic: str) -> Callable[[bytes], None]:
        """Capability ``"sender"``: a function publishing encoded messages on ``topic`` to every other hub."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        return partial(link.publish, self._route(namespace, topic, None))

    def publish(self, msg: Message, to: Optional[Destination] = None) -> None:
        """Send ``msg`` to every other hub on the channel, or to ``to``."""
        self.publish_parts(msg.namespace, msg.topic, msg.data, to)

    def interest(self, topic: str, on: bool) -> None:
        """Tell the relay this hub subscribes to ``topic`` (or a pattern), or no longer: it routes by it."""
        link = self._link
        if link is None:
            return
        if on == (topic in self._interests):
            return
        if on:
            self._interests.add(topic)
        else:
            self._interests.discard(topic)
        seq = link.interest(self._chan, topic.encode(), on)
        if on:
            self._seq = max(self._seq, seq)  # wait_ready() covers the subscriptions made before it

    def advertise(self, entry: str, on: bool = True) -> None:
        """Add or withdraw ``entry`` in the primary's presence table for the channel."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        if on:
            self._adverts.add(entry)
        else:
            self._adverts.discard(entry)
        link.advertise(self._chan, self._hid, entry.encode(), on)

    def watch(self, fn: PresenceWatcher) -> Callable[[], None]:
        """Watch the channel's presence table (the primary's, as this worker's link holds it)."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        unwatch = link.watch_presence(self._chan, fn)
        self._unwatch.append(unwatch)
        return unwatch

    def sync_presence(self, timeout: Optional[float] = None) -> bool:
        """A round trip to the primary: every presence change it had seen is here when this returns True."""
        link = self._link
        return link is not None and link.sync(timeout)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once the primary routes the channel to this worker."""
        link = self._link
        return link is not None and link.wait_acked(self._chan, self._seq, timeout)

    def read_until(self, ready: Callable[[], bool], timeout: Optional[float], wake: threading.Condition) -> None:
        """Capability ``"reading"``: read this process's pipe on the calling thread until ``ready()``."""
        link = self._link
        if link is not None:
            link.read_until(ready, timeout, wake)

    def interrupt_reading(self) -> None:
        """Capability ``"reading"``: a thread in :meth:`read_until` should check ``ready()`` again."""
        link = self._link
        if link is not None:
            link.interrupt_reading()

    def read_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Capability ``"reading"``: read this process's pipe on ``loop`` (its thread) until :meth:`close`."""
        link = self._link
        if link is None:
            raise RuntimeError(_NOT_A_WORKER)
        link.read_on_loop(loop)
        self._loops.append(loop)

    def stop_reading_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Undo one :meth:`read_on_loop`."""
        link = self._link
        if loop in self._loops:
            self._loops.remove(loop)
            if link is not None:
                link.stop_reading_on_loop(loop)

    def stats(self) -> Dict[str, Any]:
        """The worker link's counters."""
        link = self._link
        return link.stats() if link is not None else {"driver": "cluster", "connected": False}

    def close(self) -> None:
        """Withdraw this hub's adverts, stop its watchers, leave the channel."""
        link, self._link = self._link, None
        if link is not None:
            for topic in self._interests:
                link.interest(self._chan, topic.encode(), False)
            self._interests.clear()
            for entry in self._adverts:
                link.advertise(self._chan, self._hid, entry.encode(), False)
            for unwatch in self._unwatch:
                unwatch()
            for loop in self._loops:
                link.stop_reading_on_loop(loop)
            self._loops.clear()
            link.remove_member(self._chan, self._hid)


def cluster(*, channel: str, address: Optional[str] = None) -> DriverFactory:
    """A driver factory joining hubs of all workers of this primary on ``channel``.

    In a worker of a primary, the hub joins that primary's relay. Elsewhere,
    ``address`` (or the ``CLUSTERSYNC_BUS`` environment variable) names the
    Unix socket of a primary's bus (``setup_primary_cluster(listen=...)``,
    ``clustersync relay --bus PATH``), and the hub joins through it as a
    peer: a gunicorn or uvicorn worker, a cron job, a shell. ``address``
    given in a worker joins that bus instead of the worker's own relay.
    """
    check_channel(channel)
    if address is not None and (not isinstance(address, str) or not address):
        raise ValueError(f"address must be the path of a bus socket, not {address!r}")

    def factory(hub_address: Address) -> ClusterDriver:
        path = address
        if path is None and cluster_transport() is None:
            path = os.environ.get(BUS_ENV) or None
        return ClusterDriver(hub_address, channel, path)

    return factory
