"""``nats``: hubs on any host reach each other through a NATS server.

The client library is nats-py (``pip install "clustersync[nats]"``), which
is asyncio-only: each hub's driver runs it on an event loop of its own, in a
thread of its own, so publishing and delivery keep the hub's threading rules
(``publish`` from any thread, callbacks on the driver's delivery thread)
whether or not the application uses asyncio. nats-py's own reconnection is
turned off: the driver reconnects, resubscribes and pings like every
network driver (see :mod:`clustersync.sync.backplane`).

The channel is a NATS subject: no spaces, no ``*`` or ``>`` tokens, no
empty token. One message is at most the server's ``max_payload`` (1 MiB by
default) with its envelope.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from typing import Any, Coroutine, Deque, Dict, List, Optional, Sequence, Tuple, TypeVar

from ..message import DEFAULT_QUEUE_SIZE, Address, check_channel
from .backplane import BackplaneDriver, Options, check_options
from .base import DriverFactory

__all__ = ["nats", "NatsBackend", "nats_module", "DEFAULT_MAX_PAYLOAD"]

_INSTALL = 'the nats driver needs nats-py: pip install "clustersync[nats]"'
#: The NATS server's default ``max_payload``; the server's own figure replaces it once connected.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
_INBOX = 65_536  # payloads between nats-py's callback and the reader, at most
_TOKEN = re.compile(r"[^\s*>.]+")
T = TypeVar("T")


def nats_module() -> Any:
    """nats-py, or ``ImportError`` naming the install line."""
    try:
        import nats as lib
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return lib


def _check_subject(channel: str) -> None:
    check_channel(channel)
    if not all(_TOKEN.fullmatch(token) for token in channel.split(".")):
        raise ValueError(
            f"a nats channel is a subject without spaces, wildcards (* >) or empty tokens, not {channel!r}"
        )


class _Loop:
    """An asyncio loop on a thread of its own, where nats-py runs."""

    def __init__(self) -> None:
        import asyncio  # only where NATS is used: importing clustersync loads no event loop machinery

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="clustersync-nats-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"nats: no answer within {timeout:g} s") from None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: the driver reports outages itself, once each."""


class _Connection:
    def __init__(self, backend: "NatsBackend", nc: Any) -> None:
        self.backend = backend
        self.nc = nc
        self.subs: Dict[str, Any] = {}
        self.inbox: Deque[Tuple[str, bytes]] = deque()
        self.wake = threading.Event()
        self.overflow = 0

    # -- listening --

    async def _on_msg(self, msg: Any) -> None:
        if len(self.inbox) >= _INBOX:
            self.overflow += 1
            return
        self.inbox.append((msg.subject, msg.data))
        self.wake.set()

    async def _subscribe(self, channels: Sequence[str]) -> None:
        for channel in channels:
            if channel not in self.subs:
                self.subs[channel] = await self.nc.subscribe(channel, cb=self._on_msg)
        await self.nc.flush()  # the server has the subscriptions when this returns

    async def _unsubscribe(self, channels: Sequence[str]) -> None:
        for channel in channels:
            sub = self.subs.pop(channel, None)
            if sub is not None:
                await sub.unsubscribe()

    def subscribe(self, channels: Sequence[str], timeout: float) -> None:
        self.backend.loop.run(self._subscribe(channels), timeout)

    def unsubscribe(self, channels: Sequence[str], timeout: float) -> None:
        self.backend.loop.run(self._unsubscribe(channels), timeout)

    def _check(self) -> None:
        if self.nc.is_closed or not self.nc.is_connected:
            raise ConnectionError("nats: the connection is closed")

    def receive(self, timeout: float) -> List[Tuple[str, bytes]]:
        if not self.inbox:
            self.wake.wait(timeout)
        self.wake.clear()
        items = []
        inbox = self.inbox
        while inbox:
            items.append(inbox.popleft())
        if not items:
            self._check()
        return items

    def ping(self, timeout: float) -> List[Tuple[str, bytes]]:
        self._check()
        self.backend.loop.run(self.nc.flush(timeout), timeout + 0.1)
        return self.receive(0.0)

    # -- sending --

    async def _publish(self, items: Sequence[Tuple[str, bytes]]) -> None:
        publish = self.nc.publish
        for channel, payload in items:
            await publish(channel, payload)

    def publish(self, items: Sequence[Tuple[str, bytes]], timeout: float) -> None:
        self._check()
        self.backend.loop.run(self._publish(items), timeout)

    def close(self) -> None:
        try:
            self.backend.loop.run(self.nc.close(), 2.0)
        except Exception:
            pass


class NatsBackend:
    """Opens NATS connections on the driver's own event loop."""

    name = "nats"

    def __init__(self, lib: Any, servers: List[str], connect_options: Dict[str, Any]) -> None:
        self.lib = lib
        self.servers = servers
        self.connect_options = connect_options
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self._loop: Optional[_Loop] = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> _Loop:
        with self._lock:
            if self._loop is None:
                self._loop = _Loop()
            return self._loop

    async def _connect(self, timeout: float) -> Any:
        nc = await self.lib.connect(
            servers=self.servers,
            allow_reconnect=False,
            connect_timeout=max(1, int(timeout + 0.999)),
            max_reconnect_attempts=1,  # 0 would mean "for ever"; the driver reconnects itself
            reconnect_time_wait=0,
            error_cb=_quiet,
            **self.connect_options,
        )
        self.max_payload = int(nc.max_payload) or DEFAULT_MAX_PAYLOAD
        return nc

    def _open(self, timeout: float) -> _Connection:
        return _Connection(self, self.loop.run(self._connect(timeout), timeout + 1.0))

    def check_channel(self, channel: str) -> None:
        """Raise ``ValueError`` if ``channel`` cannot be a channel here."""
        _check_subject(channel)

    def open_listener(self, timeout: float) -> _Connection:
        return self._open(timeout)

    def open_sender(self, timeout: float) -> _Connection:
        return self._open(timeout)

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()


def nats(
    *,
    channel: str,
    servers: Any = "nats://127.0.0.1:4222",
    queue_size: int = DEFAULT_QUEUE_SIZE,
    connect_options: Optional[Dict[str, Any]] = None,
    **options: Any,
) -> DriverFactory:
    """A driver factory joining hubs on any host through NATS subject ``channel``.

    ``servers`` is a ``nats://`` (or ``tls://``) URL or a list of them.
    ``connect_options`` go to ``nats.connect`` as they are (user, password,
    token, tls, name...), except the reconnection settings, which are the
    driver's. ``options`` as for :func:`clustersync.sync.redis`. Raises
    ``ImportError`` naming the install line without nats-py.
    """
    _check_subject(channel)
    urls = [servers] if isinstance(servers, str) else servers
    if not isinstance(urls, (list, tuple)) or not urls or not all(isinstance(u, str) for u in urls):
        raise TypeError("servers must be a nats:// URL or a list of them")
    for url in urls:
        if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(f"servers must be nats://, tls://, ws:// or wss:// URLs, not {url!r}")
    extra = dict(connect_options or {})
    ours = {"servers", "allow_reconnect", "connect_timeout", "max_reconnect_attempts", "reconnect_time_wait", "error_cb"}
    clash = sorted(ours & set(extra))
    if clash:
        raise ValueError(f"connect_options cannot set {', '.join(clash)}: the driver sets them")
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError("queue_size must be a positive int")
    opts: Options = check_options(**options)
    lib = nats_module()

    def factory(address: Address) -> BackplaneDriver:
        return BackplaneDriver(address, channel, NatsBackend(lib, list(urls), extra), opts, queue_size)

    return factory
