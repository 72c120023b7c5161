"""A worker's start and its view of itself: bootstrap, the worker context, the orphan policy.

:func:`bootstrap` runs first in every new worker process. It sets the
worker's signal mask, wires the :class:`~clustersync.relay.link.WorkerLink`
and installs it as the process's cluster transport (the ``cluster`` driver
finds it there), runs the target, and flushes. The orphan policy lives in
the link: when the primary's end of the pipe closes, the worker gets SIGTERM
and, a second later, exits with status 1 whatever it is doing.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..sync import base as _base
from . import link as _link

__all__ = ["WorkerContext", "current_worker", "notify_ready", "bootstrap"]

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
    _base.install_cluster_transport(link)
    link.start()  # its threads start with the asynchronous signals blocked
    try:
        target(*args)
    finally:
        link.close(timeout=config["flush_timeout"])
