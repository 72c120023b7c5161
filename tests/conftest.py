"""Test plumbing: a hard per-test timeout, and cleanup of every process a test starts."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from typing import Callable, Iterator, List, Optional, Type, TypeVar

import pytest

from .servers import SERVER_PIDS, MissingWheel, parents, NatsServer, PostgresServer, RedisServer, Server

DEFAULT_TIMEOUT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): fail the test if it runs longer")


class TestTimeout(Exception):
    """A test ran past its deadline."""


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that runs longer than its ``timeout`` mark (default 60 s)."""
    marker = request.node.get_closest_marker("timeout")
    seconds = float(marker.args[0]) if marker else DEFAULT_TIMEOUT

    def expire(signum: int, frame: object) -> None:
        raise TestTimeout(f"test ran longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    faulthandler.dump_traceback_later(seconds + 5, exit=True)  # the last resort if the alarm cannot fire
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    """Kill any process a test left behind (children and their children), and fail the test for it."""
    before = set(_descendants())
    yield
    deadline = time.monotonic() + 5
    left = set(_descendants()) - before
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = set(_descendants()) - before
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        pytest.fail(f"test left processes behind: {sorted(left)}")


def _descendants() -> List[int]:
    """Pids of this process's live (non-zombie) descendants, from /proc.

    multiprocessing's long-lived helpers (the forkserver, the resource
    tracker) are not leaks; the workers a forkserver starts are counted.
    Nor are the servers of tests/servers.py (``SERVER_PIDS``) and their own
    descendants (postgres backends): session-scoped servers outlive the test
    that starts them.
    """
    me = os.getpid()
    parent = parents()
    out = []
    for pid in parent:
        if pid == me:
            continue
        p: Optional[int] = pid
        while p is not None and p != me and p not in SERVER_PIDS:
            p = parent.get(p)
        if p == me and not (parent[pid] == me and _is_helper(pid)):  # a forkserver's children are workers
            out.append(pid)
    return out


def _is_helper(pid: int) -> bool:
    """multiprocessing's long-lived helpers (forkserver, resource tracker) are not leaks."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"forkserver" in cmdline or b"resource_tracker" in cmdline


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> object:
    """Poll ``predicate`` until it is truthy; raise AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


# --------------------------------------------------------------- real servers (tests/servers.py)

S = TypeVar("S", bound=Server)
_SHARED: List[Server] = []  # the session-scoped servers started so far


def _serve(cls: Type[S]) -> Iterator[S]:
    """Start a ``cls`` server, yield it, close it; a missing wheel fails (never skips)."""
    try:
        server = cls()
    except MissingWheel as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    try:
        yield server
    finally:
        server.close()


def _shared(cls: Type[S]) -> Iterator[S]:
    """Like ``_serve``, and restored after each test by ``_shared_servers_restored``."""
    serving = _serve(cls)
    server = next(serving)
    _SHARED.append(server)
    try:
        yield server
    finally:
        _SHARED.remove(server)
        next(serving, None)  # closes it


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 for the whole session, started on first use."""
    yield from _shared(RedisServer)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server on 127.0.0.1 for the whole session, started on first use."""
    yield from _shared(NatsServer)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session, started on first use (~1 s)."""
    yield from _shared(PostgresServer)


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (~20 ms)."""
    yield from _serve(RedisServer)


@pytest.fixture
def fresh_nats() -> Iterator[NatsServer]:
    """A nats-server of this test's own (~40 ms)."""
    yield from _serve(NatsServer)


@pytest.fixture
def fresh_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own (~1 s: initdb)."""
    yield from _serve(PostgresServer)


@pytest.fixture(autouse=True)
def _shared_servers_restored() -> Iterator[None]:
    """A test that killed or froze a session server leaves it running (thawed) for the next."""
    yield
    for server in _SHARED:
        server.ensure_running()
