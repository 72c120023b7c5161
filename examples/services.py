"""One worker owns a resource; the three others call it through a service.

Run: python examples/services.py

Worker 0 owns a counter (a file, a device, a connection pool: anything one
process must own). It exposes it as the service "counter"; workers 1-3 call
``counter.add(n)`` as if it were local, and print what they got back.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clustersync import Hub, current_worker, setup_primary_cluster  # noqa: E402
from clustersync.services import Services, call_context  # noqa: E402
from clustersync.sync import cluster  # noqa: E402

WORKERS = 4


class Counter:
    """The resource: only worker 0 touches it."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> dict:
        self.total += n
        ctx = call_context()
        return {"total": self.total, "owner": current_worker().index, "caller": ctx.caller if ctx else None}

    def get(self) -> int:
        return self.total


def worker(everyone_ready: Any, done: Any) -> None:
    me = current_worker()
    assert me is not None
    with Hub(sync=cluster(channel="example")) as hub, Services(hub, methods=["add"]) as services:
        if me.index == 0:
            services.expose("counter", Counter())
        everyone_ready.wait(10)
        if me.index != 0:
            counter = services.remote("counter")
            for n in (1, 2, 3):
                answer = counter.add(n)
            sys.stdout.write(f"worker {me.index}: added 1+2+3, the owner (worker {answer['owner']}) answered\n")
            sys.stdout.flush()
        done.wait(10)  # worker 0 serves until the others are through
        if me.index == 1:
            sys.stdout.write(f"total: {services.call('counter', 'get')}\n")
            sys.stdout.flush()
        done.wait(10)


if __name__ == "__main__":
    primary = setup_primary_cluster(workers=WORKERS)
    ctx = multiprocessing.get_context(primary.start_method)
    ready, done = ctx.Barrier(WORKERS), ctx.Barrier(WORKERS)
    for _ in range(WORKERS):
        primary.fork(worker, ready, done)
    primary.join(timeout=60)
