"""A bare ASGI 3 app (no framework) for the runner's ASGI tests.

    GET /          "worker INDEX pid PID"
    GET /slow?s=N  the same, after N seconds (a request in flight across a stop)

``fails_startup`` is the same app whose lifespan startup fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Dict
from urllib.parse import parse_qs

from clustersync import current_worker

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]

log = logging.getLogger("tests.asgi")


async def _lifespan(receive: Receive, send: Send, fail: bool) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if fail:
                await send({"type": "lifespan.startup.failed", "message": "startup failed on purpose"})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _serve(scope: Scope, receive: Receive, send: Send, fail: bool) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send, fail)
        return
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        seconds = float(parse_qs(scope["query_string"].decode()).get("s", ["1"])[0])
        log.info("slow request: %.1f s", seconds)
        await asyncio.sleep(seconds)
    me = current_worker()
    body = f"worker {me.index if me else -1} pid {os.getpid()}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    await _serve(scope, receive, send, False)


async def fails_startup(scope: Scope, receive: Receive, send: Send) -> None:
    await _serve(scope, receive, send, True)
