"""A bare ASGI 3 app (no framework) whose workers share a clustersync bus: tests/test_bus.py.

Run it under uvicorn or gunicorn with ``CLUSTERSYNC_BUS=PATH`` in the
environment and ``clustersync relay --bus PATH`` running (docs/web-apps.md).
Its lifespan opens ``Hub(sync=cluster(channel="app"))``, which joins the bus
named by ``CLUSTERSYNC_BUS``, and keeps what arrives on ``"news"``.

    GET /pid       this worker's pid
    POST /publish  publish the JSON body on "news" (a JSON list: each item, in order)
    GET /seen      the JSON list of what this worker's hub received on "news"

Every response names the worker that answered in its ``x-pid`` header.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Awaitable, Callable, Dict, List

from clustersync import Hub
from clustersync.sync import cluster

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]

#: This worker's hub and what it received (a worker is a process: module state is per worker).
state: Dict[str, Any] = {}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            seen: List[Any] = []
            hub = Hub(sync=cluster(channel="app"))  # the bus: CLUSTERSYNC_BUS
            hub.subscribe("news", lambda msg: seen.append(msg.data))
            if not await asyncio.to_thread(hub.wait_ready, 10.0):
                hub.close()
                await send({
                    "type": "lifespan.startup.failed",
                    "message": "could not join the bus: is CLUSTERSYNC_BUS set, and the relay running?",
                })
                return
            state.update(hub=hub, seen=seen)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            hub = state.pop("hub", None)
            if hub is not None:
                hub.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _respond(send: Send, status: int, value: Any) -> None:
    body = json.dumps(value).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-pid", str(os.getpid()).encode()),
        ],
    })
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    if method == "GET" and path == "/pid":
        await _respond(send, 200, os.getpid())
    elif method == "GET" and path == "/seen":
        await _respond(send, 200, list(state["seen"]))
    elif method == "POST" and path == "/publish":
        value = json.loads(await _body(receive))
        for item in value if isinstance(value, list) else [value]:
            state["hub"].publish("news", item)
        await _respond(send, 200, os.getpid())
    else:
        await _respond(send, 404, "not found")
