"""The driver interface every sync backplane implements, and its optional capabilities.

A driver factory is called once per hub with the hub's :class:`Address` and
returns a :class:`SyncDriver`: ``name``, ``capabilities``, ``publish``,
``subscribe`` and ``close``. What a driver can do beyond the three required
methods it *declares* in :attr:`SyncDriver.capabilities`; the hub reads that
set and never probes with ``hasattr``:

- ``"batch"``: :class:`BatchSubscriber`, ``subscribe_batch(deliver_batch)``
  hands over runs of one origin and topic at once;
- ``"tagged"``: :class:`TaggedSubscriber`, ``subscribe_tagged(deliver_tagged)``
  like ``"batch"``, with each payload's tag byte already split off, so the
  hub does not cut every payload a second time (the hub prefers it);
- ``"parts"``: :class:`PartsPublisher`, ``publish_parts(namespace, topic, data, to)``
  takes the encoded parts without a ``Message`` (the hub's fast path);
- ``"sender"``: :class:`Sender`, ``sender(namespace, topic)`` returns a
  function that publishes encoded messages on that topic to every other hub;
  the hub keeps one per topic it publishes to (its fastest path). It must
  stay valid until ``close()``;
- ``"ready"``: :class:`Readiness`, ``wait_ready(timeout) -> bool``;
- ``"stats"``: :class:`Stats`, ``stats() -> dict``;
- ``"limit"``: :class:`Limit`, ``max_message``: the largest encoded message
  the backplane carries. The hub's own limit is lowered to it, so a message
  the hub accepts always travels, and one it would not carry raises
  ``ValueError`` in ``publish``;
- ``"state"``: :class:`State`, ``watch_state(fn)``: ``fn(up, exc)`` once when
  the backplane is lost and once when it is back (the network drivers);
- ``"address"``: :class:`HasAddress`, ``address``: the hub's address on this
  backplane, read by the hub once subscribed (a process that joins a
  primary's bus gets its worker index from the relay);
- ``"interest"``: :class:`Interested`, ``interest(topic, on)``: the hub
  says which topics and patterns it subscribes to (the first subscription
  to each, and the last one gone), so the backplane can send it only those;
- ``"reading"``: :class:`Reading`, ``read_until(ready, timeout, wake)``,
  ``interrupt_reading()`` and ``read_on_loop(loop)``: a thread waiting in ``Subscription.get()``,
  or an event loop, reads the backplane itself (no hand-off between threads);
- ``"presence"``: :class:`Presence`, a table of entries that hubs on the
  channel advertise (``advertise(entry, on)``), withdrawn the moment their
  hub or worker is gone, watched with ``watch(fn)``: what services are built on.

Every driver honours ``to=``: ``publish(msg, to)`` with ``to`` an
:class:`Address` (one hub) or an ``int`` (every hub on the channel in that
worker). ``on_unreachable(destination, count)``, given to ``subscribe``,
reports addressed messages that found nobody; it may be called from any
thread.

This module imports neither the Hub nor the relay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Protocol, runtime_checkable

from ..message import Address, Destination, Message, check_channel

__all__ = [
    "SyncDriver",
    "DriverFactory",
    "Deliver",
    "DeliverBatch",
    "DeliverTagged",
    "TaggedSubscriber",
    "OnUnreachable",
    "BatchSubscriber",
    "PartsPublisher",
    "Sender",
    "Readiness",
    "Stats",
    "Limit",
    "Presence",
    "PresenceWatcher",
    "State",
    "HasAddress",
    "Interested",
    "BusTransport",
    "bus_transport",
    "install_bus_connector",
    "tell_watcher",
    "CAPABILITIES",
    "ClusterTransport",
    "cluster_transport",
    "install_cluster_transport",
    "check_channel",
    "one_by_one",
    "deliver_in_runs",
    "Reading",
]

#: ``deliver(msg)``: one message from another hub (``msg.data`` is the encoded payload).
Deliver = Callable[[Message], Any]
#: ``deliver_batch(namespace, topic, origin, datas)``: many messages of one origin and topic at once.
DeliverBatch = Callable[[str, str, Address, List[bytes]], Any]
#: ``deliver_tagged(namespace, topic, origin, tags, values)``: a run with each payload's first byte (the
#: codec's tag) split off: ``tags[i]`` is message ``i``'s (0 for an empty payload), ``values[i]`` the rest.
DeliverTagged = Callable[[str, str, Address, bytes, List[bytes]], Any]
#: ``on_unreachable(destination, count)``: ``count`` addressed messages found no such hub or worker.
OnUnreachable = Callable[[Destination, int], Any]

CAPABILITIES = frozenset(
    {"batch", "tagged", "parts", "sender", "ready", "stats", "limit", "presence", "state", "address", "interest", "reading"}
)


def one_by_one(deliver: Deliver) -> DeliverBatch:
    """Adapt a per-message ``deliver(msg)`` to a ``deliver_batch``."""

    def deliver_batch(namespace: str, topic: str, origin: Address, datas: List[bytes]) -> None:
        for data in datas:
            deliver(Message(namespace, topic, data, origin))

    return deliver_batch


def deliver_in_runs(batch: List[Message], deliver: DeliverBatch) -> None:
    """Hand ``batch`` to ``deliver`` in order, as runs of one namespace, topic and origin."""
    start, end = 0, len(batch)
    while start < end:
        ns, topic, data, origin = batch[start]
        stop = start + 1
        while stop < end:
            m = batch[stop]
            if m[1] != topic or m[3] != origin or m[0] != ns:
                break
            stop += 1
        datas = [data] if stop == start + 1 else [m[2] for m in batch[start:stop]]
        deliver(ns, topic, origin, datas)  # the hub contains subscriber errors itself
        start = stop


@runtime_checkable
class SyncDriver(Protocol):
    """What a driver factory returns, once per hub.

    ``publish(msg, to)`` relays ``msg`` (its ``data`` is encoded ``bytes``) to
    the other hubs on the channel, or to the ``to`` destination alone;
    ``subscribe(deliver, on_unreachable)`` is called once, and from then on
    every message from another hub is passed to ``deliver``; ``close()``
    releases what the driver opened. A driver never hands a hub its own
    messages back and never re-publishes what it delivers.
    """

    #: The optional capabilities this driver implements (a subset of :data:`CAPABILITIES`).
    capabilities: FrozenSet[str]
    #: The driver's name, shown as ``Hub.sync_type`` (for example ``"cluster"``).
    name: str

    def publish(self, msg: Message, to: Optional[Destination] = None) -> None:
        """Relay ``msg`` to the other hubs on the channel (or to ``to``). May raise; the hub reports it."""

    def subscribe(self, deliver: Deliver, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Start passing messages from other hubs to ``deliver``."""

    def close(self) -> None:
        """Stop and release resources. Called once, by ``Hub.close()``."""


class BatchSubscriber(Protocol):
    """Capability ``"batch"``."""

    def subscribe_batch(self, deliver_batch: DeliverBatch, on_unreachable: Optional[OnUnreachable] = None) -> None:
        """Like ``subscribe``, a run of one origin and topic at a time."""


class TaggedSubscriber(Protocol):
    """Capability ``"tagged"``."""

    def subscribe_tagged(
        self, deliver_tagged: DeliverTagged, on_unreachable: Optional[OnUnreachable] = None
    ) -> None:
        """Like ``subscribe_batch``, with each payload's tag byte split off."""


class PartsPublisher(Protocol):
    """Capability ``"parts"``."""

    def publish_parts(self, namespace: str, topic: str, data: bytes, to: Optional[Destination] = None) -> None:
        """Publish one encoded message without building a ``Message``."""


class Sender(Protocol):
    """Capability ``"sender"``."""

    def sender(self, namespace: str, topic: str) -> Callable[[bytes], Any]:
        """A function that publishes one encoded message on ``topic`` to every other hub on the channel."""


class Readiness(Protocol):
    """Capability ``"ready"``."""

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once the subscription is live on the backplane."""


class Stats(Protocol):
    """Capability ``"stats"``."""

    def stats(self) -> Dict[str, Any]:
        """Counters, shown in ``Hub.stats()["driver"]``."""


class Limit(Protocol):
    """Capability ``"limit"``."""

    #: The largest encoded message (tag byte and payload) the backplane carries.
    max_message: int


class Interested(Protocol):
    """Capability ``"interest"``."""

    def interest(self, topic: str, on: bool) -> None:
        """This hub now subscribes to ``topic`` (a topic or a pattern), or no longer does."""


class HasAddress(Protocol):
    """Capability ``"address"``."""

    #: The hub's address on this backplane, once subscribed.
    address: Address


class State(Protocol):
    """Capability ``"state"``."""

    def watch_state(self, fn: Callable[[bool, Optional[BaseException]], Any]) -> None:
        """Call ``fn(False, cause)`` once when an outage starts and ``fn(True, None)`` once when it ends."""


class Reading(Protocol):
    """Capability ``"reading"``: the application's own thread or event loop may read the backplane.

    The messages read are delivered on that thread (to every hub of the process
    on this backplane), so a subscriber waiting there gets its message with no
    hand-off from a second thread.
    """

    def read_until(self, ready: Callable[[], bool], timeout: Optional[float], wake: threading.Condition) -> None:
        """Read and deliver on this thread until ``ready()``, ``timeout`` passes, or reading here is not
        possible (another thread or a loop reads); ``wake`` is notified when another thread stops reading."""

    def interrupt_reading(self) -> None:
        """``ready()`` of a thread in ``read_until`` may have turned true another way (a local publish, a
        close): that thread must look again."""

    def read_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read and deliver on ``loop`` (called on that loop's thread) until :meth:`stop_reading_on_loop`."""

    def stop_reading_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Undo one :meth:`read_on_loop` (from any thread)."""


#: ``fn(address, entry, present)``: a hub's entry came (True) or went (False).
PresenceWatcher = Callable[[Address, str, bool], Any]


def tell_watcher(fn: PresenceWatcher, address: Address, entry: str, present: bool) -> None:
    """Call a presence watcher; its own error is logged, never raised into the driver."""
    try:
        fn(address, entry, present)
    except Exception:
        logging.getLogger("clustersync").exception("a presence watcher failed")


class Presence(Protocol):
    """Capability ``"presence"``."""

    def advertise(self, entry: str, on: bool = True) -> None:
        """Add (``on``) or withdraw this hub's ``entry`` in the channel's table."""

    def watch(self, fn: PresenceWatcher) -> Callable[[], None]:
        """Call ``fn`` for every entry in the table now, then for every change; return the function that stops it."""

    def sync_presence(self, timeout: Optional[float] = None) -> bool:
        """Wait until every change the backplane had seen when called has reached the watchers here."""


#: A driver factory: called once per hub with the hub's address, returns a driver.
DriverFactory = Callable[[Address], SyncDriver]


class ClusterTransport(Reading, Protocol):
    """The worker's end of the relay, as the ``cluster`` driver sees it (it can be read on any thread: :class:`Reading`).

    The relay installs one per worker process (:func:`install_cluster_transport`);
    the driver only knows this protocol, never the relay's modules.
    """

    index: int
    pid: int
    #: The relay's limit on one encoded message.
    max_message: int

    def add_member(
        self,
        channel: bytes,
        hub_id: bytes,
        deliver: Callable[..., Any],
        on_unreachable: Optional[OnUnreachable],
        tagged: bool = False,
    ) -> int:
        """Route ``channel`` to ``deliver`` (a ``DeliverBatch``, or with ``tagged`` a ``DeliverTagged``);
        return the sequence number ``wait_acked`` waits for."""

    def remove_member(self, channel: bytes, hub_id: bytes) -> None:
        """Stop routing ``channel`` to ``hub_id``."""

    def wait_acked(self, channel: bytes, seq: int, timeout: Optional[float]) -> bool:
        """Wait until the relay routes ``channel`` here."""

    def route(self, channel: bytes, dest: int, to_hub: bytes, origin: bytes, ns: bytes, topic: bytes) -> Any:
        """Where messages go (``dest`` a worker index or every worker), as :meth:`publish` takes it.

        Equal routes come back as one object: keep it and pass it again, and
        consecutive messages on it share their metadata on the wire.
        """

    def publish(self, route: Any, data: bytes) -> None:
        """Queue one encoded message on ``route``."""

    def stats(self) -> Dict[str, Any]:
        """The transport's counters."""

    def interest(self, channel: bytes, topic: bytes, on: bool) -> int:
        """A hub here wants ``topic`` on ``channel`` (or no longer); return the number ``wait_acked`` waits for."""

    def advertise(self, channel: bytes, hub_id: bytes, entry: bytes, on: bool) -> None:
        """Add or withdraw a hub's entry in the channel's presence table."""

    def watch_presence(self, channel: bytes, fn: PresenceWatcher) -> Callable[[], None]:
        """Watch the channel's presence table."""

    def sync(self, timeout: Optional[float]) -> bool:
        """Wait until everything the relay queued for this worker before this call has arrived."""


_transport: Optional[ClusterTransport] = None


def install_cluster_transport(transport: Optional[ClusterTransport]) -> None:
    """Make ``transport`` this process's end of the relay (called by the relay in a new worker)."""
    global _transport
    _transport = transport


def cluster_transport() -> Optional[ClusterTransport]:
    """This worker's end of the relay, or None outside a worker (a forked child of a worker is not one)."""
    t = _transport
    if t is not None and t.pid != os.getpid():
        return None
    return t


class BusTransport(ClusterTransport, Protocol):
    """A process's end of a primary's bus: a :class:`ClusterTransport` that can go away."""

    path: str

    def watch_state(self, fn: Callable[[bool, Optional[BaseException]], Any]) -> Callable[[], None]:
        """Call ``fn(False, exc)`` when the relay goes away; return the function that stops it."""


_bus_connector: Optional[Callable[[str], BusTransport]] = None


def install_bus_connector(connect: Callable[[str], BusTransport]) -> None:
    """Set how ``cluster(address=...)`` joins a bus (the package installs the relay's ``connect``)."""
    global _bus_connector
    _bus_connector = connect


def bus_transport(path: str) -> BusTransport:
    """This process's end of the bus at ``path`` (connecting on first use)."""
    if _bus_connector is None:
        raise RuntimeError("no bus connector is installed (import clustersync first)")
    return _bus_connector(path)
