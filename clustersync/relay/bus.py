"""The bus: processes the primary did not start join its relay over a Unix socket.

The primary's side is :class:`BusListener`
(``setup_primary_cluster(listen="/run/app/bus.sock")``,
``clustersync run --bus PATH``, ``clustersync relay --bus PATH``):

- The socket is created with mode 0600. Allowing other uids opens it to
  0666, and allowing one group makes it that group's, 0660, so that they
  can reach it at all.
- Each connecting process's credentials are read with ``SO_PEERCRED``.
  Only the same user, or a uid or gid the option allows, gets in. Anyone
  else is refused with one log line and their connection is closed.
- An accepted peer gets a HELLO frame with its index (from
  :data:`FIRST_PEER` up) and the relay's settings. From then on it is a
  worker on the wire: its output in the primary is bounded, it is counted
  in ``stats()``, it is dropped cleanly when it goes, and a garbage frame
  from it disconnects it alone.

The peer's side is :func:`connect`: ``cluster(channel=..., address=PATH)``,
or ``CLUSTERSYNC_BUS=PATH``, in any process on the host. That includes a
gunicorn or uvicorn worker, a cron script or a shell's
``clustersync publish``. One :class:`BusLink` per process and path is
shared by its hubs. When the relay goes away, the link closes and its hubs
are told (``on_backplane(False)``). The process goes on.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._log import RateLimitedLog, logger
from ..message import UPLINK_WORKER
from .link import WorkerLink
from .loop import Loop
from .router import Peer, Router
from .wire import BUS_VERSION, FIRST_PEER, HEADER, HEADER_SIZE, HELLO, STATS, pack_frame

__all__ = ["BusListener", "BusPeer", "BusLink", "connect", "FIRST_PEER", "MAX_PATH", "check_path"]

#: The longest Unix socket path, in bytes.
MAX_PATH = 107
_CRED = struct.Struct("3i")  # pid, uid, gid
_MAX_HELLO = 64 * 1024
_ratelimited = RateLimitedLog()


def check_path(path: object) -> str:
    """Return ``path`` if it can name a Unix socket, else raise ``ValueError``/``TypeError``."""
    if not isinstance(path, str):
        raise TypeError(f"the bus address is a filesystem path (str), not {type(path).__name__}")
    if not path:
        raise ValueError("the bus address is an empty path")
    size = len(os.fsencode(path))
    if size > MAX_PATH:
        raise ValueError(f"the bus path is {size} bytes; a Unix socket path has at most {MAX_PATH}")
    return path


def _peer_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid


# -- the primary's side ------------------------------------------------------------------


class BusPeer(Peer):
    """A process that joined the bus: its credentials and relay counters."""

    def __init__(self, index: int, sock: socket.socket, pid: int, uid: int, gid: int) -> None:
        super().__init__(index, sock)
        self._pid = pid
        self.uid = uid
        self.gid = gid

    @property
    def pid(self) -> int:
        """The peer's process id (from its credentials)."""
        return self._pid

    def stats(self) -> Dict[str, Any]:
        """The peer's relay counters, pid and uid."""
        out = self.counters()
        out.update(pid=self._pid, uid=self.uid)
        return out


class BusListener:
    """The primary's Unix socket: accepts, checks credentials, adds peers to the router."""

    def __init__(
        self,
        loop: Loop,
        router: Router,
        path: str,
        settings: Dict[str, Any],
        allow_uids: Sequence[int] = (),
        allow_gids: Sequence[int] = (),
    ) -> None:
        self.loop = loop
        self.router = router
        self.path = check_path(path)
        self.settings = settings
        self.allow_uids = frozenset(int(u) for u in allow_uids) | {os.getuid()}
        self.allow_gids = frozenset(int(g) for g in allow_gids)
        self.peers: Dict[int, BusPeer] = {}
        self.accepted = 0
        self.refused = 0
        self._next = FIRST_PEER
        self.sock = self._bind(path)
        self.mode = self._open_to(path, [int(u) for u in allow_uids], [int(g) for g in allow_gids])
        self._inode = os.stat(path).st_ino
        loop.register(self.sock, lambda mask: self._accept())

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{path} exists and is not a socket: not replacing it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # a socket nobody listens on: left by a relay that died
            except OSError as exc:  # not ours to judge (another user's relay, most likely): leave it
                raise OSError(exc.errno, f"{path} is a socket this user cannot reach ({exc.strerror}): not replacing it") from None
            else:
                raise OSError(errno.EADDRINUSE, f"a relay already listens on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no moment when another user could connect
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    @staticmethod
    def _open_to(path: str, uids: List[int], gids: List[int]) -> int:
        """Let the allowed users reach the socket (``SO_PEERCRED`` stays the gate); return its mode.

        Only this user: 0600. One allowed group: the socket's group, 0660.
        Other users, or several groups: 0666.
        """
        others = [u for u in uids if u != os.getuid()]
        if not others and not gids:
            return 0o600
        if not others and len(set(gids)) == 1:
            os.chown(path, -1, gids[0])
            mode = 0o660
        else:
            mode = 0o666
        os.chmod(path, mode)
        return mode

    def _free_index(self) -> Optional[int]:
        for _ in range(UPLINK_WORKER - FIRST_PEER):
            index = self._next
            self._next = index + 1 if index + 1 < UPLINK_WORKER else FIRST_PEER
            if index not in self.peers:
                return index
        return None

    def _accept(self) -> None:
        while True:
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _ratelimited("bus-accept", logging.ERROR, "bus %s: accept failed: %s", self.path, exc)
                return
            try:
                self._admit(conn)
            except OSError as exc:
                conn.close()
                _ratelimited("bus-admit", logging.ERROR, "bus %s: a peer could not join: %s", self.path, exc)

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = _peer_credentials(conn)
        if uid not in self.allow_uids and gid not in self.allow_gids:
            self.refused += 1
            conn.close()
            _ratelimited(
                ("bus-refused", uid), logging.WARNING,
                "bus %s: refused pid %d (uid %d, gid %d): not this relay's user, nor an allowed uid or gid",
                self.path, pid, uid, gid,
            )
            return
        index = self._free_index()
        if index is None:
            self.refused += 1
            conn.close()
            _ratelimited("bus-full", logging.ERROR, "bus %s: refused pid %d: every peer index is taken", self.path, pid)
            return
        peer = BusPeer(index, conn, pid, uid, gid)
        self.peers[index] = peer
        self.accepted += 1
        self.router.add(peer)
        body = json.dumps(self.settings, separators=(",", ":")).encode()
        self.router.enqueue_control(peer, pack_frame(HELLO, b"", 0xFFFF, index, body, BUS_VERSION))
        logger.debug("bus %s: pid %d (uid %d) joined as peer %d", self.path, pid, uid, index)

    def gone(self, peer: Peer) -> None:
        """The router disconnected ``peer``: free its index."""
        if self.peers.get(peer.index) is peer:
            del self.peers[peer.index]
            logger.debug("bus %s: peer %d (pid %d) left", self.path, peer.index, peer.pid)

    def answer_stats(self, peer: Peer, number: int, stats: Dict[str, Any]) -> None:
        """Send ``peer`` the relay's counters (STATS request number ``number``)."""
        body = json.dumps(stats, separators=(",", ":"), default=str).encode()
        self.router.enqueue_control(peer, pack_frame(STATS, b"", 0xFFFF, peer.index, body, number))

    def stats(self) -> Dict[str, Any]:
        """The socket's path, what it accepted and refused, and each peer's counters."""
        return {
            "path": self.path,
            "mode": oct(self.mode),
            "accepted": self.accepted,
            "refused": self.refused,
            "peers": [self.peers[i].stats() for i in sorted(self.peers)],
        }

    def close(self) -> None:
        """Disconnect every peer, stop listening, remove the socket file (if it is still ours)."""
        for peer in list(self.peers.values()):
            self.router.disconnect(peer)
        self.loop.unregister(self.sock)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


# -- the peer's side ----------------------------------------------------------------------


class BusLink(WorkerLink):
    """A process's end of the bus: a worker's link that outlives the relay and can ask for stats."""

    path: str

    def _start_bus(self, path: str) -> None:
        self.path = path
        self._stats_seq = 0
        self._stats: Dict[int, Any] = {}
        self._state_watchers: List[Callable[[bool, Optional[BaseException]], Any]] = []
        self.start()

    def watch_state(self, fn: Callable[[bool, Optional[BaseException]], Any]) -> Callable[[], None]:
        """Call ``fn(False, exc)`` when the relay goes away; return the function that stops it."""
        with self._cond:
            self._state_watchers.append(fn)
            closed = self._closed
        if closed:
            fn(False, ConnectionError(f"the bus at {self.path} is closed"))

        def unwatch() -> None:
            with self._cond:
                if fn in self._state_watchers:
                    self._state_watchers.remove(fn)

        return unwatch

    def relay_stats(self, timeout: float = 5.0) -> Dict[str, Any]:
        """The relay's counters (``Primary.stats()``); raises ``TimeoutError`` or ``ConnectionError``."""
        with self._cond:
            self._stats_seq += 1
            number = self._stats_seq
        self._control(STATS, b"", number)
        with self._cond:
            if not self._cond.wait_for(lambda: number in self._stats or self._closed, timeout):
                raise TimeoutError(f"the relay at {self.path} did not answer within {timeout:g} s")
            if number not in self._stats:
                raise ConnectionError(f"the bus at {self.path} closed")
            result: Dict[str, Any] = self._stats.pop(number)
            return result

    def _frame(self, kind: int, channel: bytes, origin: int, dest: int, count: int, body: bytes) -> None:
        if kind == STATS:
            try:
                value = json.loads(body)
            except ValueError:
                value = {"error": "the relay's counters did not parse"}
            with self._cond:
                self._stats[count] = value
                self._cond.notify_all()
            return
        super()._frame(kind, channel, origin, dest, count, body)

    def _on_stop(self) -> None:
        """A process that joined the bus is not the relay's to stop."""

    def _on_eof(self) -> None:
        with self._cond:
            closing = self._closing
            self._closed = True
            self._cond.notify_all()
            watchers = list(self._state_watchers)
        if closing:
            return
        logger.error("the bus at %s closed: hubs on it no longer reach the relay", self.path)
        exc = ConnectionError(f"the bus at {self.path} closed")
        for fn in watchers:
            try:
                fn(False, exc)
            except Exception:
                logger.exception("a bus state watcher failed")

    @property
    def closed(self) -> bool:
        """True once the relay went away or the link was closed."""
        return self._closed


_links: Dict[str, BusLink] = {}
_links_lock = threading.Lock()


def _read_exactly(sock: socket.socket, size: int, path: str) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionRefusedError(
                f"the relay at {path} closed the connection: this user may not join it (see its log)"
            )
        buf += chunk
    return buf


def _read_hello(sock: socket.socket, path: str) -> Tuple[int, Dict[str, Any]]:
    body_len, kind, clen, _origin, index, version = HEADER.unpack(_read_exactly(sock, HEADER_SIZE, path))
    if kind != HELLO or body_len > _MAX_HELLO or clen:
        raise ConnectionError(f"{path} is not a clustersync bus (no HELLO)")
    if version != BUS_VERSION:
        raise ConnectionError(f"the relay at {path} speaks bus version {version}; this is version {BUS_VERSION}")
    try:
        settings = json.loads(_read_exactly(sock, body_len, path))
    except ValueError:
        raise ConnectionError(f"the relay at {path} sent settings that do not parse") from None
    if not isinstance(settings, dict):
        raise ConnectionError(f"the relay at {path} sent settings that are not an object")
    return index, settings


def connect(path: str, timeout: float = 5.0) -> BusLink:
    """This process's link to the bus at ``path``, connecting on first use (or after the relay went away)."""
    path = check_path(path)
    key = os.path.abspath(path)
    with _links_lock:
        link = _links.get(key)
        if link is not None and link.pid == os.getpid() and not link.closed:
            return link
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except FileNotFoundError:
                raise ConnectionRefusedError(
                    f"no bus at {path}: is the relay running (clustersync relay --bus {path})?"
                ) from None
            except PermissionError:
                raise ConnectionRefusedError(f"the bus at {path} is not open to this user (mode 0600)") from None
            index, settings = _read_hello(sock, path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        link = BusLink(
            sock,
            index,
            max_message=int(settings.get("max_message", 0)),
            out_limit=int(settings.get("out_limit", 32 * 1024 * 1024)),
            publish_block=float(settings.get("publish_block", 1.0)),
        )
        link._start_bus(path)
        _links[key] = link
        return link


def _close_links() -> None:
    """At exit: write what the links have pending, then close them."""
    with _links_lock:
        links = [link for link in _links.values() if link.pid == os.getpid()]
        _links.clear()
    for link in links:
        link.close(timeout=2.0)


atexit.register(_close_links)
