"""The cluster driver and the primary's relay, across real worker processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Dict, List

import pytest

from clustersync import Address, Hub
from clustersync.relay.primary import Primary
from clustersync.sync import cluster, setup_primary_cluster

from . import workers
from .relay_helpers import check_exchange, collect, run_workers
from .conftest import wait_for


@pytest.mark.timeout(60)
def test_fanout_reaches_every_other_worker_once() -> None:
    out = run_workers(workers.exchange, 3, "fan", 200, [0], "json")
    check_exchange(out, 3, 200, [0], "json")


@pytest.mark.timeout(90)
def test_all_to_all_order_and_no_loss_10000_messages_4_workers() -> None:
    out = run_workers(workers.exchange, 4, "order", 10_000, [0, 1, 2, 3], "json")
    check_exchange(out, 4, 10_000, [0, 1, 2, 3], "json")


@pytest.mark.timeout(60)
def test_bytes_and_str_survive_with_their_type() -> None:
    check_exchange(run_workers(workers.exchange, 2, "bin", 300, [0, 1], "bytes"), 2, 300, [0, 1], "bytes")
    check_exchange(run_workers(workers.exchange, 2, "txt", 300, [0, 1], "str"), 2, 300, [0, 1], "str")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_relay_under_other_start_methods(method: str) -> None:
    out = run_workers(workers.exchange, 3, "sp", 500, [0, 1, 2], "json", start_method=method)
    check_exchange(out, 3, 500, [0, 1, 2], "json")


@pytest.mark.timeout(60)
def test_two_hubs_in_one_worker_reach_each_other_once() -> None:
    out = run_workers(workers.two_hubs, 2)
    for index in (0, 1):
        _, got_a, got_b = out[index]
        # Each hub: its own two locally, the sibling hub's two through the relay, four from the other worker.
        assert got_a.count("from-a") == 2 and got_a.count("from-b") == 2
        assert got_b.count("from-b") == 2 and got_b.count("from-a") == 2
        assert len(got_a) == 8 and len(got_b) == 8


@pytest.mark.timeout(60)
def test_foreign_channel_does_not_bridge() -> None:
    out = run_workers(workers.channels, 3)
    assert out[1][1] == [f"a{i}" for i in range(100)]
    assert out[2][1] == ["marker"]


@pytest.mark.timeout(60)
def test_unicast_reaches_only_the_chosen_worker() -> None:
    out = run_workers(workers.unicast, 3)
    assert out[2][1] == [f"direct{i}" for i in range(10)] + ["marker"]
    assert out[1][1] == ["marker"]
    assert out[0][1] == ["marker"]  # its own, locally


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on_loop", [False, True], ids=["reader-thread", "read-on-loop"])
def test_async_for_on_a_subscription(on_loop: bool) -> None:
    out = run_workers(workers.async_iter, 2, 5000 if on_loop else 500, on_loop)
    assert out[1][1] == list(range(5000 if on_loop else 500))


@pytest.mark.timeout(60)
def test_worker_context_and_setup_in_a_worker(tmp_path: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    primary = Primary(start_method="fork", workers=2)
    try:
        primary.fork(workers.nested_setup, results)
        primary.fork(workers.nested_setup, results)
        assert primary.join(20)
        got = sorted(results.get(timeout=5) for _ in range(2))
    finally:
        primary.close()
    assert got == [(0, 2, True, True, "0", "2"), (1, 2, True, True, "1", "2")]


def test_setup_primary_cluster_twice_returns_the_same_object() -> None:
    first = setup_primary_cluster()
    try:
        assert first is not None
        assert setup_primary_cluster() is first
    finally:
        first.close()
    again = setup_primary_cluster()
    try:
        assert again is not first  # a closed primary is replaced
    finally:
        again.close()


def test_cluster_subscribe_outside_a_worker_raises() -> None:
    driver = cluster(channel="x")(Address(-1, "hub-id"))
    with pytest.raises(RuntimeError, match="setup_primary_cluster"):
        driver.subscribe(lambda m: None)
    errors: List[Any] = []
    hub = Hub(sync=cluster(channel="x"), on_error=lambda e, s: errors.append((type(e), s)))
    assert errors == [(RuntimeError, "subscribe")]
    assert hub.wait_ready(0) is False
    got: List[Any] = []
    hub.subscribe("t", got.append)
    hub.publish("t", "still local")  # local delivery works with the backplane down
    assert [m.data for m in got] == ["still local"]
    hub.close()


@pytest.mark.parametrize("channel", ["", None, 5, "x" * 256])
def test_bad_channel_raises_at_once(channel: Any) -> None:
    with pytest.raises(ValueError, match="channel"):
        cluster(channel=channel)


def test_missing_channel_raises() -> None:
    with pytest.raises(TypeError):
        cluster()  # type: ignore[call-arg]


def test_primary_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        Primary(start_method="thread")
    with pytest.raises(ValueError):
        Primary(max_buffer=0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "target,method",
    [
        ("sleeper", "fork"),
        ("busy", "fork"),
        ("spin", "fork"),
        ("spin", "spawn"),
        ("spin", "forkserver"),
        ("getter", "fork"),
        ("looper", "fork"),
    ],
)
def test_worker_exits_when_the_primary_dies(tmp_path: Any, target: str, method: str) -> None:
    """SIGKILL the primary, idle, under heavy traffic, holding the GIL in a C call, or while the application's
    thread (in get()) or event loop reads the pipe: every worker exits within 2 s."""
    script = tmp_path / "primary.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.getcwd()!r})
            import multiprocessing
            from clustersync.relay.primary import Primary
            from tests import workers
            if __name__ == "__main__":
                q = multiprocessing.get_context({method!r}).SimpleQueue()
                p = Primary(start_method={method!r})
                p.fork(workers.{target}, q)
                p.fork(workers.{target}, q)
                print(q.get(), q.get(), flush=True)
                p.join()
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids: List[int] = []
    try:
        line = proc.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2
        proc.kill()
        proc.wait(5)
        killed_at = time.monotonic()
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=5)
        assert time.monotonic() - killed_at < 2.5
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_slow_worker_drops_only_its_own() -> None:
    """A stopped worker costs at most max_buffer in the primary; drops are exact and its own.

    24 MiB are sent: more than the kernel buffers of a socket pair (8 MiB here) and max_buffer.
    """
    count = 6000
    max_buffer = 2 * 1024 * 1024
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    go, again = ctx.Event(), ctx.Event()
    primary = Primary(start_method="fork", workers=3, max_buffer=max_buffer)
    handles = []
    stopped = False

    try:
        handles = [primary.fork(workers.slow_consumer, results, go, again, count) for _ in range(3)]
        collect(results, "ready", 3)
        # Worker 2's queue feeder may still hold the queue's shared write lock right after its
        # "ready" arrived; stopping it then would block the other workers' puts. Wait it out.
        with results._wlock:  # type: ignore[attr-defined]
            os.kill(handles[2].pid, signal.SIGSTOP)
        stopped = True
        go.set()
        done = collect(results, "done", 1)
        assert done[0][1:] == (1, count + 1)  # the healthy worker got everything
        snapshot = primary.stats()
        stats = {w["index"]: w for w in snapshot["exited"] + snapshot["workers"]}
        assert stats[2]["dropped"] > 0 and stats[1]["dropped"] == 0
        assert stats[2]["stalled"] and snapshot["stalls"] >= 1  # flow control gave up on it, and said so
        assert stats[2]["buffered"] <= max_buffer
        os.kill(handles[2].pid, signal.SIGCONT)
        stopped = False
        again.set()
        done = collect(results, "done", 1)
        snapshot = primary.stats()
        stats = {w["index"]: w for w in snapshot["workers"] + snapshot["exited"]}
        received = done[0][2]
        assert received + stats[2]["dropped"] == count + 1  # exact: every message got or counted
        assert primary.join(20)
    finally:
        if stopped:
            os.kill(handles[2].pid, signal.SIGCONT)
        primary.close(timeout=5)
        results.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_to_reaches_only_the_addressed_hub_or_worker(method: str) -> None:
    out = run_workers(workers.addressed, 3, start_method=method)
    _, got0, errors, unreachable = out[0]
    _, got1, _, _ = out[1]
    _, got2, _, _ = out[2]
    assert got1["A"] == ["end"]  # the other hub of worker 1 saw nothing addressed to B
    assert got1["B"] == [f"only-B{i}" for i in range(5)] + ["end"]
    assert got2["A"] == [f"only-w2-{i}" for i in range(5)] + ["end"]
    # Every hub answered msg.origin: the answers reached worker 0's hub, and no other hub.
    acks = sorted(x for x in got0["A"] if isinstance(x, tuple))
    assert acks == [("ack", 0, "end"), ("ack", 1, "end"), ("ack", 1, "end"), ("ack", 2, "end")]
    assert [x for x in got0["A"] if not isinstance(x, tuple)] == ["end"]  # its own broadcast, locally
    # Destinations that do not exist: counted and reported, never raised.
    assert errors == [
        ("DestinationUnreachable", "publish", "7", 1),
        ("DestinationUnreachable", "publish", "w1/no-such-hub", 1),
    ]
    assert unreachable == 2
    assert out["stats"]["unroutable"] == 1  # worker 7: the primary's count


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_primary_blocked_on_a_queue_relays_exactly_once_in_order(tmp_path: Any, method: str) -> None:
    """setup_primary_cluster(), fork, then block on a Queue (or asyncio): the relay runs on its own thread."""
    script = tmp_path / "primary.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, multiprocessing, sys
            sys.path.insert(0, {os.getcwd()!r})
            from clustersync import setup_primary_cluster
            from tests import workers

            def collect(results):
                return [results.get(timeout=30) for _ in range(4)]

            async def in_asyncio(results):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(None, collect, results)

            if __name__ == "__main__":
                primary = setup_primary_cluster(start_method={method!r}, workers=4)
                ctx = multiprocessing.get_context(primary.start_method)
                results, barrier = ctx.Queue(), ctx.Barrier(4)
                for _ in range(4):
                    primary.fork(workers.exchange, results, barrier, "q", 2000, [0, 1, 2, 3], "json")
                if sys.argv[1] == "asyncio":
                    got = asyncio.run(in_asyncio(results))
                else:
                    got = collect(results)
                ok = True
                for index, address, ready, items, stats in got:
                    by = {{}}
                    for origin, data in items:
                        by.setdefault(origin, []).append(data["i"])
                    ok = ok and ready and len(by) == 4 and all(v == list(range(2000)) for v in by.values())
                print("exactly once, in order" if ok else f"FAILED {{got}}", flush=True)
                print("joined" if primary.join(30) else "join timed out", flush=True)
            """
        )
    )
    for mode in ("queue", "asyncio"):
        proc = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, timeout=50, start_new_session=True
        )
        assert proc.stdout.splitlines() == ["exactly once, in order", "joined"], proc.stdout + proc.stderr
        assert proc.returncode == 0


@pytest.mark.timeout(60)
def test_fork_and_stats_from_many_threads_at_once() -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    primary = Primary(start_method="fork")
    errors: List[BaseException] = []
    handles: List[Any] = []
    stats: List[Any] = []

    def starter() -> None:
        try:
            for _ in range(2):
                handles.append(primary.fork(workers.sleeper, results))
                stats.append(primary.stats())
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=starter) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert sorted(h.index for h in handles) == list(range(8))  # no index given twice
        pids = {results.get(timeout=10) for _ in range(8)}
        assert pids == {h.pid for h in handles}  # every worker runs
        assert len(stats) == 8 and all("workers" in s for s in stats)
        assert primary.stop_workers(timeout=10)
    finally:
        primary.close(timeout=5)
        results.close()


def test_importing_clustersync_for_broadcast_channel_loads_no_relay_module() -> None:
    code = textwrap.dedent(
        """
        import sys
        import clustersync
        from clustersync import Hub
        from clustersync.sync import broadcast_channel
        a, b = Hub(sync=broadcast_channel(channel="c")), Hub(sync=broadcast_channel(channel="c"))
        got = b.subscribe("t")
        a.publish("t", "x")
        assert got.get(timeout=5).data == "x"
        a.close(); b.close()
        loaded = sorted(m for m in sys.modules if m.startswith(("clustersync.relay", "clustersync.runner")))
        print(loaded, "multiprocessing" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=os.getcwd())
    assert proc.stdout.strip() == "[] False", proc.stdout + proc.stderr


@pytest.mark.timeout(60)
def test_the_primary_is_closed_at_interpreter_exit(tmp_path: Any) -> None:
    """A script that never joins or closes: at exit its workers are stopped gracefully, none is left."""
    script = tmp_path / "primary.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, sys
            sys.path.insert(0, {os.getcwd()!r})
            from clustersync import setup_primary_cluster
            from tests import workers
            if __name__ == "__main__":
                primary = setup_primary_cluster(start_method="fork")
                q = multiprocessing.get_context("fork").SimpleQueue()
                primary.fork(workers.sleeper, q)
                primary.fork(workers.sleeper, q)
                print(q.get(), q.get(), flush=True)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=40)
    pids = [int(x) for x in proc.stdout.split()]
    assert proc.returncode == 0 and len(pids) == 2, proc.stdout + proc.stderr
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_presence_table_over_the_relay() -> None:
    """A joining worker gets the table before it is ready; entries go with their hub, and with their worker."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    step = ctx.Event()
    primary = Primary(start_method="fork", workers=3)
    seen: Dict[Any, Any] = {}
    try:
        owner = primary.fork(workers.presence_node, results, step, "owner", index=0)
        assert results.get(timeout=10) == ("advertised", 0)
        primary.fork(workers.presence_node, results, step, "late", index=1)
        kind, index, table = results.get(timeout=10)
        assert (kind, index) == ("table", 1)
        assert table == [(0, "closed-with-its-hub", True), (0, "kept", True)]  # all there at wait_ready
        step.set()
        assert results.get(timeout=10) == ("closed", 0)
        with results._wlock:  # type: ignore[attr-defined]  # the owner holds no lock of the queue when killed
            os.kill(owner.pid, signal.SIGKILL)
        kind, index, final = results.get(timeout=10)
        seen[index] = final
    finally:
        primary.close(timeout=5)
        results.close()
    assert sorted(seen[1][:2]) == [(0, "closed-with-its-hub", True), (0, "kept", True)]
    assert seen[1][2:] == [(0, "closed-with-its-hub", False), (0, "kept", False)]  # with its hub, then its worker


@pytest.mark.timeout(60)
def test_runs_of_mixed_and_broken_payloads_decode_one_by_one() -> None:
    """A run whose payloads are all bytes, or all str, is decoded at once; one that mixes them, or holds a broken
    payload, message by message: each good one arrives in order, each broken one is reported, none stops the rest."""
    out = run_workers(workers.mixed_payloads, 2)
    _, got, errors = out[1]
    assert got == workers.MIXED_SEEN + [("m", "end")]
    assert errors == ["delivery"] * workers.MIXED_ERRORS


@pytest.mark.timeout(60)
def test_a_hub_that_keeps_a_topics_sender_still_sees_its_subscriptions_change() -> None:
    """The hub keeps a sender per topic it published to (its fast path): subscribing or unsubscribing here, to the
    topic or to a pattern, takes effect at the next publish all the same."""
    out = run_workers(workers.kept_senders, 2)
    _, local, errors = out[0]
    assert local == [("t", b"3"), ("t.*", "4"), ("t", {"five": 5})] and errors == 0
    _, remote, errors = out[1]
    assert remote == [b"1", "2", b"3", "4", {"five": 5}, "6", b"7", "end"] and errors == 0


@pytest.mark.timeout(60)
def test_the_kept_sender_takes_every_kind_of_value_as_the_first_publish_did() -> None:
    """Through the hub's kept sender (every publish to a topic after the first), values travel, and are refused,
    exactly as on the first publish: bytes-like values arrive as bytes, here and in the other worker."""
    out = run_workers(workers.kept_sender_values, 2)
    once = [b"raw", "text", {"a": [1, 2.5, None]}, 7, b"ba", b"mv"]
    _, local, errors, published = out[0]
    assert local == once + once + ["end"]
    assert [type(v) for v in local] == [type(v) for v in once + once + ["end"]]  # bytes, not bytearray
    assert errors == ["TypeError", "TypeError", "TypeError", "TypeError", "ValueError", "ValueError",
                      "TypeError", "TypeError"]
    assert published == 13  # refused values are not counted
    _, remote, _, _ = out[1]
    assert remote == once + once + ["end"]
    assert [type(v) for v in remote] == [type(v) for v in once + once + ["end"]]
