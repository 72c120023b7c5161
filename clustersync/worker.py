"""Worker bootstrap and the worker's view of itself."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from . import link as _link

__all__ = ["WorkerContext", "current_worker", "notify_ready"]

ENV_ID = "CLUSTERSYNC_WORKER_ID"
ENV_COUNT = "CLUSTERSYNC_WORKERS"
#: Asynchronous signals, blocked in the link's threads so that they reach the app's.
APP_SIGNALS = {
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH,
}


@dataclass(frozen=True)
class WorkerContext:
    """Who this worker is: ``index`` (0..count-1, reused by a replacement), ``count`` (worker slots), ``pid``."""

    index: int
    count: int
    pid: int


_context: Optional[WorkerContext] = None


def current_worker() -> Optional[WorkerContext]:
    """This worker's context, or None outside a worker forked by a primary."""
    ctx = _context
    if ctx is not None and ctx.pid != os.getpid():
        return None  # a process forked from a worker is not itself a worker
    return ctx


def notify_ready() -> None:
    """Tell the primary this worker is ready (does nothing outside a worker)."""
    link = _link.current_link()
    if link is not None and current_worker() is not None:
        link.notify_ready()


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
    # The link's threads never take these: a signal for the app goes to a thread Python runs handlers on.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, APP_SIGNALS)
    try:
        link.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        target(*args)
    finally:
        link.close(timeout=config["flush_timeout"])
