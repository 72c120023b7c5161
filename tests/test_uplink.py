"""The host uplink (clustersync/relay/uplink.py): two "hosts" on one machine, joined by a real backplane.

Each host is a primary with ``uplink=URL`` (a :class:`Primary` in this
process, or ``python -m clustersync run ... --uplink URL`` as a subprocess)
and its own worker processes, on channel "app". Every test runs on the
three backplanes (redis, postgres, nats), against the real servers of
tests/servers.py; nothing is mocked. Workers are driven over a Pipe each (no
shared locks), and every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest

from clustersync import Address, Hub, Message
from clustersync.message import UPLINK_WORKER
from clustersync.relay.primary import Primary
from clustersync.relay.uplink import uplink
from clustersync.sync import from_url

from .apps.uplink import agent, record_of
from .conftest import wait_for
from .runner_harness import Run
from .servers import Server

NETWORK = ["redis", "postgres", "nats"]
WAIT = 15.0  # seconds for something that takes milliseconds on an idle machine

pytestmark = pytest.mark.timeout(45)


@pytest.fixture(params=NETWORK)
def server(request: pytest.FixtureRequest) -> Server:
    """The session's server of each backplane in turn."""
    srv: Server = request.getfixturevalue(f"{request.param}_server")
    return srv


# --------------------------------------------------------------- a host: a primary with an uplink, agents in its workers


class Host:
    """A :class:`Primary` with an uplink, one agent (tests/apps/uplink.py) per worker, driven over Pipes."""

    def __init__(self, url: Any, hubs: Sequence[int] = (1, 1), channel: str = "app") -> None:
        self.primary = Primary(workers=len(hubs), uplink=url)
        self.conns: List[Any] = []
        self.addresses: List[List[Address]] = []
        try:
            for n in hubs:
                parent, child = multiprocessing.Pipe()
                self.primary.fork(agent, child, channel, n)
                child.close()
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Every hub of every worker is ready: the uplink has the channel on the backplane."""
        for index, conn in enumerate(self.conns):
            assert conn.poll(WAIT), f"worker {index} did not report"
            kind, worker, addresses, ready = conn.recv()
            assert (kind, worker, ready) == ("ready", index, True), (kind, worker, ready)
            self.addresses.append(addresses)

    def call(self, worker: int, *cmd: Any) -> Any:
        conn = self.conns[worker]
        conn.send(cmd)
        assert conn.poll(WAIT), f"worker {worker} did not answer {cmd[0]!r}"
        return conn.recv()

    def publish(self, worker: int, topic: str, datas: Sequence[Any], to: Any = None, hub: int = 0) -> None:
        assert self.call(worker, "publish", hub, topic, list(datas), to) == ("ok", len(datas))

    def got(self, worker: int, hub: int = 0) -> List[Tuple[Any, ...]]:
        result: List[Tuple[Any, ...]] = self.call(worker, "got", hub)
        return result

    def uplink(self) -> Dict[str, Any]:
        stats: Dict[str, Any] = self.primary.stats()["uplink"]
        return stats

    def close(self) -> None:
        try:
            for conn in self.conns:
                try:
                    conn.send(("quit",))
                except OSError:
                    pass
            self.primary.close(timeout=5)
        finally:
            for conn in self.conns:
                conn.close()


class Hosts:
    """Several hosts, started together (their workers boot in parallel), all closed even on failure."""

    def __init__(self, *specs: Tuple[Any, Sequence[int]]) -> None:
        self.hosts: List[Host] = []
        try:
            for url, hubs in specs:
                self.hosts.append(Host(url, hubs))
            for host in self.hosts:
                host.wait_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        errors = []
        for host in self.hosts:
            try:
                host.close()
            except BaseException as exc:  # noqa: BLE001  close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> List[Host]:
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        self.close()


def data_of(records: List[Tuple[Any, ...]], topic: str) -> List[Any]:
    return [r[4] for r in records if r[1] == topic]


def wait_records(host: Host, worker: int, want: Callable[[List[Tuple[Any, ...]]], bool], hub: int = 0) -> List[Tuple[Any, ...]]:
    """Poll a hub's records until ``want(records)``; return them."""
    last: List[List[Tuple[Any, ...]]] = [[]]

    def check() -> bool:
        last[0] = host.got(worker, hub)
        return want(last[0])

    try:
        wait_for(check, WAIT, 0.02)
    except AssertionError:
        raise AssertionError(f"worker {worker} hub {hub} has {last[0]}") from None
    return last[0]


def at_least(count: int, topic: str = "t") -> Callable[[List[Tuple[Any, ...]]], bool]:
    """A condition for :func:`wait_records`: at least ``count`` messages on ``topic``."""
    return lambda records: len(data_of(records, topic)) >= count


def by_origin(records: List[Tuple[Any, ...]], topic: str) -> Dict[Address, List[Any]]:
    """The data of ``topic`` by origin, in arrival order."""
    out: Dict[Address, List[Any]] = {}
    for _, t, worker, hub, data in records:
        if t == topic:
            out.setdefault(Address(worker, hub), []).append(data)
    return out


def remote(address: Address) -> Address:
    """``address`` as the hubs of another host see it (through their uplink)."""
    return Address(UPLINK_WORKER, f"{address.worker}/{address.hub}")


# --------------------------------------------------------------- 1. all to all, two real `clustersync run` subprocesses


def _json_files(directory: Path, pattern: str) -> Dict[str, Any]:
    return {p.name: json.loads(p.read_text()) for p in directory.glob(pattern) if not p.name.endswith(".tmp")}


@pytest.mark.timeout(60)
def test_two_runners_all_to_all_with_a_direct_driver_hub(server: Server, tmp_path: Path) -> None:
    """Two ``clustersync run -w 2 --uplink URL`` and a hub on the driver itself: everyone hears everyone once, in order."""
    count = 150
    got: List[Tuple[str, Address, Any]] = []
    direct = Hub(sync=from_url(server.url, channel="app"))
    runs: List[Run] = []
    try:
        direct.subscribe("t", lambda m: got.append(("t", m.origin, m.data)))
        direct.subscribe("end", lambda m: got.append(("end", m.origin, m.data)))
        assert direct.wait_ready(WAIT)
        env = {"TEST_STATE_DIR": str(tmp_path), "TEST_COUNT": str(count), "TEST_PEERS": "4"}
        for host in ("a", "b"):
            args = ["tests.apps.uplink:all_to_all", "-w", "2", "--uplink", server.url, "--restart", "never"]
            runs.append(Run(*args, "--graceful-timeout", "5", env=dict(env, TEST_HOST=host)))
        for run in runs:
            run.wait_line(f"uplink {re.escape(server.url)}", timeout=WAIT)
        try:
            wait_for(lambda: len(_json_files(tmp_path, "ready-*")) == 4, 30)
        except AssertionError:
            raise AssertionError("\n\n".join(run.log for run in runs)) from None
        ready = _json_files(tmp_path, "ready-*")
        assert all(r["ready"] for r in ready.values()), ready
        addresses = {name[len("ready-"):]: Address(*r["address"]) for name, r in ready.items()}
        (tmp_path / "go").touch()
        for i in range(count):
            direct.publish("t", {"host": "direct", "w": -1, "hub": direct.id, "i": i})
        direct.publish("end", {"host": "direct"})
        try:
            wait_for(lambda: len(_json_files(tmp_path, "result-*.json")) == 4, 30)
        except AssertionError:
            raise AssertionError("\n\n".join(run.log for run in runs)) from None
        results = _json_files(tmp_path, "result-*.json")
        try:
            wait_for(lambda: sum(1 for kind, origin, _ in got if kind == "end" and origin != direct.address) == 4, WAIT)
        except AssertionError:
            pass  # the check below says what is missing
        (tmp_path / "done").touch()
        for run in runs:
            assert run.wait(WAIT) == 0, run.log
    finally:
        for run in runs:
            run.close()
        direct.close()

    problems: List[str] = []
    late = _json_files(tmp_path, "late-*")
    if late:
        problems.append(f"received after reporting: {late}")

    def check(me: str, received: List[Tuple[str, Address, Any]]) -> None:
        """``received``: (topic, origin, data) in arrival order, as hub ``me`` saw them."""
        expected: Dict[Address, str] = {}  # origin as this hub sees it -> who published
        for name, address in addresses.items():
            if name == me or me == "direct" or name[0] == me[0]:
                expected[address] = name  # itself (local delivery), the same host, or seen by a direct hub
            else:
                expected[remote(address)] = name  # through both uplinks
        expected[direct.address if me == "direct" else remote(direct.address)] = "direct"
        by_origin: Dict[Address, List[Tuple[str, Any]]] = {}
        for topic, origin, data in received:
            by_origin.setdefault(origin, []).append((topic, data))
        if set(by_origin) != set(expected):
            problems.append(f"{me}: origins {sorted(map(str, by_origin))}, not {sorted(map(str, expected))}")
        for origin, who in expected.items():
            items = by_origin.get(origin, [])
            host = "direct" if who == "direct" else who[0]
            if [t for t, _ in items] != ["t"] * count + ["end"]:
                problems.append(f"{me} got {len(items)} messages from {who}, not {count} and 'end'")
            elif [d["i"] for _, d in items[:-1]] != list(range(count)):
                problems.append(f"{me} got {who}'s messages out of order")
            elif not all(d["host"] == host for _, d in items):
                problems.append(f"{me}: messages under {who}'s address are not all {who}'s")

    for name, result in sorted(results.items()):
        me = name[len("result-"):-len(".json")]
        check(me, [(topic, Address(worker, hub), data) for topic, worker, hub, data in result["got"]])
        stats = result["stats"]
        if stats["errors"] or stats["dropped"]:
            problems.append(f"{me}: {stats}")
    check("direct", got)
    if problems and any("the backplane is down" in run.log for run in runs):
        problems.insert(0, "NOTE: an uplink had an outage during the exchange (see its log below)")
    assert not problems, "\n".join(problems + [run.log for run in runs])


# --------------------------------------------------------------- 2. local traffic never reaches the backplane


def test_addressed_local_traffic_stays_on_the_host_and_a_broadcast_crosses_once(server: Server) -> None:
    n, m = 40, 25
    with Hosts((server.url, (1, 1)), (server.url, (1, 1))) as (a, b):
        a1 = a.addresses[1][0]
        forwarded, injected = a.uplink()["forwarded"], b.uplink()["injected"]
        a.publish(0, "t", [f"hub{i}" for i in range(n)], to=a1)  # one hub of this host
        a.publish(0, "t", [f"worker{i}" for i in range(n)], to=1)  # every hub of worker 1 of this host
        a.publish(0, "t", ["marker"])  # behind them on the way to the uplink (per-publisher FIFO)
        for worker in (0, 1):
            wait_records(b, worker, lambda r: "marker" in data_of(r, "t"))
        wait_for(lambda: a.uplink()["forwarded"] >= forwarded + 1, WAIT)
        assert a.uplink()["forwarded"] == forwarded + 1, a.uplink()
        expected = [f"hub{i}" for i in range(n)] + [f"worker{i}" for i in range(n)] + ["marker"]
        assert data_of(a.got(1), "t") == expected
        assert data_of(a.got(0), "t") == ["marker"]  # its own broadcast, delivered locally; not the addressed ones
        for worker in (0, 1):
            assert data_of(b.got(worker), "t") == ["marker"]

        # A broadcast reaches both workers of this host, and crosses once, not once per worker.
        a.publish(0, "t", [f"b0-{i}" for i in range(m)])
        a.publish(1, "t", [f"b1-{i}" for i in range(m)])
        for worker in (0, 1):
            records = wait_records(b, worker, at_least(1 + 2 * m))
            assert by_origin(records, "t") == {
                remote(a.addresses[0][0]): ["marker"] + [f"b0-{i}" for i in range(m)],
                remote(a1): [f"b1-{i}" for i in range(m)],
            }
        wait_for(lambda: b.uplink()["injected"] >= injected + 1 + 2 * m, WAIT)
        assert a.uplink()["forwarded"] == forwarded + 1 + 2 * m, a.uplink()
        assert b.uplink()["injected"] == injected + 1 + 2 * m, b.uplink()
        for worker in (0, 1):
            records = wait_records(a, worker, at_least(1 + 2 * m + (2 * n if worker else 0)))
            assert by_origin(records, "t") == {
                a.addresses[0][0]: ([f"hub{i}" for i in range(n)] + [f"worker{i}" for i in range(n)] if worker else [])
                + ["marker"] + [f"b0-{i}" for i in range(m)],
                a1: [f"b1-{i}" for i in range(m)],
            }
        assert a.uplink()["unreachable"] == 0 and b.uplink()["unreachable"] == 0
        for host in (a, b):
            assert host.primary.stats()["dropped"] == 0


# --------------------------------------------------------------- 3. to= across hosts, and a direct driver hub


def test_answers_cross_hosts_to_exactly_one_hub(server: Server) -> None:
    """Hub h0 of B's worker 0 asks; every other hub (A's, B's, and a direct one) answers ``to=msg.origin``.

    B's worker 0 runs two hubs, so only the hub id can tell the asker apart.
    Then the direct hub asks, and every hub behind the uplinks answers it.
    """
    lock_free: List[Tuple[Any, ...]] = []  # the direct hub's records (list.append from its delivery thread)
    direct = Hub(sync=from_url(server.url, channel="app"))
    try:
        for topic in ("t", "ask", "answer", "fin"):
            direct.subscribe(topic, lambda msg: lock_free.append(record_of(0, msg)))

        def answer(msg: Message) -> None:
            if msg.origin == direct.address:
                return  # its own question, delivered locally
            direct.publish("answer", msg.data, to=msg.origin)
            direct.publish("fin", msg.data)

        direct.subscribe("ask", answer)
        assert direct.wait_ready(WAIT)
        with Hosts((server.url, (1, 1)), (server.url, (2, 1))) as (a, b):
            asker = b.addresses[0][0]
            hubs = [(a, 0, 0), (a, 1, 0), (b, 0, 0), (b, 0, 1), (b, 1, 0)]  # (host, worker, hub)

            def fins(data: str) -> Callable[[List[Tuple[Any, ...]]], bool]:
                return lambda r: sum(1 for x in r if x[1] == "fin" and x[4] == data) >= 5

            b.publish(0, "ask", ["q-b"], hub=0)
            # Five answerers, each also broadcasting "fin" after its answer: whoever has all five fins
            # would have had any misdelivered answer before them (per-publisher FIFO).
            for host, worker, hub in hubs:
                wait_records(host, worker, fins("q-b"), hub)
            wait_for(lambda: fins("q-b")(list(lock_free)), WAIT)

            seen_by_a = [r for r in a.got(0) if r[1] == "ask"]
            assert [(r[2], r[3]) for r in seen_by_a] == [remote(asker)]
            assert str(Address(*seen_by_a[0][2:4])) == f"remote/0/{asker.hub}"
            answers = sorted((r[2], r[3]) for r in b.got(0, 0) if r[1] == "answer" and r[4] == "q-b")
            assert answers == sorted(
                [remote(a.addresses[0][0]), remote(a.addresses[1][0]), b.addresses[0][1], b.addresses[1][0], remote(direct.address)]
            )
            for host, worker, hub in hubs[:2] + hubs[3:]:
                assert not [r for r in host.got(worker, hub) if r[1] == "answer"], (worker, hub)
            assert not [r for r in lock_free if r[1] == "answer"]

            # The direct hub asks: the five hubs behind the uplinks answer it alone.
            direct.publish("ask", "q-d")
            for host, worker, hub in hubs:
                wait_records(host, worker, fins("q-d"), hub)
            wait_for(lambda: fins("q-d")(list(lock_free)), WAIT)
            answers = sorted((r[2], r[3]) for r in lock_free if r[1] == "answer" and r[4] == "q-d")
            assert answers == sorted(
                [a.addresses[0][0], a.addresses[1][0], b.addresses[0][0], b.addresses[0][1], b.addresses[1][0]]
            )
            for host, worker, hub in hubs:
                assert not [r for r in host.got(worker, hub) if r[1] == "answer" and r[4] == "q-d"], (worker, hub)
            for host in (a, b):
                assert host.primary.stats()["dropped"] == 0
            assert direct.stats()["errors"] == 0
    finally:
        direct.close()


# --------------------------------------------------------------- 4. an outage of the backplane


@pytest.mark.timeout(60)
def test_an_outage_never_disturbs_the_local_relay(server: Server) -> None:
    n = 30
    url = uplink(server.url, reconnect_max=0.5)  # back soon after the server is
    with Hosts((url, (1, 1)), (url, (1, 1))) as (a, b):
        a0, a1 = a.addresses[0][0], a.addresses[1][0]
        a.publish(0, "t", ["before"])
        for worker in (0, 1):
            wait_records(b, worker, lambda r: data_of(r, "t") == ["before"])

        server.kill()
        wait_for(lambda: not any(host.uplink()["up"] for host in (a, b)), WAIT)
        lost, forwarded = a.uplink()["lost"], a.uplink()["forwarded"]
        a.publish(0, "t", [f"w0-{i}" for i in range(n)])
        a.publish(1, "t", [f"w1-{i}" for i in range(n)])
        a.publish(0, "t", [f"to-w1-{i}" for i in range(n)], to=a1)
        # The relay goes on: each worker gets each message once, in order per publisher.
        want = {
            0: {a0: ["before"] + [f"w0-{i}" for i in range(n)], a1: [f"w1-{i}" for i in range(n)]},
            1: {a0: ["before"] + [f"w0-{i}" for i in range(n)] + [f"to-w1-{i}" for i in range(n)],
                a1: [f"w1-{i}" for i in range(n)]},
        }  # fmt: skip
        for worker in (0, 1):
            total = sum(map(len, want[worker].values()))
            records = wait_records(a, worker, at_least(total))
            assert by_origin(records, "t") == want[worker], worker
        # What could not cross is counted lost, once per message (the addressed ones never tried),
        # and not as forwarded.
        wait_for(lambda: a.uplink()["lost"] >= lost + 2 * n, WAIT)
        stats = a.uplink()
        assert stats["lost"] == lost + 2 * n and stats["forwarded"] == forwarded and not stats["up"], stats
        assert a.primary.stats()["dropped"] == 0

        started = time.monotonic()
        server.start()
        wait_for(lambda: all(host.uplink()["up"] for host in (a, b)), WAIT)
        assert time.monotonic() - started < 10
        for host in (a, b):
            stats = host.uplink()
            assert stats["outages"] >= 1 and stats["reconnects"] >= 1, stats

        # Cross-host traffic resumes, both ways; what was published during the outage never shows up.
        a.publish(1, "t", [f"after{i}" for i in range(n)])
        b.publish(0, "t", ["from-b"])
        for worker in (0, 1):
            records = wait_records(b, worker, lambda r: len([x for x in r if x[2] == UPLINK_WORKER]) >= 1 + n)
            assert by_origin([r for r in records if r[2] == UPLINK_WORKER], "t") == {
                remote(a0): ["before"],
                remote(a1): [f"after{i}" for i in range(n)],
            }
        for worker in (0, 1):
            records = wait_records(a, worker, lambda r: "from-b" in data_of(r, "t"))
            assert [(r[2], r[3]) for r in records if r[4] == "from-b"] == [remote(b.addresses[0][0])]
        for host in (a, b):
            assert host.primary.stats()["dropped"] == 0


def test_a_frozen_backplane_never_slows_the_local_relay(server: Server) -> None:
    """The server freezes before anyone notices (a long ping interval): the uplink's queue fills, and it drops
    for other hosts instead of waiting, so the relay never declares it stalled and the workers talk on."""
    n = 3000
    pad = "x" * 16384  # 48 MiB in all: past the relay's high-water mark for a peer that stops reading
    url = uplink(server.url, ping_interval=60, ping_timeout=10, queue_size=50)
    with Hosts((url, (1, 1))) as (a,):
        a0 = a.addresses[0][0]
        server.freeze()
        try:
            a.publish(0, "t", [f"m{i}{pad}" for i in range(n)])
            records = wait_records(a, 1, at_least(n))
            assert by_origin(records, "t") == {a0: [f"m{i}{pad}" for i in range(n)]}
            wait_for(lambda: a.uplink()["lost"] > 0, WAIT)  # dropped for other hosts, counted
            stats = a.primary.stats()
            assert stats["stalls"] == 0 and stats["dropped"] == 0, stats
        finally:
            server.thaw()


def test_a_message_over_the_backplane_limit_stays_on_the_host_alone(nats_server: Server) -> None:
    """NATS carries at most max_payload (1 MiB) a message; the relay 8 MiB. What is too big for the
    backplane is dropped and counted alone (too_big), not an outage that takes what follows with it."""
    with Hosts((nats_server.url, (1, 1)), (nats_server.url, (1,))) as (a, b):
        big = b"x" * (2 * 1024 * 1024)
        a.publish(0, "t", [big, "small"])
        wait_for(lambda: a.uplink()["outages"] or "small" in data_of(b.got(0), "t"), WAIT)
        stats = a.uplink()
        assert stats["outages"] == 0 and stats["up"] and stats["too_big"] == 1, stats
        assert stats["forwarded"] == 1 and stats["lost"] == 0, stats
        assert data_of(b.got(0), "t") == ["small"]
        assert data_of(wait_records(a, 1, at_least(2)), "t") == [big, "small"]  # this host's relay carries it


# --------------------------------------------------------------- 5. the runner's flag


@pytest.mark.parametrize("how", ["option", "environment"])
def test_runner_refuses_an_unknown_uplink_scheme(how: str) -> None:
    args = ["tests.apps.boot:forever", "-w", "1"]
    env = {}
    if how == "option":
        args += ["--uplink", "foo://x"]
    else:
        env["CLUSTERSYNC_UPLINK"] = "foo://x"
    with Run(*args, env=env) as run:
        assert run.wait(WAIT) == 2, run.log
    lines = [line for line in run.lines if "foo://x" in line]
    assert len(lines) == 1, run.log
    for scheme in ("redis://", "rediss://", "postgresql://", "postgres://", "nats://"):
        assert scheme in lines[0], lines[0]
