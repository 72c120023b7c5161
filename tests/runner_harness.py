"""Helpers for the runner's end-to-end tests: the command in a subprocess, an SSE client, HTTP posts."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent


class Run:
    """``python -m clustersync run ARGS`` in a session of its own, its output collected line by line.

    Use as a context manager: on exit the whole process group is killed, so no
    worker outlives the test even when it fails.
    """

    def __init__(self, *args: str, env: Optional[Mapping[str, str]] = None) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSYNC_")}
        environ.update(env or {})
        environ["PYTHONUNBUFFERED"] = "1"
        self.args = args
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clustersync", "run", *args],
            cwd=ROOT,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # -- the log -------------------------------------------------------------

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 10.0, after: int = 0) -> Tuple[int, "re.Match[str]"]:
        """Wait for a line matching ``pattern`` at position ``after`` or later; return (position, match)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    m = regex.search(self.lines[i])
                    if m:
                        return i, m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; the log:\n{self.log_unlocked()}")
                self._cond.wait(left)

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    def matches(self, pattern: str) -> List["re.Match[str]"]:
        regex = re.compile(pattern)
        with self._cond:
            return [m for m in map(regex.search, self.lines) if m]

    def port(self) -> int:
        _, m = self.wait_line(r"listening on 127\.0\.0\.1:(\d+)")
        return int(m.group(1))

    def ready(self, count: int, timeout: float = 15.0, after: int = 0) -> Dict[int, int]:
        """Wait until ``count`` distinct worker indexes logged "ready" (at ``after`` or later): {index: pid}."""
        deadline = time.monotonic() + timeout
        regex = re.compile(r"worker (\d+) \(pid (\d+)\) ready")
        with self._cond:
            while True:
                found: Dict[int, int] = {}
                for line in self.lines[after:]:
                    m = regex.search(line)
                    if m:
                        found[int(m.group(1))] = int(m.group(2))
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"{count} workers not ready within {timeout} s; the log:\n{self.log_unlocked()}")
                self._cond.wait(left)

    # -- the process -----------------------------------------------------------

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the command to exit; return its status."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the command did not exit within {timeout} s; the log:\n{self.log}") from None
        self._reader.join(5)
        return code

    def close(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        finally:
            self._reader.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def wait_gone(pids: List[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"still running after {timeout} s: {[p for p in pids if alive(p)]}")
        time.sleep(0.01)


class SSE:
    """A client of ``GET /events``: the worker that serves it, and its events."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(b"GET /events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        assert b" 200 " in status, status
        self.headers: Dict[str, str] = {}
        while True:
            line = self.file.readline().strip()
            if not line:
                break
            name, _, value = line.decode().partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.worker = int(self.headers["x-worker"])
        self.events: List[Dict[str, Any]] = []

    def next_event(self, timeout: float = 10.0) -> Optional[Dict[str, Any]]:
        """The next ``data:`` event, or None when the server closed the stream."""
        self.sock.settimeout(timeout)
        while True:
            line = self.file.readline()
            if not line:
                return None
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                self.events.append(event)
                return event

    def read_until(self, ids: List[str], timeout: float = 10.0) -> None:
        """Read events until every id of ``ids`` arrived."""
        deadline = time.monotonic() + timeout
        while not set(ids) <= {e["id"] for e in self.events}:
            left = deadline - time.monotonic()
            if left <= 0 or self.next_event(left) is None:
                raise AssertionError(f"worker {self.worker}'s stream got {self.events}, not all of {ids}")

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Read to the end; True if the server closed the stream within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self.file.readline():
                pass
        except (socket.timeout, OSError):
            return False
        return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def spread(connect: Callable[[], Any], workers: int, *, per_worker: int = 1, attempts: int = 80) -> List[Any]:
    """Call ``connect()`` (a connection with ``.worker`` and ``.close()``) until ``workers`` distinct
    workers serve at least one (at most ``per_worker`` each); return the connections kept."""
    kept: List[Any] = []
    seen: Dict[int, int] = {}
    for _ in range(attempts):
        conn = connect()
        if seen.get(conn.worker, 0) >= per_worker:
            conn.close()
            continue
        seen[conn.worker] = seen.get(conn.worker, 0) + 1
        kept.append(conn)
        if len(seen) >= workers:
            return kept
    for conn in kept:
        conn.close()
    raise AssertionError(f"reached only workers {sorted(seen)} in {attempts} connections")


def open_streams(port: int, workers: int, *, per_worker: int = 1, attempts: int = 80) -> List[SSE]:
    """Open event streams until ``workers`` distinct workers serve at least one (at most ``per_worker`` each)."""
    return spread(lambda: SSE(port), workers, per_worker=per_worker, attempts=attempts)


def request(port: int, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    """One HTTP request: (status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(port: int, text: str) -> Dict[str, Any]:
    """POST a chat message as JSON; return the message the server published."""
    status, headers, body = request(
        port, "POST", "/messages", json.dumps({"text": text}).encode(), {"Content-Type": "application/json"}
    )
    assert status == 201, (status, body)
    message = json.loads(body)
    assert int(headers["x-worker"]) == message["worker"]
    return message


def post_via(port: int, worker: int, text: str, attempts: int = 80) -> Dict[str, Any]:
    """POST until worker ``worker`` is the one that takes it; return that message."""
    for _ in range(attempts):
        message = post(port, text)
        if message["worker"] == worker:
            return message
    raise AssertionError(f"no POST reached worker {worker} in {attempts} tries")


def free_to_bind(port: int) -> bool:
    """True if a new server could listen on 127.0.0.1:``port`` now."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        return True
    except OSError:
        return False
    finally:
        sock.close()
