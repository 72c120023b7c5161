"""``postgres``: hubs on any host reach each other through PostgreSQL's LISTEN/NOTIFY.

The client library is psycopg 3 (``pip install "clustersync[postgres]"``).
Each hub opens two connections of its own in autocommit mode: one that
LISTENs, one that NOTIFYs. A connection the user passes is only read for its
settings and stays theirs; a pool is refused, since LISTEN needs one
dedicated session.

PostgreSQL limits a NOTIFY payload to 8000 bytes and a channel name to 63
bytes (LISTEN would silently truncate a longer one). The channel is checked
when the factory is made and always quoted as an identifier. A message is
carried as base64 text, split into as many NOTIFYs as it needs, all sent in
one transaction, and put back together on receipt: any message up to the
hub's ``max_message`` arrives whole, binary-safe.

Every round trip (LISTEN, NOTIFY, the ping) runs on libpq's non-blocking
interface with a deadline, so a frozen server is noticed, never waited for.
"""

from __future__ import annotations

import base64
import os
import select
import time
from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

from ..message import DEFAULT_MAX_MESSAGE, DEFAULT_QUEUE_SIZE, Address, check_channel
from .backplane import BackplaneDriver, Options, check_options
from .base import DriverFactory

__all__ = ["postgres", "PostgresBackend", "psycopg_module", "MAX_CHANNEL_BYTES", "NOTIFY_LIMIT"]

_INSTALL = 'the postgres driver needs psycopg 3: pip install "clustersync[postgres]"'
#: PostgreSQL's longest identifier: a longer LISTEN channel would be truncated.
MAX_CHANNEL_BYTES = 63
#: PostgreSQL's largest NOTIFY payload (bytes, less one).
NOTIFY_LIMIT = 7999
_CHUNK = NOTIFY_LIMIT - 64  # base64 text per NOTIFY, leaving room for the chunk header
_MAX_PARTIAL = 64  # messages being put back together at once, at most
_PER_QUERY = 64  # NOTIFYs sent in one query at most (one transaction holds a whole batch)


def psycopg_module() -> Any:
    """psycopg, or ``ImportError`` naming the install line."""
    try:
        import psycopg
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return psycopg


def _quote(channel: str) -> str:
    return '"' + channel.replace('"', '""') + '"'


def _run(pgconn: Any, query: bytes, timeout: float, notes: List[Tuple[str, bytes]]) -> None:
    """Run ``query`` (simple protocol) with a deadline; notifications read meanwhile go to ``notes``."""
    from psycopg import pq

    pgconn.send_query(query)  # raises psycopg.OperationalError on a closed connection
    deadline = time.monotonic() + timeout
    sock = pgconn.socket
    while pgconn.flush() != 0:  # the query may not fit the socket at once
        _wait(sock, deadline, write=True)
    error: Optional[str] = None
    while True:
        while pgconn.is_busy():
            _wait(sock, deadline)
            pgconn.consume_input()
            _notes(pgconn, notes)
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = result.error_message.decode(errors="replace").strip()
    _notes(pgconn, notes)
    if pgconn.status != pq.ConnStatus.OK:
        raise ConnectionError("postgres: the connection is closed")
    if error is not None:
        raise ConnectionError(f"postgres: {error}")


def _wait(sock: int, deadline: float, write: bool = False) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("postgres: no answer within the deadline")
    r, w, _x = select.select([] if write else [sock], [sock] if write else [], [], left)
    if not r and not w:
        raise TimeoutError("postgres: no answer within the deadline")


def _notes(pgconn: Any, notes: List[Tuple[str, bytes]]) -> None:
    while True:
        n = pgconn.notifies()
        if n is None:
            return
        notes.append((n.relname.decode(), n.extra))


class _Assembler:
    """Puts split messages back together: bounded in messages, and in bytes by ``max_bytes`` each."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.partial: "OrderedDict[Tuple[str, bytes], List[bytes]]" = OrderedDict()
        self.dropped = 0

    def add(self, channel: str, text: bytes) -> Optional[bytes]:
        """Return the whole payload once its last part is in, else None. Malformed parts are dropped."""
        try:
            head, index_s, total_s, chunk = text.split(b".", 3)
            index, total = int(index_s), int(total_s)
        except ValueError:
            self.dropped += 1
            return None
        if total == 1 and index == 0:
            return self._decode(chunk)
        key = (channel, head)
        parts = self.partial.get(key)
        if index == 0:
            if parts is not None:
                self.dropped += 1  # a message whose end never came
            parts = self.partial[key] = []
            while len(self.partial) > _MAX_PARTIAL:
                self.partial.popitem(last=False)
                self.dropped += 1
        elif parts is None or len(parts) != index:
            self.dropped += 1
            self.partial.pop(key, None)
            return None
        parts.append(chunk)
        if len(parts) * _CHUNK > self.max_bytes * 4 // 3 + _CHUNK:
            self.partial.pop(key, None)
            self.dropped += 1
            return None
        if index + 1 < total:
            return None
        del self.partial[key]
        return self._decode(b"".join(parts))

    def _decode(self, chunk: bytes) -> Optional[bytes]:
        try:
            return base64.b64decode(chunk, validate=True)
        except ValueError:
            self.dropped += 1
            return None


class _Listener:
    def __init__(self, conn: Any, max_message: int) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.notes: List[Tuple[str, bytes]] = []
        self.assembler = _Assembler(max_message + 4096)

    def subscribe(self, channels: Sequence[str], timeout: float) -> None:
        _run(self.pgconn, ";".join(f"LISTEN {_quote(c)}" for c in channels).encode(), timeout, self.notes)

    def unsubscribe(self, channels: Sequence[str], timeout: float) -> None:
        _run(self.pgconn, ";".join(f"UNLISTEN {_quote(c)}" for c in channels).encode(), timeout, self.notes)

    def _whole(self) -> List[Tuple[str, bytes]]:
        notes, self.notes = self.notes, []
        out = []
        for channel, text in notes:
            payload = self.assembler.add(channel, text)
            if payload is not None:
                out.append((channel, payload))
        return out

    def receive(self, timeout: float) -> List[Tuple[str, bytes]]:
        from psycopg import pq

        pgconn = self.pgconn
        if not self.notes:
            r, _w, _x = select.select([pgconn.socket], [], [], timeout)
            if r:
                pgconn.consume_input()
                if pgconn.status != pq.ConnStatus.OK:
                    raise ConnectionError("postgres: the connection is closed")
        _notes(pgconn, self.notes)
        return self._whole()

    def ping(self, timeout: float) -> List[Tuple[str, bytes]]:
        _run(self.pgconn, b"SELECT 1", timeout, self.notes)
        return self._whole()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class _Sender:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.head = os.urandom(6).hex()  # this sender's parts are told apart from any other's by it
        self.number = 0
        self.sink: List[Tuple[str, bytes]] = []

    def _notifies(self, channel: str, payload: bytes) -> List[str]:
        text = base64.b64encode(payload).decode("ascii")
        self.number += 1
        head = f"{self.head}{self.number:x}"
        total = max(1, -(-len(text) // _CHUNK))
        quoted = _quote(channel)
        return [f"NOTIFY {quoted}, '{head}.{i}.{total}.{text[i * _CHUNK:(i + 1) * _CHUNK]}'" for i in range(total)]

    def publish(self, items: Sequence[Tuple[str, bytes]], timeout: float) -> None:
        statements: List[str] = []
        for channel, payload in items:
            statements.extend(self._notifies(channel, payload))
        deadline = time.monotonic() + timeout
        pgconn = self.conn.pgconn
        # One transaction: every part of every message commits, and is delivered, together and in order.
        _run(pgconn, b"BEGIN", timeout, self.sink)
        try:
            for start in range(0, len(statements), _PER_QUERY):
                left = max(0.001, deadline - time.monotonic())
                _run(pgconn, ";".join(statements[start:start + _PER_QUERY]).encode(), left, self.sink)
            _run(pgconn, b"COMMIT", max(0.001, deadline - time.monotonic()), self.sink)
        except BaseException:
            self.close()  # a half-sent transaction is not reused
            raise
        self.sink.clear()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class PostgresBackend:
    """Opens PostgreSQL connections from a conninfo string, with the driver's deadlines."""

    name = "postgres"

    def __init__(self, lib: Any, conninfo: str, max_message: int) -> None:
        self.lib = lib
        self.conninfo = conninfo
        #: The driver splits messages, so the limit is the hub's, not NOTIFY's.
        self.max_payload = max_message + 1024

    def _connect(self, timeout: float) -> Any:
        # libpq's connect_timeout is whole seconds, 2 at the least.
        return self.lib.connect(self.conninfo, autocommit=True, connect_timeout=max(2, int(timeout + 0.999)))

    def check_channel(self, channel: str) -> None:
        """Raise ``ValueError`` if ``channel`` cannot be a channel here."""
        _check_pg_channel(channel)

    def open_listener(self, timeout: float) -> _Listener:
        return _Listener(self._connect(timeout), self.max_payload)

    def open_sender(self, timeout: float) -> _Sender:
        return _Sender(self._connect(timeout))

    def close(self) -> None:
        """Nothing beyond the connections."""


def _check_pg_channel(channel: str) -> None:
    check_channel(channel)
    size = len(channel.encode("utf-8"))
    if size > MAX_CHANNEL_BYTES:
        raise ValueError(
            f"a postgres channel is at most {MAX_CHANNEL_BYTES} bytes (PostgreSQL would truncate it); "
            f"{channel!r} is {size}"
        )
    if "\0" in channel:
        raise ValueError("a postgres channel cannot contain NUL")


def _conninfo(lib: Any, connection: Any) -> str:
    if not isinstance(connection, lib.Connection):
        kind = type(connection).__name__
        why = " (a pool is refused: LISTEN needs one dedicated connection)" if "Pool" in kind else ""
        raise TypeError(f"connection must be a psycopg.Connection, not {kind}{why}")
    info = connection.info
    params = info.get_parameters()
    password = info.password
    if password:
        params["password"] = password
    return str(lib.conninfo.make_conninfo(**params))


def postgres(
    *,
    channel: str,
    conninfo: Optional[str] = None,
    connection: Any = None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    **options: Any,
) -> DriverFactory:
    """A driver factory joining hubs on any host through PostgreSQL LISTEN/NOTIFY on ``channel``.

    Give ``conninfo`` (``postgresql://user@host:port/db`` or ``key=value``
    text) or ``connection``, a ``psycopg.Connection`` whose settings are
    copied; it is left alone and stays the caller's. ``channel`` is at most
    63 bytes. ``max_message`` bounds one message (split over NOTIFYs of at
    most 8000 bytes). ``options`` as for :func:`clustersync.sync.redis`.
    Raises ``ImportError`` naming the install line without psycopg.
    """
    _check_pg_channel(channel)
    if (conninfo is None) == (connection is None):
        raise TypeError("postgres() takes conninfo= or connection=, exactly one of them")
    if conninfo is not None and not isinstance(conninfo, str):
        raise TypeError(f"conninfo must be a str, not {type(conninfo).__name__}")
    if isinstance(max_message, bool) or not isinstance(max_message, int) or max_message < 1:
        raise ValueError("max_message must be a positive int")
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError("queue_size must be a positive int")
    opts: Options = check_options(**options)
    lib = psycopg_module()
    if conninfo is not None:
        try:
            lib.conninfo.conninfo_to_dict(conninfo)
        except lib.ProgrammingError as exc:
            raise ValueError(f"conninfo is not valid: {exc}") from None
        info = conninfo
    else:
        info = _conninfo(lib, connection)

    def factory(address: Address) -> BackplaneDriver:
        return BackplaneDriver(address, channel, PostgresBackend(lib, info, max_message), opts, queue_size)

    return factory
