"""Hubs without processes: local publish, and broadcast_channel between two threads.

    python -m bench.local

Prints messages per second (median of 5 runs) for a hub with no backplane
(publish to one callback subscriber, one thread) and for two hubs on a
``broadcast_channel`` (one thread publishes, the other hub's delivery thread
receives every message).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import List

from clustersync import Hub
from clustersync.sync import broadcast_channel

N = 300_000


def local_publish(n: int = N) -> float:
    """Messages per second: ``publish`` to one callback subscriber, no backplane."""
    hub = Hub()
    count = [0]

    def on_message(msg: object) -> None:
        count[0] += 1

    hub.subscribe("t", on_message)
    data = b"x" * 100
    started = time.perf_counter()
    for _ in range(n):
        hub.publish("t", data)
    elapsed = time.perf_counter() - started
    assert count[0] == n
    hub.close()
    return n / elapsed


def broadcast_two_threads(n: int = N) -> float:
    """Messages per second from one hub to another over ``broadcast_channel`` (delivered on its thread)."""
    channel = f"bench-{time.monotonic_ns()}"
    a = Hub(sync=broadcast_channel(channel=channel, queue_size=n))
    b = Hub(sync=broadcast_channel(channel=channel, queue_size=n))
    done = threading.Event()
    count = [0]

    def on_message(msg: object) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    b.subscribe("t", on_message)
    data = b"x" * 100
    started = time.perf_counter()
    for _ in range(n):
        a.publish("t", data)
    assert done.wait(60), f"only {count[0]} of {n} arrived"
    elapsed = time.perf_counter() - started
    a.close()
    b.close()
    return n / elapsed


def main() -> None:
    for name, fn in (("local publish, 1 callback", local_publish), ("broadcast_channel, 2 threads", broadcast_two_threads)):
        rates: List[float] = [fn() for _ in range(5)]
        print(f"{name:30s} {statistics.median(rates) / 1000:8.1f}k msgs/s (median of 5)")


if __name__ == "__main__":
    main()
