"""The bus: processes the primary did not start join its relay over a Unix socket.

Everything here runs for real: a ``Primary(listen=PATH)`` with forked
workers, ``python -m clustersync relay|publish|stats`` as subprocesses,
plain Python processes that join with ``cluster(channel=..., address=PATH)``
or ``CLUSTERSYNC_BUS``, a child that drops to ``nobody``, raw sockets that
send garbage, and uvicorn and gunicorn serving tests/apps/bus_asgi.py.

The processes that hold a hub (a forked worker, a peer process) all run
:func:`serve` (``PEER``, below): they report JSON lines and take commands as
JSON lines, so the test drives them step by step and waits on what they say.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from clustersync import Hub
from clustersync.relay.bus import FIRST_PEER, MAX_PATH, connect
from clustersync.relay.primary import Primary
from clustersync.relay.wire import BUS_VERSION, DATA, HEADER, HEADER_SIZE, HELLO, SUB, pack_frame, pack_run
from clustersync.sync import cluster

from .conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent

# The program every hub-holding process of these tests runs: a forked worker calls serve() over a
# socket pair, a peer process runs it as a script (argv: the bus path, or "" for CLUSTERSYNC_BUS;
# optionally UID:GID to drop to, after the imports, before joining).
PEER = r'''
import json, os, sys, threading
from clustersync import Address, Hub
from clustersync.sync import cluster


def serve(sync, rfile, wfile):
    """Report JSON lines on wfile, take commands from rfile; answer "ask" with to=msg.origin."""
    lock = threading.Lock()

    def emit(**event):
        line = json.dumps(event) + "\n"
        with lock:
            try:
                wfile.write(line)
                wfile.flush()
            except (OSError, ValueError):
                pass

    hub = Hub(
        sync=sync,
        on_error=lambda exc, stage: emit(ev="error", stage=stage, type=type(exc).__name__, text=str(exc)),
        on_backplane=lambda up: emit(ev="backplane", up=up),
    )
    me = [hub.address.worker, hub.address.hub]

    def on_message(msg):
        origin = [msg.origin.worker, msg.origin.hub]
        emit(ev="msg", topic=msg.topic, data=msg.data, origin=origin)
        if msg.topic == "ask" and origin != me:
            hub.publish("answer", {"q": msg.data, "by": me}, to=msg.origin)

    for topic in ("news", "ask", "answer"):
        hub.subscribe(topic, on_message)
    queued = hub.subscribe("queued")

    def drain():  # a thread waiting in get() the whole time: it reads the pipe whenever it waits
        for msg in queued:
            emit(ev="queued", data=msg.data, on_getter=getter_reads[0])

    getter_reads = [False]
    hub.subscribe("queued", lambda msg: getter_reads.__setitem__(0, threading.current_thread().name == "getter"))
    threading.Thread(target=drain, name="getter", daemon=True).start()
    emit(ev="ready", ok=hub.wait_ready(20), pid=os.getpid(), uid=os.getuid(), address=me)
    for line in rfile:
        cmd = json.loads(line)
        if cmd["op"] == "publish":
            to = cmd.get("to")
            hub.publish(cmd["topic"], cmd["data"], to=Address(*to) if to else None)
            emit(ev="published", data=cmd["data"])
        elif cmd["op"] == "exit":
            break
    hub.close()
    emit(ev="bye")


if __name__ == "__main__":
    path = sys.argv[1]
    if len(sys.argv) > 2:
        uid, gid = map(int, sys.argv[2].split(":"))
        import clustersync.relay.bus  # noqa: F401  (before the drop: that user may not read this Python's files)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    serve(cluster(channel="app", address=path) if path else cluster(channel="app"), sys.stdin, sys.stdout)
'''

_peer_code: Dict[str, Any] = {"__name__": "bus_peer"}
exec(compile(PEER, "<bus peer>", "exec"), _peer_code)
serve: Callable[..., None] = _peer_code["serve"]


# ------------------------------------------------------------------ processes and their output


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSYNC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Lines:
    """The lines of a stream, read by a thread of their own, to wait on."""

    def __init__(self, stream: Any, name: str) -> None:
        self.lines: List[str] = []
        self.eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        try:
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    def wait(self, predicate: Callable[[List[str]], Any], timeout: float, what: str) -> Any:
        """Wait until ``predicate(lines)`` is truthy; return it. Fail after ``timeout`` or at the end of the stream."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.lines)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    why = "the stream ended" if self.eof else f"{timeout} s passed"
                    raise AssertionError(f"{what}: {why}; the lines so far:\n" + "\n".join(self.lines[-60:]))
                self._cond.wait(left)

    def grep(self, text: str) -> List[str]:
        with self._cond:
            return [line for line in self.lines if text in line]

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def __str__(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


def _children() -> Dict[int, List[int]]:
    """Live processes by parent pid, from /proc."""
    out: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def _tree(pid: int) -> List[int]:
    """The live descendants of ``pid`` (a child may have left its process group, as the gunicorn recipe's relay)."""
    children = _children()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Proc:
    """A command in a session of its own, its stdout and stderr read line by line; killed whole on close."""

    def __init__(self, *argv: str, env: Optional[Dict[str, str]] = None, stdin: bool = False) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env if env is not None else _env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.out = Lines(self.popen.stdout, f"stdout of {self.pid}")
        self.err = Lines(self.popen.stderr, f"stderr of {self.pid}")

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(self.argv[:4])}... did not exit within {timeout} s\n{self.output()}") from None
        self.out.join()
        self.err.join()
        return code

    def output(self) -> str:
        return f"--- stdout of {self.pid}:\n{self.out}\n--- stderr:\n{self.err}"

    def close(self) -> None:
        pids = _tree(self.pid)  # before the group goes: whatever left the group is found through its parent
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.popen.wait(10)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") and _state(p) not in ("Z", "X", None) for p in pids):
            assert time.monotonic() < deadline, f"processes {pids} outlived SIGKILL"
            time.sleep(0.01)
        self.out.join()
        self.err.join()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def relay(path: str, *options: str) -> Proc:
    """``python -m clustersync relay --bus PATH``, once it listens."""
    proc = Proc(sys.executable, "-m", "clustersync", "relay", "--bus", path, *options)
    try:
        proc.err.wait(lambda lines: any("relaying on" in line for line in lines), 20, "the relay did not start")
    except BaseException:
        proc.close()
        raise
    return proc


def cli(*args: str, env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
    """``python -m clustersync ARGS``, to the end."""
    return subprocess.run(
        [sys.executable, "-m", "clustersync", *args],
        cwd=ROOT, env=env if env is not None else _env(), capture_output=True, text=True, timeout=30,
    )


# --------------------------------------------------------------------- hubs the test drives


class Party:
    """A hub in another process running :func:`serve`: its reports, and a way to command it."""

    def __init__(self, name: str, lines: Lines, write: Callable[[str], None], describe: Callable[[], str]) -> None:
        self.name = name
        self.lines = lines
        self._write = write
        self._describe = describe
        self.address: Tuple[int, str] = (-1, "")
        self.pid = 0

    def events(self, ev: Optional[str] = None, lines: Optional[List[str]] = None) -> List[Dict[str, Any]]:
        out = []
        for line in list(self.lines.lines if lines is None else lines):
            if line.startswith("{"):
                event = json.loads(line)
                if ev is None or event["ev"] == ev:
                    out.append(event)
        return out

    def wait(self, predicate: Callable[[List[Dict[str, Any]]], Any], what: str, timeout: float = 30.0) -> Any:
        try:
            return self.lines.wait(lambda lines: predicate(self.events(lines=lines)), timeout, f"{self.name}: {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self._describe()}") from None

    def ready(self, ok: bool = True) -> Dict[str, Any]:
        event = self.wait(lambda evs: next((e for e in evs if e["ev"] == "ready"), None), "never ready")
        assert event["ok"] is ok, f"{self.name} ready={event['ok']}\n{self._describe()}"
        self.address = (event["address"][0], event["address"][1])
        self.pid = event["pid"]
        return event

    def send(self, **cmd: Any) -> None:
        self._write(json.dumps(cmd))

    def publish(self, topic: str, data: Any, to: Optional[Tuple[int, str]] = None) -> None:
        self.send(op="publish", topic=topic, data=data, to=list(to) if to else None)

    def got(self, topic: str, prefix: str = "") -> List[Dict[str, Any]]:
        """The messages on ``topic`` (whose data's id starts with ``prefix``)."""
        return [
            e for e in self.events("msg")
            if e["topic"] == topic and (not prefix or str(e["data"].get("id", "")).startswith(prefix))
        ]

    def exit(self) -> None:
        self.send(op="exit")
        self.wait(lambda evs: any(e["ev"] == "bye" for e in evs), "no bye")


def peer(name: str, path: str, *, env: Optional[Dict[str, str]] = None, as_user: str = "") -> Tuple[Proc, Party]:
    """A plain Python process joining the bus at ``path`` ("" with ``CLUSTERSYNC_BUS`` in ``env``)."""
    argv = [sys.executable, "-c", PEER, path] + ([as_user] if as_user else [])
    proc = Proc(*argv, env=env, stdin=True)
    return proc, Party(name, proc.out, proc.send, proc.output)


def _bus_worker(sock: socket.socket) -> None:
    """A worker forked by the primary: serve() over its end of a socket pair (until the test closes it)."""
    rfile, wfile = sock.makefile("r", encoding="utf-8"), sock.makefile("w", encoding="utf-8")
    try:
        serve(cluster(channel="app"), rfile, wfile)
    finally:
        for f in (rfile, wfile, sock):
            try:
                f.close()
            except OSError:  # what is left to write has nobody to read it
                pass


class Workers:
    """Workers forked by a ``Primary(listen=PATH)``, each a :class:`Party`."""

    def __init__(self, primary: Primary, n: int) -> None:
        self.parties: List[Party] = []
        self._ends: List[Tuple[socket.socket, Any, Any, Lines]] = []
        for _ in range(n):
            here, there = socket.socketpair()
            try:
                handle = primary.fork(_bus_worker, there)
            finally:
                there.close()
            rfile, wfile = here.makefile("r", encoding="utf-8"), here.makefile("w", encoding="utf-8")
            lines = Lines(rfile, f"worker {handle.index}")
            self._ends.append((here, rfile, wfile, lines))

            def write(line: str, wfile: Any = wfile) -> None:
                wfile.write(line + "\n")
                wfile.flush()

            def describe(lines: Lines = lines) -> str:
                return f"--- worker:\n{lines}"

            self.parties.append(Party(f"w{handle.index}", lines, write, describe))

    def close(self) -> None:
        for sock, rfile, wfile, lines in self._ends:  # the worker reads EOF, closes its hub and returns
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lines.join()
            for f in (rfile, wfile, sock):
                try:
                    f.close()
                except OSError:
                    pass


def exchange(parties: Sequence[Party], tag: str, count: int = 10, timeout: float = 30.0) -> None:
    """Each party broadcasts ``count`` messages and an end mark; each gets every one exactly once, in order."""
    for p in parties:
        for i in range(count):
            p.publish("news", {"id": f"{tag}:{p.name}:{i}"})
        p.publish("news", {"id": f"{tag}:{p.name}:end"})
    want = [f"{tag}:{p.name}:{i}" for p in parties for i in [*map(str, range(count)), "end"]]
    ends = {f"{tag}:{p.name}:end" for p in parties}
    address = {p.name: p.address for p in parties}
    for p in parties:
        # Each publisher's messages arrive in order: its end mark comes after all of them.
        p.wait(lambda evs: ends <= {e["data"]["id"] for e in evs if e["ev"] == "msg" and e["topic"] == "news"},
               f"round {tag}", timeout)
    for p in parties:
        got = p.got("news", f"{tag}:")
        assert Counter(e["data"]["id"] for e in got) == Counter(want), f"{p.name} got {[e['data'] for e in got]}"
        for e in got:
            sender = e["data"]["id"].split(":")[1]
            assert tuple(e["origin"]) == address[sender], (p.name, e)
        for sender in parties:  # in publish order
            ids = [e["data"]["id"] for e in got if e["data"]["id"].split(":")[1] == sender.name]
            assert ids == [f"{tag}:{sender.name}:{i}" for i in [*map(str, range(count)), "end"]], (p.name, ids)


# ------------------------------------------------------------------- sockets and paths


@pytest.fixture
def bus_dir() -> Iterator[str]:
    """A short directory for bus sockets (tmp_path can pass the 107-byte limit), open to every user."""
    path = tempfile.mkdtemp(prefix="csbus-", dir="/tmp")
    os.chmod(path, 0o755)  # `nobody` reaches the socket; the socket's own mode decides
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        assert chunk, f"the relay closed the connection after {len(buf)} of {size} bytes"
        buf += chunk
    return buf


def raw_join(path: str) -> Tuple[socket.socket, int]:
    """Join the bus over a raw socket: read the HELLO; return the socket and the index it gives."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    body_len, kind, clen, _origin, index, version = HEADER.unpack(_recv_exactly(sock, HEADER_SIZE))
    settings = json.loads(_recv_exactly(sock, body_len))
    assert (kind, clen, version) == (HELLO, 0, BUS_VERSION) and index >= FIRST_PEER
    assert {"max_message", "out_limit", "publish_block"} <= set(settings)
    return sock, index


def assert_disconnected(sock: socket.socket, timeout: float = 20.0) -> None:
    """Read (and drop) what the relay sends until it closes the connection."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return
        except socket.timeout:
            raise AssertionError(f"the relay did not disconnect the peer within {timeout} s") from None
        except ConnectionResetError:
            return


def relay_log(caplog: pytest.LogCaptureFixture, level: int) -> List[str]:
    """What the in-process relay logged at ``level`` or above (on its loop's thread: not, say, the link
    of an earlier test's hub in this process, telling that its relay went away)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.threadName == "clustersync-relay"]


def bus_peers(primary: Primary) -> Dict[int, Dict[str, Any]]:
    """The primary's bus peers, by pid."""
    return {p["pid"]: p for p in primary.stats()["bus"]["peers"]}


# ======================================================================= 1. the socket


@pytest.mark.timeout(30)
def test_the_socket_is_0600_and_removed_when_the_relay_stops(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    primary = Primary(listen=path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.geteuid()
        sock, _ = raw_join(path)
        sock.close()
    finally:
        primary.close(timeout=5)
    assert not os.path.lexists(path)


@pytest.mark.timeout(60)
def test_a_stale_socket_is_replaced_and_a_live_relay_is_not(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    with relay(path) as first:
        # Served by a live relay: refused, in the library and on the command line.
        with pytest.raises(OSError) as exc:
            Primary(listen=path)
        assert exc.value.errno == errno.EADDRINUSE and f"a relay already listens on {path}" in str(exc.value)
        # The relay dies without removing its socket: the file stays, and nobody listens on it.
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(path)
    primary = Primary(listen=path)  # replaces the stale file
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        second = cli("relay", "--bus", path)  # and now refuses the next relay in turn
        assert second.returncode == 1, second.stderr
        assert f"cannot relay on {path}" in second.stderr and "a relay already listens" in second.stderr
        sock, _ = raw_join(path)  # the new socket serves, and the refused relay left it alone
        sock.close()
    finally:
        primary.close(timeout=5)
    assert not os.path.lexists(path)


@pytest.mark.timeout(30)
def test_a_file_that_is_not_a_socket_is_left_alone(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    with open(path, "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match="is not a socket"):
        Primary(listen=path)
    with open(path) as f:
        assert f.read() == "mine"


@pytest.mark.timeout(30)
def test_a_path_over_107_bytes_is_refused(bus_dir: str) -> None:
    longest = os.path.join(bus_dir, "s" * (MAX_PATH - len(bus_dir) - 1))
    assert len(os.fsencode(longest)) == MAX_PATH == 107
    too_long = longest + "s"
    with pytest.raises(ValueError, match="108 bytes; a Unix socket path has at most 107"):
        Primary(listen=too_long)
    with pytest.raises(ValueError, match="at most 107"):
        connect(too_long)
    errors: List[BaseException] = []
    hub = Hub(sync=cluster(channel="app", address=too_long), on_error=lambda exc, stage: errors.append(exc))
    assert not hub.wait_ready(1) and isinstance(errors[0], ValueError)
    hub.close()
    out = cli("relay", "--bus", too_long)
    assert out.returncode == 1 and "at most 107" in out.stderr, out.stderr
    assert not os.path.lexists(too_long)
    primary = Primary(listen=longest)  # 107 bytes is fine
    try:
        sock, _ = raw_join(longest)
        sock.close()
    finally:
        primary.close(timeout=5)


# ================================================== 2. peers and forked workers, one channel


@pytest.mark.timeout(90)
def test_peers_and_forked_workers_exchange_exactly_once(bus_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    primary = Primary(start_method="fork", workers=2, listen=path)
    workers: Optional[Workers] = None
    procs: List[Proc] = []
    try:
        with caplog.at_level(logging.WARNING, logger="clustersync"):
            workers = Workers(primary, 2)
            w0, w1 = workers.parties
            a_proc, a = peer("a", path)  # cluster(channel="app", address=PATH)
            procs.append(a_proc)
            b_proc, b = peer("b", "", env=_env(CLUSTERSYNC_BUS=path))  # CLUSTERSYNC_BUS=PATH, cluster(channel="app")
            procs.append(b_proc)
            everyone = [w0, w1, a, b]
            for p in everyone:
                p.ready()
            assert [w0.address[0], w1.address[0]] == [0, 1]
            assert a.address[0] >= FIRST_PEER and b.address[0] >= FIRST_PEER and a.address[0] != b.address[0]
            assert (a.pid, b.pid) == (a_proc.pid, b_proc.pid)
            peers = bus_peers(primary)
            assert set(peers) == {a.pid, b.pid}
            assert {peers[a.pid]["index"], peers[b.pid]["index"]} == {a.address[0], b.address[0]}
            assert all(p["uid"] == os.getuid() and p["alive"] for p in peers.values())

            exchange(everyone, "one")

            # Every party has a thread waiting in get() on "queued": it reads the message itself.
            w0.publish("queued", "q1")
            for p in (w1, a, b):
                p.wait(lambda evs: any(e["ev"] == "queued" for e in evs), "the queued message")
                assert [(e["data"], e["on_getter"]) for e in p.events("queued")] == [("q1", True)], p.name

            # to=msg.origin: a peer asks, the others answer it alone; then a worker asks.
            for asker in (a, w0):
                asker.publish("ask", {"id": f"ask:{asker.name}"})
                asker.wait(lambda evs: len([e for e in evs if e["ev"] == "msg" and e["topic"] == "answer"
                                            and e["data"]["q"]["id"] == f"ask:{asker.name}"]) >= 3,
                           "three answers")
            exchange(everyone, "fence")  # an answer misrouted would have arrived before the fence
            for asker in (a, w0):
                answers = [e for e in asker.got("answer") if e["data"]["q"]["id"] == f"ask:{asker.name}"]
                others = [p for p in everyone if p is not asker]
                assert sorted(tuple(e["data"]["by"]) for e in answers) == sorted(p.address for p in others)
                assert all(tuple(e["origin"]) == tuple(e["data"]["by"]) for e in answers)
            for p in everyone:
                assert all(e["data"]["q"]["id"] == f"ask:{p.name}" for e in p.got("answer")), p.name

            # b leaves: dropped from the bus, and the others go on.
            b.exit()
            assert b_proc.wait() == 0, b_proc.output()
            wait_for(lambda: b.pid not in bus_peers(primary), timeout=20)
            assert set(bus_peers(primary)) == {a.pid}
            exchange([w0, w1, a], "two")
            a.publish("news", {"id": "to-b"}, to=b.address)
            a.wait(lambda evs: any(e["ev"] == "error" and e["type"] == "DestinationUnreachable" for e in evs),
                   "the message for the peer that left is reported unreachable")
            for p in (w0, w1, a):
                assert not [e for e in p.events("error") if e["type"] != "DestinationUnreachable"], p.events("error")
            bus = primary.stats()["bus"]
            assert (bus["path"], bus["accepted"], bus["refused"]) == (path, 2, 0)
            assert primary.stats()["malformed"] == 0
        assert not relay_log(caplog, logging.WARNING)
    finally:
        for proc in procs:
            proc.close()
        if workers is not None:
            workers.close()
        primary.close(timeout=5)


# ======================================================== 3. another user's process


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "this test runs as root (as CI does): it starts a child that drops to the user nobody "
            "to join a relay of another user; run it as root",
            pytrace=False,
        )


NOBODY = pwd.getpwnam("nobody")
AS_NOBODY = f"{NOBODY.pw_uid}:{NOBODY.pw_gid}"


@pytest.mark.timeout(60)
def test_a_process_of_another_user_is_refused(bus_dir: str) -> None:
    _need_root()
    path = os.path.join(bus_dir, "bus.sock")
    procs: List[Proc] = []
    try:
        relay_proc = relay(path)
        procs.append(relay_proc)
        # The socket is 0600: the kernel refuses the connection, the relay never hears of it.
        proc, stranger = peer("nobody", path, as_user=AS_NOBODY)
        procs.append(proc)
        stranger.ready(ok=False)
        (error,) = stranger.events("error")
        assert (error["stage"], error["type"]) == ("subscribe", "ConnectionRefusedError"), error
        assert error["text"] == f"the bus at {path} is not open to this user (mode 0600)"
        stranger.exit()
        assert proc.wait() == 0
        assert connect(path).relay_stats(10)["bus"]["refused"] == 0

        # Open the socket to everyone: the relay reads the credentials and refuses them itself.
        os.chmod(path, 0o666)
        proc, stranger = peer("nobody", path, as_user=AS_NOBODY)
        procs.append(proc)
        stranger.ready(ok=False)
        assert stranger.events("ready")[0]["uid"] == NOBODY.pw_uid
        (error,) = stranger.events("error")
        assert (error["stage"], error["type"]) == ("subscribe", "ConnectionRefusedError"), error
        assert f"the relay at {path} closed the connection: this user may not join it" in error["text"]
        stranger.exit()
        assert proc.wait() == 0
        assert connect(path).relay_stats(10)["bus"]["refused"] == 1
        line = relay_proc.err.wait(lambda lines: [x for x in lines if "refused" in x], 20, "no log line")
        assert len(line) == 1 and f"refused pid {proc.pid} (uid {NOBODY.pw_uid}" in line[0], line
        assert "WARNING" in line[0] and path in line[0]
        relay_proc.signal(signal.SIGTERM)
        assert relay_proc.wait() == 0, relay_proc.output()
        assert len(relay_proc.err.grep("refused")) == 1
    finally:
        for proc in procs:
            proc.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", ["--allow-uid", "--allow-gid"])
def test_allow_uid_and_allow_gid_let_another_user_in(bus_dir: str, option: str) -> None:
    _need_root()
    path = os.path.join(bus_dir, "bus.sock")
    procs: List[Proc] = []
    hub: Optional[Hub] = None
    try:
        relay_proc = relay(path, option, str(NOBODY.pw_uid if option == "--allow-uid" else NOBODY.pw_gid))
        procs.append(relay_proc)
        # Allowing another user opens the socket to all (0666), allowing a group makes it that group's (0660):
        # SO_PEERCRED stays the gate.
        mode, group = (0o666, 0) if option == "--allow-uid" else (0o660, NOBODY.pw_gid)
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, group), oct(st.st_mode)
        proc, guest = peer("nobody", path, as_user=AS_NOBODY)
        procs.append(proc)
        guest.ready()
        assert guest.address[0] >= FIRST_PEER
        got: List[Any] = []
        hub = Hub(sync=cluster(channel="app", address=path))
        hub.subscribe("news", lambda msg: got.append((msg.data, msg.origin)))
        assert hub.wait_ready(10)
        guest.publish("news", {"id": "from nobody"})
        wait_for(lambda: got, timeout=20)
        assert got == [({"id": "from nobody"}, guest.address)]
        hub.publish("news", {"id": "from root"})
        guest.wait(lambda evs: any(e["ev"] == "msg" and e["data"] == {"id": "from root"} for e in evs), "no news")
        bus = connect(path).relay_stats(10)["bus"]
        assert {p["pid"]: p["uid"] for p in bus["peers"]}[guest.pid] == NOBODY.pw_uid
        assert bus["refused"] == 0
        guest.exit()
        assert proc.wait() == 0
    finally:
        if hub is not None:
            hub.close()
        for proc in procs:
            proc.close()


# =============================================================== 4. garbage from a peer


def _sub(index: int) -> bytes:
    return pack_frame(SUB, b"app", index, count=1)


GARBAGE: Dict[str, Callable[[int], bytes]] = {
    # a header no relay could read: a huge length, an unknown kind
    "header": lambda index: b"\xff" * 64,
    # a well-formed frame that claims to come from worker 0
    "origin": lambda index: pack_frame(DATA, b"app", 0, count=1, body=pack_run(b"h", b"", b"news", [b"x"])),
    # a DATA frame whose header counts 2 messages and whose body holds 1
    "body": lambda index: pack_frame(DATA, b"app", index, count=2, body=pack_run(b"h", b"", b"news", [b"x"])),
}


@pytest.mark.timeout(90)
def test_a_peer_that_sends_garbage_disturbs_no_one(bus_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    primary = Primary(start_method="fork", workers=2, listen=path)
    workers: Optional[Workers] = None
    procs: List[Proc] = []
    raw: List[socket.socket] = []
    try:
        with caplog.at_level(logging.ERROR, logger="clustersync"):
            workers = Workers(primary, 2)
            a_proc, a = peer("a", path)
            procs.append(a_proc)
            everyone = [*workers.parties, a]
            for p in everyone:
                p.ready()
            bad: Dict[str, Tuple[socket.socket, int]] = {}
            for name in [*GARBAGE, "midframe"]:
                sock, index = raw_join(path)
                raw.append(sock)
                if name != "midframe":  # (that one is sent nothing: it must not close with data unread)
                    sock.sendall(_sub(index))  # on the channel, like the others
                bad[name] = (sock, index)
            wait_for(lambda: primary.stats()["channels"].get("app") == 3 + len(GARBAGE), timeout=20)

            exchange(everyone, "before")
            # Garbage in the middle of a round: the round completes, exactly once, for everyone.
            for p in everyone:
                for i in range(50):
                    p.publish("news", {"id": f"during:{p.name}:{i}"})
            for name, make in GARBAGE.items():
                sock, index = bad[name]
                sock.sendall(make(index))
            sock, index = bad["midframe"]
            sock.sendall(HEADER.pack(100, DATA, 3, index, 0xFFFF, 1) + b"app" + b"\0" * 10)
            sock.close()  # 13 of the 100 bytes announced
            for name in GARBAGE:
                assert_disconnected(bad[name][0])
            for p in everyone:
                p.wait(lambda evs: len([e for e in evs if e["ev"] == "msg"
                                        and e["data"]["id"].startswith("during:")]) >= 150, "the round during")
            exchange(everyone, "after")
            wait_for(lambda: {p["index"] for p in primary.stats()["bus"]["peers"]} == {a.address[0]}, timeout=20)
            for p in everyone:
                assert Counter(e["data"]["id"] for e in p.got("news", "during:")) == Counter(
                    f"during:{q.name}:{i}" for q in everyone for i in range(50)
                ), p.name

            stats = primary.stats()
            assert stats["malformed"] == len(GARBAGE)
            assert set(bus_peers(primary)) == {a.pid}
            assert stats["bus"]["accepted"] == 1 + len(bad)
            assert stats["channels"] == {"app": 3}
            assert stats["dropped"] == 0
            for p in everyone:
                assert not p.events("error"), (p.name, p.events("error"))
        me = os.getpid()
        messages = relay_log(caplog, logging.ERROR)
        for name in GARBAGE:
            index = bad[name][1]
            mine = [m for m in messages if f"bus peer {index} (pid {me})" in m]
            assert len(mine) == 1 and "it is cut off" in mine[0], messages
            assert ("malformed DATA frame" if name == "body" else "malformed frame header") in mine[0]
        index = bad["midframe"][1]
        mine = [m for m in messages if f"{index} (pid {me})" in m]
        assert len(mine) == 1 and f"closed its pipe in the middle of a frame: {HEADER_SIZE + 13} bytes discarded" in mine[0], messages
        assert len(messages) == len(bad), messages
    finally:
        for sock in raw:
            sock.close()
        for proc in procs:
            proc.close()
        if workers is not None:
            workers.close()
        primary.close(timeout=5)


# ================================================================ 5. the command line


@pytest.mark.timeout(60)
def test_publish_and_stats_from_a_shell(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    primary = Primary(listen=path)
    hub: Optional[Hub] = None
    try:
        hub = Hub(sync=cluster(channel="app", address=path))
        news = hub.subscribe("news")
        assert hub.wait_ready(10)
        value = {"text": "héllo", "n": [1, 2.5, None, True], "nested": {"a": "b"}}
        out = cli("publish", "--bus", path, "--channel", "app", "news", json.dumps(value))
        assert out.returncode == 0 and not out.stderr, out.stderr
        msg = news.get(timeout=20)
        assert msg.data == value and msg.origin.worker >= FIRST_PEER
        # DATA "-": standard input.
        out = subprocess.run(
            f"echo '\"from stdin\"' | {sys.executable} -m clustersync publish --bus {path} --channel app news -",
            shell=True, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert news.get(timeout=20).data == "from stdin"
        # CLUSTERSYNC_BUS instead of --bus; another channel does not reach "app".
        out = cli("publish", "--channel", "other", "news", "1", env=_env(CLUSTERSYNC_BUS=path))
        assert out.returncode == 0, out.stderr
        out = cli("publish", "--channel", "app", "news", "2", env=_env(CLUSTERSYNC_BUS=path))
        assert out.returncode == 0, out.stderr
        assert news.get(timeout=20).data == 2  # not 1
        # Bad DATA: status 2, one line.
        out = cli("publish", "--bus", path, "--channel", "app", "news", "not json")
        assert out.returncode == 2
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("clustersync publish: DATA is not JSON")
        # No relay there: status 1, a line naming the path.
        nowhere = os.path.join(bus_dir, "nowhere.sock")
        out = cli("publish", "--bus", nowhere, "--channel", "app", "news", "3")
        assert out.returncode == 1
        assert f"clustersync publish: could not join the bus at {nowhere}" in out.stderr.splitlines()[-1], out.stderr
        out = cli("stats", "--bus", nowhere)
        assert out.returncode == 1 and out.stderr.startswith("clustersync stats: no bus at " + nowhere), out.stderr
        # stats: JSON, with the bus section.
        out = cli("stats", "--bus", path)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["bus"]["path"] == path and stats["bus"]["refused"] == 0
        assert stats["bus"]["accepted"] == 6  # this process's link, four publish commands and stats
        pids = {p["pid"] for p in stats["bus"]["peers"]}
        assert os.getpid() in pids and len(pids) == 2  # the stats command is itself on the bus while it asks
        assert stats["channels"] == {"app": 1} and stats["malformed"] == 0
        with pytest.raises(TimeoutError):
            news.get(timeout=0)  # nothing more than what was published
    finally:
        if hub is not None:
            hub.close()
        primary.close(timeout=5)


# ================================================================== 6. stopping the relay


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_the_relay_stops_on_a_signal_and_its_hubs_are_told(bus_dir: str, sig: int) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    procs: List[Proc] = []
    try:
        relay_proc = relay(path)
        procs.append(relay_proc)
        proc, a = peer("a", path)
        procs.append(proc)
        a.ready()
        relay_proc.signal(sig)
        assert relay_proc.wait() == 0, relay_proc.output()
        assert not os.path.lexists(path)
        assert relay_proc.err.grep(f"{signal.Signals(sig).name}: stopping the relay")
        # The hub is told once, and its process goes on.
        a.wait(lambda evs: any(e["ev"] == "backplane" for e in evs), "no on_backplane")
        assert [e["up"] for e in a.events("backplane")] == [False]
        assert any(e["type"] == "ConnectionError" and f"the bus at {path} closed" in e["text"] for e in a.events("error"))
        assert proc.popen.poll() is None
        a.publish("news", {"id": "after"})
        a.wait(lambda evs: any(e["ev"] == "published" for e in evs), "the process stopped answering")
        assert [e["data"] for e in a.got("news")] == [{"id": "after"}]  # its own subscribers still get it
        a.publish("queued", "after")  # the thread that waited in get() when the relay went is still there
        a.wait(lambda evs: any(e["ev"] == "queued" for e in evs), "the thread in get() is gone")
        a.exit()
        assert proc.wait() == 0, proc.output()
    finally:
        for proc in procs:
            proc.close()


# ========================================================== 7. uvicorn and gunicorn workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(port: int, method: str, path: str, body: Optional[Any] = None) -> Tuple[int, Any]:
    """One request on a new connection (``Connection: close``): the worker that answered, and the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Connection": "close", "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data)
        return int(resp.getheader("x-pid", "0")), json.loads(data)
    finally:
        conn.close()


def _serving(port: int, server: Proc, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _http(port, "GET", "/pid")
            return
        except OSError:  # refused, or reset while the server starts
            pass
        assert server.popen.poll() is None, f"the server exited\n{server.output()}"
        assert time.monotonic() < deadline, f"nothing served on port {port} within {timeout} s\n{server.output()}"
        time.sleep(0.05)


def _seen_by_each(
    port: int, server: Proc, path: str, pids: Sequence[int], predicate: Callable[[List[Any]], bool], timeout: float = 30.0
) -> Dict[int, List[Any]]:
    """GET /seen on new connections until every worker of ``pids`` answered a list that satisfies ``predicate``."""
    found: Dict[int, List[Any]] = {}
    last: Dict[int, Tuple[int, List[Any]]] = {}  # how often each worker answered, and what it answered last
    deadline = time.monotonic() + timeout
    while set(found) != set(pids):
        if time.monotonic() > deadline:
            stats = cli("stats", "--bus", path)
            raise AssertionError(
                f"after {timeout} s, only workers {sorted(found)} of {sorted(pids)} saw it: {last}\n"
                f"the relay's stats: {stats.stdout}{stats.stderr}\n{server.output()}"
            )
        pid, seen = _http(port, "GET", "/seen")
        last[pid] = (last.get(pid, (0, []))[0] + 1, seen)
        if pid in pids and predicate(seen):
            found[pid] = seen
    return found


def _two_workers(port: int, server: Proc, old: Sequence[int] = ()) -> List[int]:
    """GET /pid, a new connection each time, until two workers (not of ``old``) answered: their pids."""
    _serving(port, server)
    pids: set = set()
    deadline = time.monotonic() + 40
    while len(pids) < 2:  # the workers take the connections in turn, unevenly
        assert time.monotonic() < deadline, f"only workers {pids} answered in 40 s\n{server.output()}"
        try:
            header_pid, pid = _http(port, "GET", "/pid")
        except (OSError, http.client.HTTPException):
            assert old, "a connection was reset while no worker was stopping"
            continue  # an old worker, stopping, closed a connection it had just accepted
        assert header_pid == pid
        if pid not in old:
            pids.add(pid)
    return sorted(pids)


def _web_workers_share_the_bus(port: int, server: Proc, path: str, pids: Sequence[int], tag: str) -> None:
    """Publish through one worker, then from a shell: each worker's hub gets each message once."""
    message = {"id": f"{tag}:m1", "text": "héllo"}
    publisher, _ = _http(port, "POST", "/publish", [message, {"id": f"{tag}:fence"}])
    assert publisher in pids, (publisher, pids)
    seen = _seen_by_each(port, server, path, pids, lambda s: {"id": f"{tag}:fence"} in s)
    for pid, items in seen.items():
        assert items == [message, {"id": f"{tag}:fence"}], (pid, items)
    out = cli("publish", "--bus", path, "--channel", "app", "news", json.dumps({"id": f"{tag}:shell"}))
    assert out.returncode == 0, out.stderr
    seen = _seen_by_each(port, server, path, pids, lambda s: {"id": f"{tag}:shell"} in s)
    for pid, items in seen.items():
        assert items == [message, {"id": f"{tag}:fence"}, {"id": f"{tag}:shell"}], (pid, items)
    out = cli("stats", "--bus", path)
    assert out.returncode == 0, out.stderr
    assert {p["pid"] for p in json.loads(out.stdout)["bus"]["peers"]} >= set(pids)


@pytest.mark.timeout(90)
def test_uvicorn_workers_join_the_bus(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    port = _free_port()
    procs: List[Proc] = []
    try:
        relay_proc = relay(path)
        procs.append(relay_proc)
        server = Proc(
            sys.executable, "-m", "uvicorn", "tests.apps.bus_asgi:app", "--workers", "2",
            "--host", "127.0.0.1", "--port", str(port), env=_env(CLUSTERSYNC_BUS=path),
        )
        procs.append(server)
        _web_workers_share_the_bus(port, server, path, _two_workers(port, server), "uvicorn")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.output()
        relay_proc.signal(signal.SIGTERM)
        assert relay_proc.wait() == 0, relay_proc.output()
        assert not os.path.lexists(path)
    finally:
        for proc in reversed(procs):
            proc.close()


def _gunicorn_has(setting: str) -> bool:
    import gunicorn.config  # type: ignore[import-untyped]

    return any(s.name == setting for s in gunicorn.config.KNOWN_SETTINGS)


def _gunicorn(path: str, port: int) -> Proc:
    """gunicorn with tests/apps/gunicorn_conf.py, as docs/web-apps.md runs it."""
    isolated = ["--no-control-socket"] if _gunicorn_has("control_socket_disable") else []  # not ~/.gunicorn
    return Proc(
        sys.executable, "-m", "gunicorn", "-c", "tests/apps/gunicorn_conf.py", *isolated,
        "-w", "2", "-k", "uvicorn_worker.UvicornWorker", "tests.apps.bus_asgi:app", "-b", f"127.0.0.1:{port}",
        env=_env(CLUSTERSYNC_BUS=path),
    )


@contextlib.contextmanager
def _killed_at_the_end(server: Proc, path: str) -> Iterator[int]:
    """The pid of the relay gunicorn started; SIGKILLed at the end if still there (it would outlive gunicorn)."""
    pid = int(server.err.wait(
        lambda lines: [m for m in map(re.compile(r"clustersync relay \(pid (\d+)\) listens").search, lines) if m],
        30, "gunicorn did not start the relay",
    )[0].group(1))
    try:
        yield pid
    finally:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = path.encode() in f.read()
        except OSError:
            ours = False
        if ours:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_gunicorn_workers_join_the_bus_with_the_documented_config(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    port = _free_port()
    with _gunicorn(path, port) as server, _killed_at_the_end(server, path) as relay_pid:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        pids = _two_workers(port, server)
        _web_workers_share_the_bus(port, server, path, pids, "first")
        # HUP: gunicorn reads its config again and replaces its workers; the relay stays, the new workers join it.
        server.signal(signal.SIGHUP)
        new = _two_workers(port, server, old=pids)
        wait_for(lambda: all(_state(pid) in (None, "Z") for pid in pids), timeout=30)  # only new workers answer now
        _web_workers_share_the_bus(port, server, path, new, "after HUP")
        assert _state(relay_pid) not in (None, "Z")
        server.signal(signal.SIGTERM)  # the workers stop, then on_exit stops the relay
        assert server.wait(40) == 0, server.output()
        assert not os.path.lexists(path), server.output()
        assert _state(relay_pid) is None
        assert server.err.grep("relaying on " + path) and server.err.grep("SIGTERM: stopping the relay")


@pytest.mark.timeout(60)
def test_gunicorn_does_not_start_when_the_relay_cannot(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "s" * (MAX_PATH - len(bus_dir)))  # 108 bytes: one too many
    with _gunicorn(path, _free_port()) as server:
        assert server.wait(30) != 0
        assert server.err.grep(f"cannot relay on {path}: the bus path is 108 bytes")
        assert server.err.grep("clustersync relay exited with status 1")
        assert not server.err.grep("Booting worker")


# ======================================================= bugs found, now fixed


@pytest.mark.timeout(60)
def test_a_peer_cut_off_sees_the_end_even_with_a_worker_forked_after_it_joined(bus_dir: str) -> None:
    path = os.path.join(bus_dir, "bus.sock")
    primary = Primary(start_method="fork", workers=1, listen=path)
    workers: Optional[Workers] = None
    sock: Optional[socket.socket] = None
    try:
        sock, _ = raw_join(path)
        workers = Workers(primary, 1)  # forked now: after the peer joined
        workers.parties[0].ready()
        sock.sendall(b"\xff" * 64)
        wait_for(lambda: primary.stats()["malformed"] == 1, timeout=20)  # the relay cut it off...
        assert_disconnected(sock, timeout=3)  # ...and the peer must see it (a 3 s observation window)
    finally:
        if sock is not None:
            sock.close()
        if workers is not None:
            workers.close()
        primary.close(timeout=5)


@pytest.mark.timeout(60)
def test_a_relay_of_another_user_does_not_replace_a_live_relay(bus_dir: str) -> None:
    _need_root()
    os.chmod(bus_dir, 0o777)  # a directory both users may write to
    path = os.path.join(bus_dir, "bus.sock")
    drop = f"import os; os.setgroups([]); os.setgid({NOBODY.pw_gid}); os.setuid({NOBODY.pw_uid})"
    with relay(path) as first:
        inode = os.stat(path).st_ino
        # What the relay imports, imported before the drop: that user may not read this Python's files.
        imports = "import sys, shutil, clustersync.runner.bus, clustersync.relay.bus, clustersync.relay.primary"
        code = f"{imports}; from clustersync.runner.cli import main; {drop}; sys.exit(main(sys.argv[1:]))"
        with Proc(sys.executable, "-c", code, "relay", "--bus", path) as second:
            (line,) = second.err.wait(lambda lines: lines[:1], 20, "the second relay said nothing")
            assert f"cannot relay on {path}" in line and second.wait() == 1, line
        st = os.stat(path)
        assert (st.st_ino, st.st_uid) == (inode, 0)
        assert first.popen.poll() is None
