"""The real-server helpers of tests/servers.py: start, round trip, kill, restart, freeze, thaw."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List

import pytest

from . import conftest
from .conftest import _descendants
from .servers import PIP_HINT, SERVER_PIDS, MissingWheel, NatsServer, PostgresServer, RedisServer, Server, process_tree

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

FROZEN_TIMEOUT = 0.3  # seconds a request to a frozen server waits before it counts as timed out

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------- one real client round trip per server


def redis_ping(server: Server, timeout: float = 2.0) -> None:
    import redis

    client = redis.Redis.from_url(server.url, socket_timeout=timeout, retry=None)  # redis-py retries by default
    try:
        assert client.ping() is True
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        client.close()


def postgres_select(server: Server, timeout: float = 2.0) -> None:
    import psycopg

    with psycopg.connect(server.url, connect_timeout=max(2, int(timeout)), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def nats_connect(server: Server, timeout: float = 2.0) -> NatsClient:
    """A nats-py client that gives up at once if the server is down.

    Even with allow_reconnect=False, nats-py retries a refused first connect
    max_reconnect_attempts (60) times, reconnect_time_wait (2 s) apart.
    """
    import nats

    async def quiet(exc: Exception) -> None:
        pass

    return await nats.connect(
        server.url,
        connect_timeout=timeout,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        error_cb=quiet,
    )


def nats_flush(server: Server, timeout: float = 2.0) -> None:
    async def main() -> None:
        nc = await nats_connect(server, timeout)
        try:
            await nc.flush(timeout=timeout)  # type: ignore[arg-type]  # typed int, takes float
        finally:
            await nc.close()

    asyncio.run(main())


ROUND_TRIP: Dict[str, Callable[[Server], None]] = {
    "redis_server": redis_ping,
    "postgres_server": postgres_select,
    "nats_server": nats_flush,
}


def fails(round_trip: Callable[[Server], None], server: Server) -> bool:
    try:
        round_trip(server)
    except conftest.TestTimeout:  # the test's own deadline is no outage
        raise
    except Exception:
        return True
    return False


# --------------------------------------------------------------- round trips


def test_redis_round_trip(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    redis_ping(redis_server)


def test_postgres_select_and_listen_notify(postgres_server: PostgresServer) -> None:
    import psycopg

    assert postgres_server.url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    with psycopg.connect(postgres_server.url, autocommit=True) as listener, psycopg.connect(
        postgres_server.url, autocommit=True
    ) as notifier:
        assert listener.execute("SELECT 1").fetchone() == (1,)
        listener.execute("LISTEN app")
        notifier.execute("SELECT pg_notify('app', 'hello')")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
        assert got == [("app", "hello")]


def test_nats_publish_subscribe(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"

    async def main() -> bytes:
        nc = await nats_connect(nats_server)
        try:
            sub = await nc.subscribe("app")
            await nc.publish("app", b"hello")
            return (await sub.next_msg(timeout=5)).data
        finally:
            await nc.close()

    assert asyncio.run(main()) == b"hello"


# --------------------------------------------------------------- outages


@pytest.mark.parametrize("fixture", sorted(ROUND_TRIP))
def test_kill_then_restart_on_the_same_port(fixture: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(fixture)
    round_trip = ROUND_TRIP[fixture]
    port, pid = server.port, server.pid
    round_trip(server)
    server.kill()
    assert not server.running and server.pid is None and pid not in SERVER_PIDS
    assert fails(round_trip, server)
    server.start()
    assert server.port == port and server.pid != pid and server.pid in SERVER_PIDS
    round_trip(server)
    server.restart()
    round_trip(server)


def test_redis_freeze_then_thaw(redis_server: RedisServer) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url, socket_timeout=FROZEN_TIMEOUT, retry=None)
    try:
        assert client.ping()
        redis_server.freeze()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            redis_server.thaw()
        assert client.ping()  # on a new connection: redis-py drops one that timed out
    finally:
        client.close()


def test_postgres_freeze_then_thaw(postgres_server: PostgresServer) -> None:
    """Freezing stops the backends too: a query on an open connection gets no answer until thawed."""
    import psycopg

    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        pgconn = conn.pgconn
        postgres_server.freeze()
        try:
            pgconn.send_query(b"SELECT 1")
            assert pgconn.flush() == 0
            readable, _, _ = select.select([pgconn.socket], [], [], FROZEN_TIMEOUT)
            assert not readable, "a frozen server answered"
        finally:
            postgres_server.thaw()
        deadline = time.monotonic() + 5
        while pgconn.is_busy():
            assert time.monotonic() < deadline, "no answer after thaw"
            select.select([pgconn.socket], [], [], 0.1)
            pgconn.consume_input()
        result = pgconn.get_result()
        assert result is not None and result.get_value(0, 0) == b"1"
        while pgconn.get_result() is not None:
            pass
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_nats_freeze_then_thaw(nats_server: NatsServer) -> None:
    from nats.errors import TimeoutError as NatsTimeout

    async def main() -> None:
        nc = await nats_connect(nats_server)
        try:
            await nc.flush(timeout=2)
            nats_server.freeze()
            try:
                with pytest.raises(NatsTimeout):
                    await nc.flush(timeout=FROZEN_TIMEOUT)  # type: ignore[arg-type]
            finally:
                nats_server.thaw()
        finally:
            await nc.close()

    asyncio.run(main())
    nats_flush(nats_server)


def test_left_broken(redis_server: RedisServer, nats_server: NatsServer, postgres_server: PostgresServer) -> None:
    """Leaves the session servers killed and frozen: the next test must find them working."""
    redis_server.kill()
    nats_server.freeze()
    postgres_server.kill()


def test_restored_after_a_test_broke_them(
    redis_server: RedisServer, nats_server: NatsServer, postgres_server: PostgresServer
) -> None:
    redis_ping(redis_server)
    nats_flush(nats_server)
    postgres_select(postgres_server)


# --------------------------------------------------------------- plumbing


def test_stop_is_graceful_idempotent_and_leaves_nothing(fresh_postgres: PostgresServer) -> None:
    postgres_select(fresh_postgres)
    assert fresh_postgres.pid is not None
    tree = process_tree(fresh_postgres.pid)
    assert len(tree) > 1, "postgres has children"
    fresh_postgres.stop()
    fresh_postgres.stop()
    assert not fresh_postgres.running
    assert not set(tree) & set(_all_descendants())
    fresh_postgres.close()
    assert not fresh_postgres.dir.exists()


def _all_descendants() -> List[int]:
    """Every live descendant of this process, server or not (unlike the leak check)."""
    return process_tree(os.getpid())[1:]


def test_leak_check_ignores_servers_only(fresh_redis: RedisServer) -> None:
    assert fresh_redis.pid in _all_descendants()
    assert fresh_redis.pid not in _descendants()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as other:
        try:
            assert other.pid in _descendants()
        finally:
            other.kill()


def test_context_manager() -> None:
    with NatsServer() as server:
        nats_flush(server)
        pid = server.pid
    assert pid not in _all_descendants() and not server.dir.exists()


def test_missing_wheel_names_the_pip_line(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike) -> None:
    monkeypatch.setattr(sys, "executable", os.path.join(str(tmp_path), "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingWheel, match=PIP_HINT.replace("[", r"\[").replace(".", r"\.")):
        NatsServer()
