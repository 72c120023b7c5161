"""A worker's start and its view of itself: bootstrap, the worker context, the orphan policy.

:func:`bootstrap` runs first in every new worker process. It asks the
kernel to kill the worker with its parent, makes it the leader of a process
group of its own (so that the primary can stop whatever the worker starts,
with it), wires the
:class:`~clustersync.relay.link.WorkerLink` and installs it as the
process's cluster transport (the ``cluster`` driver finds it there), runs
the target, and flushes.

The orphan policy has two parts. On Linux the kernel's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``) kills the worker the moment its
parent dies, whatever it is doing, even inside a C call that holds the GIL
(the parent is the primary, or under ``forkserver`` the forkserver, which
exits when the primary does). Everywhere, when the primary's end of the
pipe closes, the link SIGTERMs the worker and hard-exits it a second later.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..sync import base as _base
from . import link as _link

__all__ = ["WorkerContext", "current_worker", "notify_ready", "bootstrap"]

PR_SET_PDEATHSIG = 1

ENV_ID = "CLUSTERSYNC_WORKER_ID"
ENV_COUNT = "CLUSTERSYNC_WORKERS"


@dataclass(frozen=True)
class WorkerContext:
    """Who this worker is: ``index`` (0..count-1, reused by a replacement), ``count`` (worker slots), ``pid``."""

    index: int
    count: int
    pid: int


_context: Optional[WorkerContext] = None


def current_worker() -> Optional[WorkerContext]:
    """This worker's context, or None outside a worker started by a primary."""
    ctx = _context
    if ctx is not None and ctx.pid != os.getpid():
        return None  # a process forked from a worker is not itself a worker
    return ctx


def notify_ready() -> None:
    """Tell the primary this worker is ready (does nothing outside a worker)."""
    link = _link.current_link()
    if link is not None and current_worker() is not None:
        link.notify_ready()


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent dies; True if it will (Linux only).

    If the parent died before the request took effect, exit at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent is already gone: the signal will never come
        os._exit(1)
    return True


def _release_forkserver() -> None:
    """Close this worker's copy of the primary's keep-alive pipe to the forkserver.

    multiprocessing hands every process the forkserver starts the write end
    of that pipe, and the forkserver exits only when every copy is closed.
    Held here, it would keep the forkserver (this worker's parent) alive after
    the primary died, and the parent-death signal would never come. A worker
    that starts processes of its own with forkserver gets a forkserver of its own.
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None
    server._forkserver_address = None
    server._forkserver_pid = None


def bootstrap(
    target: Callable[..., Any],
    args: Tuple[Any, ...],
    sock: socket.socket,
    index: int,
    count: int,
    config: Dict[str, Any],
) -> None:
    """Run in the new worker process: wire the link, run ``target(*args)``, flush."""
    global _context
    if config["start_method"] == "forkserver":
        _release_forkserver()
    die_with_parent()
    try:
        os.setpgid(0, 0)  # a process group of its own: the primary stops its children with it
    except OSError:  # already a group or session leader
        pass
    os.environ[ENV_ID] = str(index)
    os.environ[ENV_COUNT] = str(count)
    _context = WorkerContext(index, count, os.getpid())
    link = _link.WorkerLink(
        sock,
        index,
        max_message=config["max_message"],
        out_limit=config["out_limit"],
        publish_block=config["publish_block"],
    )
    _link._set_current(link)
    _base.install_cluster_transport(link)
    link.start()  # its threads start with the asynchronous signals blocked
    try:
        target(*args)
    finally:
        link.close(timeout=config["flush_timeout"])
