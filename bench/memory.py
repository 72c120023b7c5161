"""The primary's memory over a long full-speed run.

    python -m bench.memory --seconds 60 --workers 8

Every worker publishes 100-byte messages to all the others as fast as it can
(yielding 1 ms every 1,000 messages); the primary's resident memory is
sampled every 5 s. Prints the samples and the growth after the first sample.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, List, Optional

from clustersync import Hub, current_worker
from clustersync.relay.primary import Primary
from clustersync.sync import cluster

from .soak import _rss_kib


def flood(stop: Any, received: Any) -> None:
    """Publish to everyone until ``stop[0]`` is set; count what arrives."""
    me = current_worker().index

    def on_message(msg: Any) -> None:
        received[me] += 1

    hub = Hub(sync=cluster(channel="memory"))
    hub.subscribe("m", on_message)
    hub.wait_ready(10)
    data = b"x" * 100
    while not stop[0]:
        for _ in range(1000):
            hub.publish("m", data)
        time.sleep(0.001)
    hub.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Array("b", 1, lock=False)
    received = ctx.Array("q", args.workers, lock=False)
    primary = Primary(start_method="fork", workers=args.workers)
    samples: List[int] = []
    try:
        for _ in range(args.workers):
            primary.fork(flood, stop, received)
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(5.0)  # sampling period: the relay runs on its own thread
            samples.append(_rss_kib())
            stats = primary.stats()
            print(
                f"{time.monotonic() - started:5.0f} s  rss {samples[-1] / 1024:7.1f} MiB  "
                f"buffered {stats['buffered'] / 2**20:6.1f} MiB  dropped {stats['dropped']}  "
                f"delivered {sum(received)}",
                flush=True,
            )
    finally:
        stop[0] = 1
        primary.close(timeout=10)
    growth = (max(samples) - samples[0]) / 1024
    print(f"growth after the first sample: {growth:.1f} MiB (max {max(samples) / 1024:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
