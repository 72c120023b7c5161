"""Faults at the relay: garbage on a pipe, hung workers, stop during traffic."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import re
import signal
import time
from typing import Any, Dict, List

import pytest

from clustersync import Address
from clustersync.relay.primary import Primary

from . import workers
from .conftest import wait_for
from .relay_helpers import check_exchange, run_workers


def _drain_queue(q: Any, out: List[Any]) -> None:
    try:
        while True:
            out.append(q.get_nowait())
    except queue.Empty:
        pass


GARBAGE_CASES = [(mode, "fork") for mode in ("random", "huge", "origin", "badbody", "badlength", "truncated")] + [
    (mode, method) for mode in ("badbody", "badlength") for method in ("spawn", "forkserver")
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,method", GARBAGE_CASES)
def test_garbage_on_a_pipe_drops_that_worker_only(mode: str, method: str, caplog: pytest.LogCaptureFixture) -> None:
    ctx = multiprocessing.get_context(method)
    results = ctx.Queue()
    bad_q = ctx.Queue()
    barrier = ctx.Barrier(2)
    primary = Primary(start_method=method, workers=3)
    got: List[Any] = []
    try:
        with caplog.at_level(logging.ERROR, logger="clustersync"):
            primary.fork(workers.pair, results, barrier, 3000)
            primary.fork(workers.pair, results, barrier, 3000)
            bad = primary.fork(workers.garbage, bad_q, mode)

            def done() -> bool:
                _drain_queue(results, got)
                return len(got) == 2 and bad.index not in {w.index for w in primary.workers}

            wait_for(done, timeout=40)
            assert primary.join(20)
    finally:
        primary.close(timeout=5)
    out: Dict[Any, Any] = {item[0]: item for item in got}
    out["stats"] = primary.stats()
    check_exchange(out, 2, 3000, [0, 1], "json")  # the others saw nothing wrong
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "worker 2" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert re.search("middle of a frame" if mode == "truncated" else "sent a malformed (DATA )?frame", errors[0].getMessage())
    if mode != "truncated":
        # killed by the primary, or by itself on seeing its pipe closed: either way, gone
        assert bad.exitcode in (-signal.SIGKILL, -signal.SIGTERM)
        assert out["stats"]["malformed"] == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["gil", "stop"])
def test_a_hung_worker_is_killed_within_the_timeout(how: str) -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()  # put() writes at once: no feeder thread that a held GIL would block
    primary = Primary(start_method="fork", timeout=1.0)
    try:
        w = primary.fork(workers.hang, results, how)
        wait_for(lambda: not results.empty(), timeout=10)
        assert results.get()[0] == "hanging"
        started = time.monotonic()
        if how == "stop":
            os.kill(w.pid, signal.SIGSTOP)
        assert primary.join(timeout=5)
        elapsed = time.monotonic() - started
        assert w.exitcode == -signal.SIGKILL
        assert elapsed < 1.0 + 1.0 + 0.5, elapsed  # timeout, plus one second, plus slack for a loaded machine
    finally:
        primary.close(timeout=2)


@pytest.mark.timeout(30)
def test_without_a_timeout_nothing_is_killed() -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()
    primary = Primary(start_method="fork")
    w = None
    try:
        w = primary.fork(workers.hang, results, "stop")
        wait_for(lambda: not results.empty(), timeout=10)
        os.kill(w.pid, signal.SIGSTOP)
        assert primary.join(timeout=2.5) is False  # observation window
        assert w.is_alive()
    finally:
        if w is not None:
            os.kill(w.pid, signal.SIGCONT)
        primary.close(timeout=2)


@pytest.mark.timeout(60)
def test_graceful_stop_delivers_what_was_published_before_it() -> None:
    ctx = multiprocessing.get_context("fork")
    results, ready = ctx.Queue(), ctx.Queue()
    published = ctx.Value("q", 0, lock=False)
    go = ctx.Event()
    primary = Primary(start_method="fork", workers=3)
    got: List[Any] = []
    try:
        for _ in range(3):
            primary.fork(workers.stream, results, published, ready, go)
        seen: List[Any] = []
        wait_for(lambda: _drain_queue(ready, seen) or len(seen) == 3, timeout=20)
        go.set()
        wait_for(lambda: published.value >= 20_000, timeout=30)
        before_stop = published.value
        assert primary.stop_workers(timeout=20), "a worker had to be killed"
        _drain_queue(results, got)
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the queue's feeder threads of exited workers have flushed by now
            _drain_queue(results, got)
    finally:
        primary.close(timeout=5)
    out = {item[0]: item[1] for item in got}
    assert set(out) == {0, 1, 2}
    assert primary.stats()["dropped"] == 0
    total = out[0]
    for index in (1, 2):
        count, in_order, detail = out[index]
        assert in_order, f"a gap or reordering: {detail}"
        assert count >= before_stop, (count, before_stop)
        assert count <= total


@pytest.mark.timeout(60)
def test_a_worker_cannot_speak_for_another_workers_hub() -> None:
    """Records that name another worker's hub still reach it, and say truly which worker sent them."""
    out = run_workers(workers.impersonate, 2)
    _, victim, got = out[1]
    sender = out[0][1]
    assert (Address(0, victim.hub), "forged") in got  # not taken for the victim's own echo
    assert all(origin.worker == 0 for origin, _ in got)
    assert (sender, "end") in got
