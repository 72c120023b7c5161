"""`python -m clustersync run examples.chat:main`: the README's example, end to end."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import List

import pytest

from .runner_harness import SSE, Run, open_streams, post, request, wait_gone


@pytest.mark.timeout(40)
def test_a_message_posted_to_one_worker_reaches_every_stream_once() -> None:
    with Run("examples.chat:main", "-w", "4", "--bind", "127.0.0.1:0") as run:
        port = run.port()
        pids = run.ready(4)
        streams: List[SSE] = []
        try:
            streams = open_streams(port, 3, per_worker=2)
            sent = [post(port, f"hello {i}") for i in range(3)]
            ids = [m["id"] for m in sent]
            for sse in streams:
                sse.read_until(ids)
                got = [e["id"] for e in sse.events]
                assert sorted(got) == sorted(ids), f"worker {sse.worker}'s stream: {got}"
                for event in sse.events:
                    original = next(m for m in sent if m["id"] == event["id"])
                    assert event["text"] == original["text"]
                    assert event["worker"] == original["worker"]

            run.signal(signal.SIGTERM)
            for sse in streams:
                assert sse.closed_by_server(5), f"worker {sse.worker} kept its stream open after SIGTERM"
            assert run.wait(10) == 0, run.log
        finally:
            for sse in streams:
                sse.close()
        wait_gone(list(pids.values()), 2)
        assert len(run.matches(r"worker \d \(pid \d+\) stopped \(exited with status 0\)")) == 4, run.log


@pytest.mark.timeout(30)
def test_chat_requests_and_rejections() -> None:
    with Run("examples.chat:main", "-w", "1", "--bind", "127.0.0.1:0", "--log-level", "debug") as run:
        port = run.port()
        pid = run.ready(1)[0]
        status, headers, body = request(port, "GET", "/")
        assert status == 200 and headers["x-worker"] == "0"
        assert headers["content-type"].startswith("text/html") and b"EventSource" in body
        run.wait_line(rf"\[worker 0 pid {pid}\] DEBUG examples.chat: 127.0.0.1 \"GET / HTTP/1.1\" 200")

        status, headers, _ = request(port, "GET", "/nowhere")
        assert status == 404 and headers["x-worker"] == "0"

        json_type = {"Content-Type": "application/json"}
        form_type = {"Content-Type": "application/x-www-form-urlencoded"}
        bad = [
            (b'{"text": "hi"}', {"Content-Type": "text/plain"}, "Content-Type"),
            (b"not json", json_type, "not JSON"),
            (b'["text"]', json_type, "missing"),
            (b'{"text": 3}', json_type, "not a string"),
            (b'{"text": "   "}', json_type, "empty"),
            (json.dumps({"text": "x" * 501}).encode(), json_type, "longer than 500"),
            (b"text=", form_type, "empty"),
            (b"other=1", form_type, "missing"),
        ]
        for payload, headers_in, why in bad:
            status, headers, body = request(port, "POST", "/messages", payload, headers_in)
            assert status == 400, (payload, status, body)
            assert why in body.decode(), (payload, body)
            assert headers["x-worker"] == "0"

        status, headers, body = request(port, "POST", "/messages", b"text=hi+there", form_type)
        assert status == 201 and json.loads(body)["text"] == "hi there"
        status, headers, body = request(port, "POST", "/messages", b'{"text": "' + b"y" * 500 + b'"}', json_type)
        assert status == 201 and headers["x-worker"] == "0"

        run.signal(signal.SIGTERM)
        assert run.wait(10) == 0, run.log


@pytest.mark.timeout(40)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_chat_under_other_start_methods_and_socket_kinds(method: str, tmp_path: Path) -> None:
    """spawn pickles the sockets for the workers; also a Unix socket and, for forkserver, --reuse-port."""
    path = tmp_path / "chat.sock"
    extra = ["--reuse-port"] if method == "forkserver" else []
    with Run(
        "examples.chat:main", "-w", "2", "--start-method", method,
        "--bind", "127.0.0.1:0", "--bind", f"unix:{path}", *extra,
    ) as run:
        port = run.port()
        run.ready(2, timeout=30)
        streams = open_streams(port, 2)
        try:
            sent = post(port, f"via {method}")
            for sse in streams:
                sse.read_until([sent["id"]])

            unix = socket.socket(socket.AF_UNIX)
            unix.settimeout(10)
            unix.connect(str(path))
            with unix:
                unix.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := unix.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and b"X-Worker: " in reply

            run.signal(signal.SIGTERM)
            assert run.wait(10) == 0, run.log
        finally:
            for sse in streams:
                sse.close()
        assert not path.exists(), "the primary leaves no socket file behind"


@pytest.mark.timeout(20)
def test_hello_example_workers_hear_each_other() -> None:
    with Run("examples.hello:main", "-w", "2") as run:
        run.wait_line(r"\[worker 0 pid \d+\] INFO hello: heard: worker 1 of 2 says hello")
        run.wait_line(r"\[worker 1 pid \d+\] INFO hello: heard: worker 0 of 2 says hello")
        run.signal(signal.SIGINT)
        assert run.wait() == 0, run.log
