"""The Hub in an ASGI app: opened in the app's lifespan, closed at its shutdown.

The one idiom, for Starlette (FastAPI takes the same ``lifespan``)::

    import contextlib
    import clustersync.asgi

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with clustersync.asgi.hub(channel="chat") as hub:
            yield {"hub": hub}  # request.state.hub, websocket.state.hub

    app = Starlette(routes=..., lifespan=lifespan)

Under ``clustersync run`` the hub reaches the hubs of every worker on the
channel (the ``cluster`` driver), and so it does in a process that joins a
primary's bus (``CLUSTERSYNC_BUS`` set: a gunicorn or uvicorn worker);
anywhere else (``uvicorn app:app``, a test client) it reaches the hubs of
this process (``broadcast_channel``), so the same app runs alone, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, AsyncIterator, Optional

from .hub import Hub
from .sync import broadcast_channel, cluster
from .sync.base import DriverFactory
from .sync.cluster import BUS_ENV

__all__ = ["hub", "default_sync"]

#: Seconds :func:`hub` waits for the backplane before the lifespan startup fails.
READY_TIMEOUT = 10.0


def default_sync(channel: str) -> DriverFactory:
    """``cluster(channel=...)`` in a worker of ``clustersync run`` or with ``CLUSTERSYNC_BUS`` set,
    ``broadcast_channel(channel=...)`` elsewhere."""
    from .relay.worker import current_worker  # the relay is loaded only when it is asked about

    if current_worker() is not None or os.environ.get(BUS_ENV):
        return cluster(channel=channel)
    return broadcast_channel(channel=channel)


@contextlib.asynccontextmanager
async def hub(
    *,
    channel: str,
    sync: Optional[DriverFactory] = None,
    ready_timeout: float = READY_TIMEOUT,
    read_on_loop: bool = False,
    **options: Any,
) -> AsyncIterator[Hub]:
    """An async context manager for a lifespan: open a :class:`Hub`, wait until it is ready, close it at the end.

    ``sync`` defaults to :func:`default_sync` of ``channel`` (pass
    ``redis(...)`` or another driver to choose); ``options`` go to
    :class:`Hub` (``namespace``, ``on_error``, ``serializer``...). Raises
    ``RuntimeError`` if the backplane is not ready within ``ready_timeout``
    seconds, which fails the app's startup (and so the worker's boot).
    ``read_on_loop``: the app's event loop reads the worker's pipe
    (:meth:`Hub.read_on_loop`): ``async for`` wakes with no hand-off, and
    callback subscriptions run on the loop.
    """
    opened = Hub(sync=sync if sync is not None else default_sync(channel), **options)
    try:
        if not await asyncio.to_thread(opened.wait_ready, ready_timeout):
            raise RuntimeError(f"the hub on channel {channel!r} was not ready within {ready_timeout} s")
        if read_on_loop:
            opened.read_on_loop()
        yield opened
    finally:
        opened.close()
