"""A chat room served by every worker: a message posted to one worker reaches the browsers of all.

Run:  python -m clustersync run examples.chat:main -w 4 --bind 127.0.0.1:8000
Open: http://127.0.0.1:8000 in two browser windows (reload to land on other workers).

    GET  /          the page: a message box and the live list
    GET  /events    the live list as server-sent events (topic "chat")
    POST /messages  {"text": "..."} as JSON, or the form field text

Every response says which worker served it in its X-Worker header. Each
worker serves the shared listening socket(s) with the standard library's
threading HTTP server, and publishes what it is posted on one Hub; every
open /events stream is a subscription to that Hub.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List
from urllib.parse import parse_qs

from clustersync import Hub, SubscriptionClosed, current_worker, listen_sockets, notify_ready
from clustersync.sync import cluster

MAX_TEXT = 500  # characters in one message
MAX_BODY = 16 * 1024  # bytes in one POST body
KEEPALIVE = 15.0  # seconds between comments on an idle event stream

log = logging.getLogger("examples.chat")

PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>clustersync chat</title>
<style>
  body { font: 16px system-ui, sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em; }
  form { display: flex; gap: .5em; }
  input { flex: 1; font: inherit; padding: .3em; }
  #log { list-style: none; padding: 0; }
  #log li { padding: .2em 0; border-bottom: 1px solid #eee; }
  .via { color: #888; font-size: .8em; margin-right: .5em; }
</style>
<h1>clustersync chat</h1>
<p>This page came from worker WORKER. <span id="state">Connecting&hellip;</span></p>
<form id="send" method="post" action="/messages">
  <input name="text" maxlength="MAX_TEXT" autocomplete="off" autofocus placeholder="Say something">
  <button>Send</button>
</form>
<ul id="log"></ul>
<script>
const log = document.getElementById("log");
const state = document.getElementById("state");
const events = new EventSource("/events");
events.onopen = () => { state.textContent = "Live."; };
events.onerror = () => { state.textContent = "Reconnecting\u2026"; };
events.onmessage = (event) => {
  const msg = JSON.parse(event.data);
  const item = document.createElement("li");
  const via = document.createElement("span");
  via.className = "via";
  via.textContent = "worker " + msg.worker;
  item.append(via, msg.text);
  log.prepend(item);
};
document.getElementById("send").onsubmit = async (event) => {
  event.preventDefault();
  const input = event.target.text;
  const response = await fetch("/messages", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({text: input.value}),
  });
  if (response.ok) { input.value = ""; } else { alert(await response.text()); }
};
</script>
</html>
"""


class BadRequest(Exception):
    """The request cannot be served; ``str()`` is the response body."""


class ChatServer(ThreadingHTTPServer):
    """A threading HTTP server on a socket it was given rather than one it binds."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, hub: Hub, worker: int) -> None:
        super().__init__(sock.getsockname(), ChatHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        # Several workers wait on this socket; one that loses the race must not block in accept().
        sock.setblocking(False)
        self.hub = hub
        self.worker = worker
        self.numbers = itertools.count(1)


class ChatHandler(BaseHTTPRequestHandler):
    """``GET /``, ``GET /events``, ``POST /messages``."""

    server: ChatServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setblocking(True)

    def end_headers(self) -> None:
        self.send_header("X-Worker", str(self.server.worker))
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            page = PAGE.replace("WORKER", str(self.server.worker)).replace("MAX_TEXT", str(MAX_TEXT))
            self.reply(200, page.encode(), "text/html; charset=utf-8")
        elif path == "/events":
            self.stream()
        else:
            self.reply(404, b"not found: try GET /, GET /events or POST /messages\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/messages":
            self.reply(404, b"not found: POST to /messages\n", "text/plain; charset=utf-8")
            return
        try:
            text = self.read_text()
        except BadRequest as exc:
            self.close_connection = True  # the body may be unread
            self.reply(400, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        server = self.server
        message = {
            "id": f"{server.worker}-{os.getpid()}-{next(server.numbers)}",
            "text": text,
            "worker": server.worker,
            "time": time.time(),
        }
        server.hub.publish("chat", message)
        self.reply(201, json.dumps(message).encode(), "application/json")

    def read_text(self) -> str:
        """The message text of a POST, checked; raises BadRequest."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("send the message with a Content-Length header") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(f"the body is over {MAX_BODY} bytes")
        body = self.rfile.read(length)
        kind = self.headers.get_content_type()
        text: Any
        if kind == "application/json":
            try:
                data = json.loads(body)
            except ValueError:
                raise BadRequest('the body is not JSON: send {"text": "..."}') from None
            text = data.get("text") if isinstance(data, dict) else None
        elif kind == "application/x-www-form-urlencoded":
            try:
                text = parse_qs(body.decode("utf-8"), keep_blank_values=True).get("text", [None])[0]
            except UnicodeDecodeError:
                raise BadRequest("the form is not UTF-8") from None
        else:
            raise BadRequest('send JSON {"text": "..."} (Content-Type: application/json) or a form field text')
        if not isinstance(text, str):
            raise BadRequest('"text" is missing or not a string')
        text = text.strip()
        if not text:
            raise BadRequest("the text is empty")
        if len(text) > MAX_TEXT:
            raise BadRequest(f"the text is longer than {MAX_TEXT} characters")
        return text

    def stream(self) -> None:
        """Server-sent events: every chat message, from any worker, until the client or the hub goes."""
        hub = self.server.hub
        sub = hub.subscribe("chat")
        # Before the headers: once the relay has the subscription (one round trip when this worker had none
        # on "chat"), nothing is missed.
        hub.wait_ready(5)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(b"retry: 1000\n: connected\n\n")
            self.wfile.flush()
            while True:
                try:
                    msg = sub.get(timeout=KEEPALIVE)
                except TimeoutError:
                    self.wfile.write(b": keepalive\n\n")  # also finds clients that left
                except SubscriptionClosed:
                    return  # the hub closed: this worker is stopping
                else:
                    self.wfile.write(b"data: " + json.dumps(msg.data).encode() + b"\n\n")
                self.wfile.flush()
        except OSError:
            pass  # the client went away
        finally:
            sub.unsubscribe()


def main() -> None:
    """Serve the chat on every socket of ``--bind`` until SIGTERM."""
    sockets = listen_sockets()
    if not sockets:
        raise SystemExit("examples.chat needs a socket: run it with --bind HOST:PORT")
    me = current_worker()
    worker = me.index if me is not None else 0
    hub = Hub(sync=cluster(channel="chat"))
    servers: List[ChatServer] = []
    started: List[ChatServer] = []  # served on threads of their own
    try:
        if not hub.wait_ready(10):
            raise RuntimeError("the chat channel did not come up")
        servers = [ChatServer(sock, hub, worker) for sock in sockets]
        for server in servers[1:]:
            threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
            started.append(server)
        notify_ready()
        # Until SIGTERM, which `clustersync run` turns into SystemExit here.
        servers[0].serve_forever(0.2)
    finally:
        hub.close()  # ends every event stream of this worker
        for server in started:
            server.shutdown()
        for server in servers:
            server.server_close()

