"""Listening sockets that the primary opens and the workers inherit.

``clustersync run --bind ADDRESS`` binds each address once in the primary;
every worker gets the same socket, and the kernel hands each new connection
to one of the workers waiting on it. With ``--reuse-port`` the primary binds
a socket of its own (``SO_REUSEPORT``) for each worker instead, and the
kernel spreads connections across them.

In a worker, :func:`listen_sockets` returns the sockets, in ``--bind`` order.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import List, NamedTuple, Optional, Sequence

__all__ = ["Address", "listen_sockets", "parse_address", "bind", "describe", "with_port"]

BACKLOG = 1024

_sockets: List[socket.socket] = []


def listen_sockets() -> List[socket.socket]:
    """The listening sockets of this worker, in ``--bind`` order (empty outside ``clustersync run``).

    They are in blocking mode. A server that waits for readiness (select,
    selectors, asyncio) before calling ``accept()`` should make them
    non-blocking: with a shared socket another worker may take the
    connection first, and a blocking ``accept()`` would then wait for the
    next one.
    """
    return list(_sockets)


def _install(sockets: Sequence[socket.socket]) -> None:
    """Called by the worker bootstrap with the sockets the primary passed."""
    _sockets[:] = sockets


class Address(NamedTuple):
    """A parsed ``--bind`` value: TCP ``host``/``port``, or a Unix socket ``path``."""

    spec: str
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse_address(spec: str) -> Address:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` (all interfaces) or ``unix:PATH``.

    Raises ``ValueError`` with a message fit for the command line.
    """
    if spec.startswith("unix:"):
        path = spec[len("unix:") :]
        if not path:
            raise ValueError(f"{spec!r}: unix: needs a path, as in unix:/tmp/app.sock")
        return Address(spec, path=os.path.abspath(path))
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        raise ValueError(f"{spec!r} is not HOST:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{spec!r}: write an IPv6 address in brackets, as in [::1]:8000")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{spec!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{spec!r}: the port must be from 0 to 65535")
    return Address(spec, host=host or "0.0.0.0", port=port)


def bind(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """Open a listening socket on ``address``; raise ``OSError`` with the address in the message."""
    if address.path is not None:
        return _bind_unix(address.path)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {address.host!r}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address.spec}: {exc.strerror or exc}") from None
    return sock


#: The mode of a ``unix:`` listening socket: the owner and the group may connect, nobody else.
UNIX_MODE = 0o660
#: The longest path a unix socket can have (``sun_path`` holds 108 bytes with the final NUL).
MAX_UNIX_PATH = 107


def _bind_unix(path: str) -> socket.socket:
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"cannot listen on unix:{path}: the path is {size} bytes; a unix socket path is at most {MAX_UNIX_PATH}",
        )
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"cannot listen on unix:{path}: the file exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a server that is gone
        except OSError:
            pass
        else:
            raise OSError(errno.EADDRINUSE, f"cannot listen on unix:{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o777 & ~UNIX_MODE)  # the file is created with UNIX_MODE: no moment with more
    try:
        sock.bind(path)
        os.chmod(path, UNIX_MODE)  # the same, whatever the umask was
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    finally:
        os.umask(umask)
    return sock


def with_port(address: Address, port: int) -> Address:
    """``address`` with its port 0 replaced by the port the first bind got."""
    if address.port == 0:
        return address._replace(port=port)
    return address


def describe(sock: socket.socket) -> str:
    """Where ``sock`` listens, in ``--bind`` syntax: ``127.0.0.1:8000``, ``[::1]:8000``, ``unix:/path``."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
