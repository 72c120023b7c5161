"""A WebSocket chat on Starlette, served by uvicorn in every worker: a message from any browser reaches all.

Run:  python -m clustersync run examples.chat_asgi:app -w 4 --bind 127.0.0.1:8000
      (pip install "clustersync[examples]" first: Starlette, uvicorn, websockets)
Open: http://127.0.0.1:8000 in two browser windows (reload to land on other workers).

    GET /        the page: which worker served it, a message box and the live list
    GET /whoami  {"worker": index, "pid": pid} of the worker that answers
    WS  /ws      the chat: the server first sends {"type": "hello", "worker": index},
                 then every chat message {"type": "message", "id", "text", "worker", "time"};
                 the client sends {"text": "..."}; a bad one is answered {"type": "error", "error"}

Each worker opens one hub in the app's lifespan (clustersync.asgi.hub) and
subscribes to the topic "chat" once; that subscription feeds the worker's
own WebSocket clients. A message from a client is published on the hub:
the hub's own subscription delivers it to this worker's clients, and the
relay to every other worker's hub, so every client gets it exactly once.
Run alone (``uvicorn examples.chat_asgi:app``) the same app is one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Dict, Optional, Set

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import clustersync.asgi
from clustersync import Hub, Message, current_worker

MAX_TEXT = 500  # characters in one message
CLIENT_QUEUE = 256  # messages waiting for one slow client before it is disconnected

log = logging.getLogger("examples.chat_asgi")

PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>clustersync chat (ASGI)</title>
<style>
  body { font: 16px system-ui, sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em; }
  form { display: flex; gap: .5em; }
  input { flex: 1; font: inherit; padding: .3em; }
  #messages { list-style: none; padding: 0; }
  #messages li { padding: .2em 0; border-bottom: 1px solid #eee; }
  .via { color: #888; font-size: .8em; margin-right: .5em; }
</style>
<h1>clustersync chat (ASGI)</h1>
<p>This page came from worker <span id="worker">WORKER</span>;
   the WebSocket is served by worker <span id="ws-worker">?</span>.
   <span id="state">Connecting&hellip;</span></p>
<form id="form">
  <input id="text" maxlength="MAX_TEXT" autocomplete="off" autofocus placeholder="Say something">
  <button id="send" type="submit">Send</button>
</form>
<ul id="messages"></ul>
<script>
const messages = document.getElementById("messages");
const state = document.getElementById("state");
const text = document.getElementById("text");
let socket;
function connect() {
  socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  socket.onopen = () => { state.textContent = "Live."; };
  socket.onclose = () => { state.textContent = "Reconnecting\\u2026"; setTimeout(connect, 1000); };
  socket.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "hello") {
      document.getElementById("ws-worker").textContent = msg.worker;
    } else if (msg.type === "message") {
      const item = document.createElement("li");
      item.dataset.id = msg.id;
      const via = document.createElement("span");
      via.className = "via";
      via.textContent = "worker " + msg.worker;
      item.append(via, msg.text);
      messages.prepend(item);
    } else if (msg.type === "error") {
      alert(msg.error);
    }
  };
}
document.getElementById("form").onsubmit = (event) => {
  event.preventDefault();
  if (text.value.trim() && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({text: text.value}));
    text.value = "";
  }
};
connect();
</script>
</html>
"""


def worker_index() -> int:
    """This worker's index; 0 when the app runs alone."""
    me = current_worker()
    return me.index if me is not None else 0


class Room:
    """The WebSocket clients of this worker, fed by one subscription to the hub's "chat" topic."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.loop = asyncio.get_running_loop()
        self.clients: Set["asyncio.Queue[Optional[Dict[str, Any]]]"] = set()
        self.numbers = itertools.count(1)
        self.worker = worker_index()
        hub.subscribe("chat", self._deliver)  # on this loop (read_on_loop), or on the driver's thread when alone

    def _deliver(self, msg: Message) -> None:
        self.loop.call_soon_threadsafe(self._fan_out, msg.data)  # correct from any thread

    def _fan_out(self, data: Dict[str, Any]) -> None:
        for queue in list(self.clients):
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:  # a client that does not read: let it go, keep the others going
                self.clients.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    def say(self, text: str) -> None:
        """Publish a chat message: this worker's clients and every other worker's get it once."""
        self.hub.publish(
            "chat",
            {
                "type": "message",
                "id": f"{self.worker}-{os.getpid()}-{next(self.numbers)}",
                "text": text,
                "worker": self.worker,
                "time": time.time(),
            },
        )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[Dict[str, Any]]:
    # read_on_loop: this loop reads the worker's pipe, so the room's callback runs here, with no thread between.
    async with clustersync.asgi.hub(channel="chat", read_on_loop=True) as hub:
        room = Room(hub)
        await asyncio.to_thread(hub.wait_ready, 10)  # the relay has the room's subscription: serve after it
        yield {"room": room}


async def page(request: Request) -> HTMLResponse:
    html = PAGE.replace("WORKER", str(worker_index())).replace("MAX_TEXT", str(MAX_TEXT))
    return HTMLResponse(html, headers={"X-Worker": str(worker_index())})


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"worker": worker_index(), "pid": os.getpid()}, headers={"X-Worker": str(worker_index())})


def check_text(raw: Any) -> str:
    """The text of a client's message (JSON ``{"text": "..."}``); raises ValueError with the reason."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise ValueError('send JSON: {"text": "..."}') from None
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        raise ValueError('send {"text": "..."}')
    text = text.strip()
    if not text:
        raise ValueError("the text is empty")
    if len(text) > MAX_TEXT:
        raise ValueError(f"the text is longer than {MAX_TEXT} characters")
    return text


async def chat(websocket: WebSocket) -> None:
    room: Room = websocket.state.room
    await websocket.accept()
    queue: "asyncio.Queue[Optional[Dict[str, Any]]]" = asyncio.Queue(CLIENT_QUEUE)
    room.clients.add(queue)  # before the hello: once the client has it, it misses nothing

    async def send() -> None:
        await websocket.send_json({"type": "hello", "worker": room.worker})
        while (data := await queue.get()) is not None:
            await websocket.send_json(data)
        await websocket.close(code=1013)  # too slow: try again later

    async def receive() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                room.say(check_text(message.get("text") or message.get("bytes") or ""))
            except ValueError as exc:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait({"type": "error", "error": str(exc)})

    tasks = [asyncio.ensure_future(send()), asyncio.ensure_future(receive())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        room.clients.discard(queue)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                await task


app = Starlette(
    routes=[Route("/", page), Route("/whoami", whoami), WebSocketRoute("/ws", chat)],
    lifespan=lifespan,
)
