"""Four workers; each publishes a few messages and prints what it received.

Run: python examples/fanout.py
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clustersync import Hub, current_worker  # noqa: E402
from clustersync.sync import cluster, setup_primary_cluster  # noqa: E402

WORKERS = 4
PER_WORKER = 3


def worker(everyone_subscribed: Any) -> None:
    me = current_worker()
    assert me is not None
    received = []
    with Hub(sync=cluster(channel="fanout")) as hub:
        hub.subscribe("greetings", lambda msg: received.append(msg.data))
        hub.wait_ready(timeout=10)  # the primary now relays the channel to this worker
        everyone_subscribed.wait(timeout=10)  # no replay: publish once every worker listens
        for i in range(PER_WORKER):
            hub.publish("greetings", {"from": me.index, "n": i})
        expected = me.count * PER_WORKER  # our own arrive locally, the others' through the primary
        deadline = time.monotonic() + 10
        while len(received) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
    got = sorted((m["from"], m["n"]) for m in received)
    line = f"worker {me.index} (pid {me.pid}) received {len(received)} of {expected}: {got}\n"
    sys.stdout.write(line)  # one write per line: the workers share stdout
    sys.stdout.flush()


if __name__ == "__main__":
    primary = setup_primary_cluster(workers=WORKERS)
    barrier = multiprocessing.get_context(primary.start_method).Barrier(WORKERS)
    for _ in range(WORKERS):
        primary.fork(worker, barrier)
    try:
        primary.join(timeout=60)
    finally:
        primary.close()
