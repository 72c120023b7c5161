"""Scenario: workers are SIGKILLed under load and replaced; the relay never stalls and loses nothing between live workers."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from typing import Any, List

import pytest

from clustersync.primary import Primary, WorkerHandle

from . import workers

WORKERS = 4


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_churn(kills: int, interval: float, pace: int, seed: int) -> None:
    ctx = multiprocessing.get_context("fork")
    received = ctx.Array("q", WORKERS, lock=False)
    gaps = ctx.Array("q", WORKERS, lock=False)
    stop = ctx.Event()
    rng = random.Random(seed)
    primary = Primary(start_method="fork", workers=WORKERS)
    fds_before = open_fds()
    rss_before = rss_kib()
    stopping: List[bool] = []

    def replace(w: WorkerHandle) -> None:
        if not stopping:
            received[w.index] = -1  # -1 until the new worker is subscribed
            primary.fork(workers.churn, received, gaps, stop, pace, index=w.index)

    primary.on_worker_exit = replace

    def all_receiving(since: List[int], skip: int = -1) -> bool:
        return all(received[i] > since[i] for i in range(WORKERS) if i != skip)

    try:
        for i in range(WORKERS):
            received[i] = -1
            primary.fork(workers.churn, received, gaps, stop, pace)
        assert primary.run(lambda: all(received[i] > 0 for i in range(WORKERS)), timeout=20)
        for kill in range(kills):
            victim = rng.randrange(WORKERS)
            pid = primary._workers[victim].pid
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # The relay never stalls: every other worker keeps receiving.
            since = list(received)
            assert primary.run(lambda: all_receiving(since, victim), timeout=5), f"stalled after kill {kill} (seed {seed})"
            # The replacement rejoins and receives.
            assert primary.run(
                lambda: victim in primary._workers and primary._workers[victim].pid != pid and received[victim] > 0,
                timeout=10,
            ), f"worker {victim} did not come back (seed {seed})"
            primary.run(lambda: time.monotonic() - killed_at >= interval, timeout=interval)
        assert list(gaps) == [0] * WORKERS, f"lost or reordered between live workers: {list(gaps)} (seed {seed})"
        assert primary.stats()["dropped"] == 0
    finally:
        stopping.append(True)
        stop.set()
        primary.stop_workers(timeout=10)
        fds_after = open_fds()
        rss_after = rss_kib()
        primary.close(timeout=5)
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert rss_after - rss_before < 10 * 1024, (rss_before, rss_after)


@pytest.mark.timeout(120)
def test_workers_killed_under_load_are_replaced_and_nothing_is_lost_between_live_ones() -> None:
    run_churn(kills=20, interval=0.3, pace=100, seed=int(os.environ.get("CLUSTERSYNC_CHURN_SEED", "7")))
