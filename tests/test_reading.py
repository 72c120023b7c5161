"""Who reads a worker's pipe: a thread waiting in get(), an event loop, or the reader thread.

Each test runs real workers on a real primary; the callbacks record the
thread that delivered each message.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clustersync import Hub
from clustersync.sync import broadcast_channel

from . import workers
from .relay_helpers import run_workers


@pytest.mark.timeout(90)
def test_a_thread_waiting_in_get_reads_the_pipe_itself() -> None:
    out = run_workers(workers.get_readers, 2)[1][1]
    assert out["got"] == {"A0": "a1", "B0": "b1", "B1": "b2"}
    assert out["a_waiting_when_b_got"]  # A held the pipe and handed B its message; B did not wait for A
    assert out["b1_on"] == "A"  # read by the thread that held the pipe
    assert out["a1_on"] == "A"
    assert out["b2_on"] == "B"  # B took the pipe over when A left
    assert out["c1_on_a_getter"] is False  # nobody in get(): the reader thread read it
    # A callback running on A refuses a blocking service call (it would wait for itself).
    assert len(out["refused"]) == 1 and "call_async" in out["refused"][0]


@pytest.mark.timeout(90)
def test_an_event_loop_reads_the_pipe_and_a_blocked_loop_loses_nothing() -> None:
    out = run_workers(workers.loop_reader, 2)[1][1]
    assert out["attached"] is True and out["handed_over"] is True
    assert out["m1_async"] == "m1" and out["m1_on_loop"]  # callbacks run on the loop
    assert out["m2_arrived"] and not out["m2_on_loop"]  # the loop was blocked: the reader thread read it
    assert out["ready_on_loop"] is True  # a blocking wait on the loop still ends
    assert out["m2_async"] == "m2"
    assert out["second_loop"] == "this worker's pipe is already read on another event loop"
    assert out["m3_arrived"] and out["loop_let_go"]  # the loop closed: the reader thread reads again


def test_read_on_loop_without_a_pipe_or_a_loop() -> None:
    hub = Hub(sync=broadcast_channel(channel="no-pipe"))
    local = Hub()
    try:
        with pytest.raises(RuntimeError, match="no running event loop"):
            hub.read_on_loop()

        async def attach() -> Any:
            return hub.read_on_loop(), local.read_on_loop()

        assert asyncio.run(attach()) == (False, False)  # delivery stays on the driver's thread
    finally:
        hub.close()
        local.close()


@pytest.mark.timeout(60)
def test_a_thread_reading_in_get_wakes_for_a_local_publish_and_for_close() -> None:
    out = run_workers(workers.get_interrupted, 1)[0][1]
    assert out == {
        "timeout_error": "no message on 'x' within 0.05 s",
        "local": "published here", "a_ended": True, "close": "closed", "b_ended": True,
    }


@pytest.mark.timeout(120)
def test_many_threads_in_get_with_short_timeouts_lose_nothing() -> None:
    """Eight threads wait in get() on their own topics with timeouts from 0.5 ms to none, so the reading
    role changes hands all the time, while another worker publishes 5,000 messages on each topic."""
    out = run_workers(workers.get_stress, 2, 8, 5000, timeout=100)[1][1]
    assert out == {"in_order": True, "lengths": [5000], "called": [5000], "errors": [], "dropped": 0}
