"""The host uplink: one backplane connection that bridges every channel of a primary's relay.

The primary (``setup_primary_cluster(uplink="redis://...")`` or
``clustersync run --uplink URL``) joins the relay as one more peer, at index
:data:`~clustersync.message.UPLINK_WORKER`, through a socketpair. Its end of
the pair is a :class:`~clustersync.relay.link.WorkerLink` run on threads of
the primary process, and a :class:`~clustersync.sync.backplane.Session` on
the backplane carries every relay channel that has a member on this host,
under the same name:

- a message a worker broadcasts reaches the other workers through the relay
  as always, and the uplink once, which publishes it to the backplane;
- a message from the backplane is published into the relay by the uplink,
  with the remote hub as its origin (``Address(UPLINK_WORKER, "2/<hub id>")``
  for hub ``<hub id>`` in worker 2 of another host), so ``to=msg.origin``
  answers it across hosts;
- the uplink never publishes what came from the backplane, and drops its own
  echo by node id: no loops, no duplicates;
- traffic between the workers of this host that is addressed to one of them
  (``to=``) never reaches the uplink, so never the backplane;
- the uplink never waits for the backplane: when its outgoing queue is full
  (a slow or frozen server), the oldest message for other hosts is dropped
  and counted, and the local relay goes on at full speed.

Worker code is unchanged (``cluster(channel=...)``), and the wire format on
the backplane is the network drivers', so hubs using ``redis(...)``,
``postgres(...)`` or ``nats(...)`` directly on the same channel take part
too. An outage of the backplane never disturbs the local relay: messages for
other hosts are then dropped and counted.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Dict, List, Optional, Union

from .._log import RateLimitedLog, logger
from ..message import UPLINK_WORKER, Address, Destination
from ..sync.backplane import Backend, Options, Session, check_options
from ..sync.envelope import pack, unpack
from .link import WorkerLink
from .wire import BROADCAST, MAX_WORKERS

__all__ = ["Uplink", "uplink", "UplinkBridge"]

_ratelimited = RateLimitedLog()
_MEMBER = b"uplink"


class Uplink:
    """What ``uplink(url, **options)`` returns: how the primary reaches the backplane."""

    def __init__(self, url: str, make_backend: Callable[[], Backend], options: Options) -> None:
        self.url = url
        self.make_backend = make_backend
        self.options = options

    def __repr__(self) -> str:
        return f"<Uplink {self.url}>"


def uplink(url: str, **options: Any) -> Uplink:
    """Describe a host uplink to the backplane at ``url`` (any scheme ``from_url`` takes).

    ``options``: the network drivers' (``ping_interval``, ``ping_timeout``,
    ``reconnect_min``, ``reconnect_max``, ``queue_size``,
    ``max_queued_bytes``, ``publish_timeout``). Raises ``ValueError`` for an
    unknown scheme and ``ImportError`` naming the install line when the
    backplane's client library is missing.
    """
    from ..sync.url import backplane_of

    kind = backplane_of(url, "the uplink")
    opts = check_options(**options)
    make: Callable[[], Backend]
    if kind == "redis":
        from ..sync.redis import RedisBackend, redis_settings

        connection_class, settings, lib = redis_settings(url, None)
        make = lambda: RedisBackend(lib, connection_class, settings)  # noqa: E731
    elif kind == "postgres":
        from ..message import DEFAULT_MAX_MESSAGE
        from ..sync.postgres import PostgresBackend, psycopg_module

        lib = psycopg_module()
        try:
            lib.conninfo.conninfo_to_dict(url)
        except lib.ProgrammingError as exc:
            raise ValueError(f"uplink {url!r} is not a valid PostgreSQL URL: {exc}") from None
        make = lambda: PostgresBackend(lib, url, DEFAULT_MAX_MESSAGE)  # noqa: E731
    else:
        from ..sync.nats import NatsBackend, nats_module

        lib = nats_module()
        make = lambda: NatsBackend(lib, [url], {})  # noqa: E731
    return Uplink(url, make, opts)


def as_uplink(value: Union[str, Uplink]) -> Uplink:
    """An :class:`Uplink` from a URL or an :class:`Uplink`."""
    if isinstance(value, Uplink):
        return value
    return uplink(value)


class _Link(WorkerLink):
    """The uplink's end of its socketpair: a link that lives in the primary and hands every run to the bridge."""

    bridge: "UplinkBridge"

    def _dispatch(self, channel: bytes, members: Any, worker: int, plain: Any, tagged: Any) -> None:
        runs: List[Any] = plain or []  # the bridge's member takes plain runs: it forwards payloads as they are
        self.messages_in += sum(len(run[4]) for run in runs)
        self.bridge.from_relay(channel, worker, runs)

    def _unreachable(self, channel: bytes, worker: int, count: int, body: bytes) -> None:
        self.bridge.unreachable += count  # a message from another host found nobody here: nothing to tell

    def _on_stop(self) -> None:
        """The uplink is stopped by the primary's close, not by STOP frames."""

    def _on_eof(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class UplinkBridge:
    """Bridges the relay's channels and the backplane (see the module's text). Made by the primary."""

    def __init__(self, spec: Uplink, sock: socket.socket, max_message: int, out_limit: int) -> None:
        self.spec = spec
        link = _Link(sock, UPLINK_WORKER, max_message=max_message, out_limit=out_limit, publish_block=1.0)
        link.bridge = self
        self.link = link
        self.channels: Dict[bytes, str] = {}
        self._lock = threading.Lock()
        self._names: Dict[str, bytes] = {}
        #: Messages this host's workers published that went to the backplane.
        self.forwarded = 0
        #: Messages from other hosts published into the relay.
        self.injected = 0
        #: Addressed messages from other hosts for a hub or worker not on this host.
        self.unreachable = 0
        #: Payloads from the backplane that were not clustersync messages.
        self.malformed = 0
        self.session = Session(
            spec.make_backend(), [], self._from_backplane, self._state, spec.options, label=f"uplink {spec.url}"
        )
        link.start()

    # -- the relay's channels ------------------------------------------------------

    def set_channel(self, channel: bytes, on: bool) -> bool:
        """A channel gained its first member on this host (``on``) or lost its last; True if that changed anything.

        Called on the relay's loop.
        """
        with self._lock:
            if on == (channel in self.channels):
                return False
            if on:
                try:
                    name = channel.decode("utf-8")
                    self.session.backend.check_channel(name)
                except ValueError as exc:  # UnicodeDecodeError too
                    _ratelimited(("uplink-channel", channel), logging.ERROR,
                                 "uplink %s: channel %r stays on this host: %s", self.spec.url, channel, exc)
                    return False
                self.channels[channel] = name
            else:
                name = self.channels.pop(channel)
        if on:
            self.link.add_member(channel, _MEMBER, _never, None)
            self.link.interest(channel, b">", True)  # every topic: other hosts' interests are not known here
            self.session.add_channel(name)
        else:
            self.link.remove_member(channel, _MEMBER)
            self.session.remove_channel(name)
        return True

    # -- relay -> backplane ---------------------------------------------------------

    def from_relay(self, channel: bytes, worker: int, runs: List[Any]) -> None:
        """Runs a worker of this host published: to the backplane (on the link's reader thread)."""
        name = self.channels.get(channel)
        if name is None:
            return
        session = self.session
        node = session.node
        for origin, to, ns, topic, datas in runs:
            dest: Optional[Destination] = None
            if to:
                dest = _remote(to)  # an answer to a hub of another host
                if dest is None:
                    self.unreachable += len(datas)
                    continue
            address = Address(worker, origin)
            for data in datas:
                # No wait for room: this is the link's reader, and a slow backplane must not slow the relay.
                if session.publish(name, pack(node, address, ns, topic, data, dest), wait=0.0):
                    self.forwarded += 1

    # -- backplane -> relay ---------------------------------------------------------

    def _from_backplane(self, name: str, payload: bytes) -> None:
        unpacked = unpack(payload)
        if unpacked is None:
            self.malformed += 1
            _ratelimited("uplink-malformed", logging.WARNING, "uplink: dropped a payload that is not a clustersync message")
            return
        node, origin, ns, topic, data, to = unpacked
        if node == self.session.node:
            return  # our own echo
        dest = BROADCAST
        to_hub = b""
        if isinstance(to, Address):
            if not 0 <= to.worker < MAX_WORKERS or to.worker == UPLINK_WORKER:
                return  # for a hub outside this host's workers
            dest, to_hub = to.worker, self._name(to.hub)
        elif to is not None:
            if not 0 <= to < MAX_WORKERS:
                return
            dest = to
        channel = self._name(name)
        link = self.link
        link.publish(link.route(channel, dest, to_hub, self._name(f"{origin.worker}/{origin.hub}"), self._name(ns), self._name(topic)), data)
        self.injected += 1

    def _name(self, name: str) -> bytes:
        """Encoded names, one object per name: the link batches runs on identity."""
        encoded = self._names.get(name)
        if encoded is None:
            if len(self._names) >= 4096:
                self._names.clear()
            encoded = self._names[name] = name.encode()
        return encoded

    def _state(self, up: bool, exc: Optional[BaseException]) -> None:
        if up:
            logger.warning("uplink %s: the backplane is back", self.spec.url)
        else:
            logger.error("uplink %s: the backplane is down (%s: %s); the local relay goes on", self.spec.url, type(exc).__name__, exc)

    # -- state ----------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """The session's counters, and what crossed the bridge each way."""
        out = self.session.stats()
        out.update(
            url=self.spec.url,
            channels=sorted(self.channels.values()),
            forwarded=self.forwarded,
            injected=self.injected,
            unreachable=self.unreachable,
            malformed=self.malformed,
        )
        return out

    def close(self) -> None:
        """Close the backplane session and the link."""
        self.session.close()
        self.link.close(timeout=1.0)


def _never(namespace: str, topic: str, origin: Address, datas: List[bytes]) -> None:
    """The uplink's member never delivers: its link hands runs to the bridge."""


def _remote(to: str) -> Optional[Address]:
    """The hub of another host that ``to`` (as this host's hubs see it: ``"<worker>/<hub id>"``) names."""
    worker, sep, hub = to.partition("/")
    try:
        index = int(worker)
    except ValueError:
        return None
    if not sep or not hub:
        return None
    return Address(index, hub)
