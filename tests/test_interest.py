"""Interest routing: the relay sends a worker only the messages whose topic one of its hubs subscribes to."""

from __future__ import annotations

import multiprocessing
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from clustersync.relay.primary import Primary

from .apps.interest import agent
from .conftest import wait_for

Workers = Tuple[Primary, List[Any]]


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Three workers on channel "app", each driven over a pipe."""
    primary = Primary(start_method="fork", workers=3)
    conns: List[Any] = []
    try:
        for _ in range(3):
            here, there = multiprocessing.Pipe()
            primary.fork(agent, there, "app")
            there.close()
            assert here.poll(20)
            _, index, ready = here.recv()
            assert ready
            conns.append(here)
        yield primary, conns
    finally:
        for conn in conns:
            try:
                conn.send(("quit",))
            except OSError:
                pass
        primary.close(timeout=5)


def ask(conn: Any, *cmd: Any) -> Any:
    conn.send(cmd)
    assert conn.poll(20), f"no answer to {cmd}"
    return conn.recv()


def peers(primary: Primary) -> Dict[int, Dict[str, Any]]:
    return {w["index"]: w for w in primary.stats()["workers"]}


def test_a_worker_gets_only_the_topics_its_hubs_subscribe_to(workers: Workers) -> None:
    primary, (w0, w1, w2) = workers
    assert ask(w0, "sub", "orders.new")
    assert ask(w1, "sub", "orders.*")
    before = peers(primary)
    # Back to back: the publisher's link puts several topics in one frame, which the relay splits per worker.
    topics = ["orders.new", "orders.paid", "invoices.new", "orders.new.eu", "orders.new", "end"]
    assert ask(w2, "publish", topics) == len(topics)
    assert ask(w0, "sub", "end") and ask(w1, "sub", "end")
    ask(w2, "publish", ["end"])
    wait_for(lambda: ("end", "end") in ask(w0, "got") and ("end", "end") in ask(w1, "got"))
    assert ask(w0, "got") == [("orders.new", "orders.new"), ("orders.new", "orders.new"), ("end", "end")]
    assert ask(w1, "got") == [("orders.new", "orders.new"), ("orders.paid", "orders.paid"),
                              ("orders.new", "orders.new"), ("end", "end")]
    after = peers(primary)
    # Worker 2 subscribes to nothing: it was sent nothing, its own messages included.
    assert after[2]["messages_out"] == before[2]["messages_out"] == 0
    assert after[0]["messages_out"] - before[0]["messages_out"] == 3
    assert after[1]["messages_out"] - before[1]["messages_out"] == 4
    assert after[0]["filtered"] - before[0]["filtered"] == 4  # paid, invoices, the .eu one, the first end
    assert after[0]["interests"] == 2 and after[1]["interests"] == 2 and after[2]["interests"] == 0


def test_unsubscribe_stops_the_frames_and_churn_leaves_nothing_behind(workers: Workers) -> None:
    primary, (w0, w1, _w2) = workers
    for i in range(200):  # subscribe and unsubscribe, over and over: the tables come back to empty
        assert ask(w0, "sub", f"churn.{i}")
        assert ask(w0, "unsub", f"churn.{i}")
    assert peers(primary)[0]["interests"] == 0
    assert ask(w0, "sub", "news.>")
    ask(w1, "publish", ["news.a", "news.b.c"])
    wait_for(lambda: len(ask(w0, "got")) == 2)
    assert ask(w0, "unsub", "news.>")
    sent = peers(primary)[0]["messages_out"]
    ask(w1, "publish", ["news.a"] * 50)
    assert ask(w0, "sub", "news.done")
    ask(w1, "publish", ["news.done"])
    wait_for(lambda: ("news.done", "news.done") in ask(w0, "got"))
    assert peers(primary)[0]["messages_out"] == sent + 1  # only the last one
    assert ask(w0, "got") == [("news.a", "news.a"), ("news.b.c", "news.b.c"), ("news.done", "news.done")]


def test_a_replaced_worker_starts_with_no_interest(workers: Workers) -> None:
    primary, (w0, w1, _w2) = workers
    assert ask(w0, "sub", "t")
    assert peers(primary)[0]["interests"] == 1
    victim = primary.workers[0]
    primary.kill(victim)
    wait_for(lambda: 0 not in peers(primary))
    here, there = multiprocessing.Pipe()
    primary.fork(agent, there, "app", index=0)
    there.close()
    assert here.poll(20) and here.recv()[2]
    try:
        assert peers(primary)[0]["interests"] == 0
        ask(w1, "publish", ["t"] * 10)
        assert ask(here, "sub", "t")
        ask(w1, "publish", ["t"])
        wait_for(lambda: ask(here, "got") == [("t", "t")])
        assert peers(primary)[0]["messages_out"] == 1
    finally:
        here.send(("quit",))
