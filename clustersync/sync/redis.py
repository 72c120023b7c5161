"""``redis``: hubs on any host reach each other through a Redis server's pub/sub.

The client library is redis-py (``pip install "clustersync[redis]"``). Each
hub opens two connections of its own, a subscriber and a publisher, with
the settings of the URL or of the client the user passes. The user's client
is never used or closed: it stays theirs. See docs/beyond-one-host.md.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..message import DEFAULT_QUEUE_SIZE, Address, check_channel
from .backplane import BackplaneDriver, Options, check_options
from .base import DriverFactory

__all__ = ["redis", "RedisBackend", "redis_module", "redis_settings"]

_INSTALL = 'the redis driver needs redis-py: pip install "clustersync[redis]"'
# The connection settings carried over from the user's URL or client; the rest (timeouts, retries) are ours.
_KEPT = ("host", "port", "db", "password", "username", "path", "credential_provider", "client_name")
_DRAIN = 1000  # payloads read in one receive at most


def redis_module() -> Any:
    """redis-py, or ``ImportError`` naming the install line."""
    try:
        import redis as lib
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return lib


class _Listener:
    """A subscriber connection: SUBSCRIBE, then messages and PONGs as they come.

    It waits for the socket itself and only then reads one message with the
    whole ``read_timeout``: redis-py 8 applies ``get_message``'s timeout to
    the rest of a message already begun, so a short timeout would break a
    message split across reads.
    """

    def __init__(self, client: Any, read_timeout: float) -> None:
        self.client = client
        self.read_timeout = read_timeout
        self.pubsub = client.pubsub()
        self.pending: List[Tuple[str, bytes]] = []

    def _readable(self, timeout: float) -> bool:
        connection = self.pubsub.connection
        if connection is None:  # nothing subscribed yet: nothing can come
            if timeout > 0:
                time.sleep(timeout)
            return False
        return bool(connection.can_read(timeout=timeout))

    def _next(self, timeout: float) -> Optional[Dict[str, Any]]:
        if not self._readable(timeout):
            return None
        message: Optional[Dict[str, Any]] = self.pubsub.get_message(timeout=self.read_timeout)
        return message

    def _until(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            message = self._next(max(0.0, deadline - time.monotonic()))
            if message is not None:
                if message["type"] == "message":
                    self.pending.append((message["channel"].decode(), message["data"]))
                elif done(message):
                    return
            elif time.monotonic() >= deadline:
                raise TimeoutError(f"redis: no answer to {what} within {timeout:g} s")

    def subscribe(self, channels: Sequence[str], timeout: float) -> None:
        want = set(channels)
        self.pubsub.subscribe(*channels)

        def done(message: Dict[str, Any]) -> bool:
            if message["type"] == "subscribe":
                want.discard(message["channel"].decode())
            return not want

        self._until(done, timeout, "SUBSCRIBE")

    def unsubscribe(self, channels: Sequence[str], timeout: float) -> None:
        self.pubsub.unsubscribe(*channels)

    def receive(self, timeout: float) -> List[Tuple[str, bytes]]:
        items, self.pending = self.pending, []
        message = self._next(0.0 if items else timeout)
        while message is not None:
            if message["type"] == "message":
                items.append((message["channel"].decode(), message["data"]))
                if len(items) >= _DRAIN:
                    break
            message = self._next(0.0)
        return items

    def ping(self, timeout: float) -> List[Tuple[str, bytes]]:
        if not self.pubsub.subscribed:  # no subscriber connection yet: ping on the plain one
            self.client.ping()
            return []
        self.pubsub.ping()
        self._until(lambda m: m["type"] == "pong", timeout, "PING")
        items, self.pending = self.pending, []
        return items

    def close(self) -> None:
        try:
            self.pubsub.close()
        except Exception:
            pass
        _disconnect(self.client)


class _Sender:
    """A publisher connection: a batch of PUBLISH commands in one round trip."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def publish(self, items: Sequence[Tuple[str, bytes]], timeout: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for channel, payload in items:
            pipe.publish(channel, payload)
        pipe.execute()

    def close(self) -> None:
        _disconnect(self.client)


def _disconnect(client: Any) -> None:
    """Close the client's sockets now (the pool is the driver's own: closing the client alone leaves them open)."""
    try:
        client.close()
        client.connection_pool.disconnect()
    except Exception:
        pass


class RedisBackend:
    """Opens Redis connections with the user's settings and the driver's timeouts."""

    name = "redis"
    #: Redis's own limit on one bulk string.
    max_payload = 512 * 1024 * 1024

    def __init__(self, lib: Any, connection_class: Any, settings: Dict[str, Any]) -> None:
        self.lib = lib
        self.connection_class = connection_class
        self.settings = settings

    def _client(self, timeout: float) -> Any:
        lib = self.lib
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pool = lib.ConnectionPool(
            connection_class=self.connection_class,
            socket_timeout=max(timeout, 0.1),
            socket_connect_timeout=max(timeout, 0.1),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **self.settings,
        )
        return lib.Redis(connection_pool=pool)

    def check_channel(self, channel: str) -> None:
        """Raise ``ValueError`` if ``channel`` cannot be a channel here."""
        check_channel(channel)

    def open_listener(self, timeout: float) -> _Listener:
        client = self._client(timeout)
        listener = _Listener(client, max(timeout, 0.1))
        try:
            listener.ping(timeout)  # connects, and proves the server answers
        except BaseException:
            listener.close()
            raise
        return listener

    def open_sender(self, timeout: float) -> _Sender:
        client = self._client(timeout)
        try:
            client.ping()
        except BaseException:
            client.close()
            raise
        return _Sender(client)

    def close(self) -> None:
        """Nothing beyond the connections."""


def redis_settings(url: Optional[str], client: Any) -> Tuple[Any, Dict[str, Any], Any]:
    """The connection class and settings of ``url`` or ``client``, and redis-py itself."""
    lib = redis_module()
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be a redis://, rediss:// or unix:// URL, not {url!r}")
        pool = lib.ConnectionPool.from_url(url)
    else:
        if not isinstance(client, lib.Redis):
            raise TypeError(
                f"client must be a redis.Redis (redis-py's synchronous client), not {type(client).__name__}"
            )
        pool = client.connection_pool
    kwargs = pool.connection_kwargs
    settings = {k: kwargs[k] for k in kwargs if k in _KEPT or k.startswith("ssl")}
    return pool.connection_class, settings, lib


def redis(
    *,
    channel: str,
    url: Optional[str] = None,
    client: Any = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    **options: Any,
) -> DriverFactory:
    """A driver factory joining hubs on any host through Redis pub/sub channel ``channel``.

    Give ``url`` (``redis://[:password@]host:port/db``, ``rediss://`` or
    ``unix://``) or ``client``, a ``redis.Redis`` whose connection settings
    are copied; the client itself is left alone and stays the caller's to
    close. ``queue_size`` bounds each hub's delivery queue. ``options``:
    ``ping_interval``, ``ping_timeout``, ``reconnect_min``,
    ``reconnect_max`` (seconds), ``max_queued_bytes`` (see docs/beyond-one-host.md).
    Raises ``ImportError`` naming the install line without redis-py.
    """
    check_channel(channel)
    if (url is None) == (client is None):
        raise TypeError("redis() takes url= or client=, exactly one of them")
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError("queue_size must be a positive int")
    opts: Options = check_options(**options)
    connection_class, settings, lib = redis_settings(url, client)

    def factory(address: Address) -> BackplaneDriver:
        return BackplaneDriver(address, channel, RedisBackend(lib, connection_class, settings), opts, queue_size)

    return factory
