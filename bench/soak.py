"""Soak scenarios for the relay's fault behaviour, and their figures.

    python -m bench.soak churn --minutes 5     # SIGKILL a random worker every 300 ms, replace it
    python -m bench.soak stuck --minutes 2     # SIGSTOP one worker while the others publish

Each prints its figures every few seconds and a summary at the end (JSON,
the last thing on stdout), and exits non-zero if a promise broke.
``tests/test_soak.py`` runs both briefly (``--seconds``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import statistics
import struct
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from clustersync import Hub, Message, current_worker
from clustersync.relay.primary import Primary, WorkerHandle
from clustersync.sync import cluster

WORKERS = 4


# -- in the workers ------------------------------------------------------------


def numbered_publisher(
    received: Any, gaps: Any, published: Any, first: Any, stop: Any, pace: int, pad: int
) -> None:
    """Publish numbered messages to every worker while checking what arrives, until ``stop[index]`` is set.

    Each message is ``(publisher index, sequence)`` plus ``pad`` bytes.
    ``received[index]`` counts what this worker got from the others,
    ``gaps[index]`` the messages that arrived out of sequence (a loss or a
    reordering), ``published[index]`` what it published, and
    ``first[index * WORKERS + j]`` the first sequence number it got from
    worker j. Shared memory without locks: workers here die by SIGKILL and
    must not hold a lock.
    """
    me = current_worker().index
    last: Dict[str, int] = {}  # by hub id: a replaced worker starts a new sequence
    unpack = _SEQ.unpack_from

    def on_message(msg: Message) -> None:
        sender, seq = unpack(msg.data)
        if sender == me:
            return  # our own, delivered locally
        prev = last.get(msg.origin)
        if prev is None:
            first[me * WORKERS + sender] = seq
        elif seq != prev + 1:
            gaps[me] += 1
        last[msg.origin] = seq
        received[me] += 1

    hub = Hub(sync=cluster(channel="soak"))
    hub.subscribe("seq", on_message)
    if not hub.wait_ready(10):
        raise SystemExit("not subscribed within 10 s")
    padding = b"x" * pad
    i = 0
    while not stop[me]:
        for _ in range(pace):
            hub.publish("seq", _SEQ.pack(me, i) + padding)
            i += 1
        published[me] = i
        time.sleep(0.005)
    hub.close()


_SEQ = struct.Struct(">HQ")


# -- in the primary -------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Cluster:
    """Four numbered publishers on a primary, with shared counters."""

    def __init__(self, pace: int, pad: int = 0, **options: Any) -> None:
        ctx = multiprocessing.get_context("fork")
        self.first = ctx.Array("q", [-1] * (WORKERS * WORKERS), lock=False)
        self.pad = pad
        self.received = ctx.Array("q", WORKERS, lock=False)
        self.gaps = ctx.Array("q", WORKERS, lock=False)
        self.published = ctx.Array("q", WORKERS, lock=False)
        self.stop = ctx.Array("b", WORKERS, lock=False)
        self.pace = pace
        self.primary = Primary(start_method="fork", workers=WORKERS, **options)
        self.replacing = True
        self.primary.on_worker_exit = self._replace

    def _replace(self, w: WorkerHandle) -> None:
        if self.replacing:
            self.start(w.index)

    def start(self, index: Optional[int] = None, pace: Optional[int] = None) -> WorkerHandle:
        """Start (or replace) a worker; ``pace`` messages per 5 ms (0: it only consumes)."""
        slot = index if index is not None else len(self.primary.workers)
        self.received[slot] = 0  # the worker counts from its first message on
        self.published[slot] = 0
        self.stop[slot] = 0
        return self.primary.fork(
            numbered_publisher,
            self.received,
            self.gaps,
            self.published,
            self.first,
            self.stop,
            self.pace if pace is None else pace,
            self.pad,
            index=slot,
        )

    def run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``until()`` holds, up to ``timeout`` seconds (the relay runs on its own thread)."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def pid(self, index: int) -> int:
        return self.primary._workers[index].pid

    def worker_stats(self, index: int) -> Dict[str, Any]:
        """The relay's counters for the worker at ``index`` (running, or the last one that exited)."""
        stats = self.primary.stats()
        for w in stats["workers"] + stats["exited"][::-1]:
            if w["index"] == index:
                return w
        raise KeyError(index)

    def close(self) -> None:
        self.replacing = False
        for i in range(WORKERS):
            self.stop[i] = 1
        try:
            self.primary.stop_workers(timeout=10)
        finally:
            self.primary.close(timeout=5)


def run_churn(seconds: float, interval: float = 0.3, pace: int = 100, seed: int = 7, report: float = 5.0) -> Dict[str, Any]:
    """SIGKILL a random worker every ``interval`` seconds for ``seconds``; return the figures.

    Checks after every kill that the others keep receiving (no stall) and
    that the replacement receives again; at the end, that nothing was lost
    or reordered between live workers, and that descriptors and memory in
    the primary came back to their starting level.
    """
    rng = random.Random(seed)
    c = Cluster(pace)
    figures: Dict[str, Any] = {"scenario": "churn", "seed": seed, "kills": 0, "stalls": 0, "not_back": 0}
    fds_before = rss_before = 0
    try:
        for _ in range(WORKERS):
            c.start()
        if not c.run(lambda: all(c.received[i] > 0 for i in range(WORKERS)), timeout=20):
            raise RuntimeError("the workers did not start receiving")
        fds_before, rss_before = _open_fds(), _rss_kib()
        started = last_report = time.monotonic()
        total_before = sum(c.received)
        while time.monotonic() - started < seconds:
            victim = rng.randrange(WORKERS)
            pid = c.pid(victim)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            figures["kills"] += 1
            since = list(c.received)
            if not c.run(lambda: all(c.received[i] > since[i] for i in range(WORKERS) if i != victim), 5):
                figures["stalls"] += 1
            back = c.run(
                lambda: victim in c.primary._workers and c.pid(victim) != pid and c.received[victim] > 0, 10
            )
            if not back:
                figures["not_back"] += 1
            c.run(lambda: time.monotonic() - killed_at >= interval, interval)
            if time.monotonic() - last_report >= report:
                last_report = time.monotonic()
                print(f"churn: {figures['kills']} kills, gaps {list(c.gaps)}, "
                      f"dropped {c.primary.stats()['dropped']}, fds {_open_fds()}, rss {_rss_kib()} KiB", flush=True)
        elapsed = time.monotonic() - started
        figures["deliveries_per_s"] = round((sum(c.received) - total_before) / elapsed)
        figures["gaps"] = list(c.gaps)
        figures["dropped"] = c.primary.stats()["dropped"]
    finally:
        c.close()
    figures["fds_before"], figures["fds_after"] = fds_before, _open_fds()
    figures["rss_kib_before"], figures["rss_kib_after"] = rss_before, _rss_kib()
    figures["ok"] = (
        figures["stalls"] == 0
        and figures["not_back"] == 0
        and figures["gaps"] == [0] * WORKERS
        and figures["dropped"] == 0
        and figures["fds_after"] <= figures["fds_before"]
        and figures["rss_kib_after"] - figures["rss_kib_before"] < 10 * 1024
    )
    return figures


def _rate(c: Cluster, indexes: List[int], window: float) -> float:
    before = sum(c.received[i] for i in indexes)
    started = time.monotonic()
    c.run(lambda: time.monotonic() - started >= window, window)
    return (sum(c.received[i] for i in indexes) - before) / (time.monotonic() - started)


def run_stuck(
    seconds: float, max_buffer: int = 4 * 1024 * 1024, pace: int = 40, pad: int = 1024, window: float = 0.5
) -> Dict[str, Any]:
    """SIGSTOP worker 3 (a consumer) while workers 0-2 publish to all; return the figures.

    Measures the other workers' delivery rate before and during the stop
    (medians of ``window``-second windows), the primary's memory against
    ``max_buffer``, and checks that after SIGCONT worker 3's receipts plus
    the drops counted for it equal exactly what was published to it.
    """
    c = Cluster(pace, pad, max_buffer=max_buffer)
    c.replacing = False
    others = [0, 1, 2]
    stuck = 3
    figures: Dict[str, Any] = {"scenario": "stuck", "max_buffer": max_buffer}
    stopped = False
    try:
        for i in range(WORKERS):
            c.start(pace=0 if i == stuck else None)  # the one to be stopped only consumes
        heard_all = lambda: all(c.first[stuck * WORKERS + i] >= 0 for i in others)  # noqa: E731
        if not c.run(lambda: all(c.received[i] > 0 for i in range(WORKERS)) and heard_all(), timeout=20):
            raise RuntimeError("the workers did not start receiving")
        rounds = max(3, int(seconds / 2 / window))
        baseline = [_rate(c, others, window) for _ in range(rounds)]
        rss_before = _rss_kib()
        figures["dropped_before_stop"] = c.worker_stats(stuck)["dropped"]
        os.kill(c.pid(stuck), signal.SIGSTOP)
        stopped = True
        during = [_rate(c, others, window) for _ in range(rounds)]
        rss_peak = _rss_kib()
        stats = {w["index"]: w for w in c.primary.stats()["workers"]}
        figures["buffered_for_stuck"] = stats[stuck]["buffered"]
        # Stop the healthy publishers and let them exit, then wake the stuck one and let it drain.
        for i in others:
            c.stop[i] = 1
        c.run(lambda: not any(w.index in others for w in c.primary.workers), timeout=20)
        os.kill(c.pid(stuck), signal.SIGCONT)
        stopped = False
        # What the others published after the stuck worker first heard from them.
        sent_to_stuck = sum(c.published[i] - c.first[stuck * WORKERS + i] for i in others)
        exact = c.run(
            lambda: c.received[stuck] + c.worker_stats(stuck)["dropped"] == sent_to_stuck, timeout=30
        )
        figures["dropped_for_stuck"] = c.worker_stats(stuck)["dropped"]
        figures["relayed_to_stuck"] = c.worker_stats(stuck)["messages_out"]
        figures["unroutable"] = c.primary.stats()["unroutable"]
        figures["buffered_after"] = c.worker_stats(stuck)["buffered"]
        figures["received_by_stuck"] = c.received[stuck]
        figures["published_to_stuck"] = sent_to_stuck
        figures["drops_exact"] = exact
        figures["rate_before"] = round(statistics.median(baseline))
        figures["rate_during"] = round(statistics.median(during))
        figures["rate_ratio"] = round(figures["rate_during"] / max(1.0, figures["rate_before"]), 3)
        figures["rss_growth_kib"] = rss_peak - rss_before
        figures["gaps_in_healthy"] = [c.gaps[i] for i in others]
    finally:
        if stopped:
            os.kill(c.pid(stuck), signal.SIGCONT)
        c.close()
    figures["ok"] = (
        figures["drops_exact"]
        and figures["dropped_for_stuck"] > 0
        and figures["buffered_for_stuck"] <= max_buffer
        and figures["rss_growth_kib"] * 1024 <= max_buffer + 16 * 1024 * 1024
        and figures["rate_ratio"] >= 0.8
        and figures["gaps_in_healthy"] == [0, 0, 0]
    )
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["churn", "stuck"])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, help="the length in seconds (instead of --minutes)")
    parser.add_argument("--interval", type=float, default=0.3, help="churn: seconds between kills")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if args.scenario == "churn":
        figures = run_churn(seconds, interval=args.interval, seed=args.seed)
    else:
        figures = run_stuck(seconds)
    print(json.dumps(figures, indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
