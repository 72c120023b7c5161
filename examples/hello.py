"""Every worker greets the others every second and logs what it hears.

Run: python -m clustersync run examples.hello:main -w 3     (Ctrl-C stops it)
"""

from __future__ import annotations

import logging
import time

from clustersync import Hub, current_worker
from clustersync.sync import cluster

log = logging.getLogger("hello")


def main() -> None:
    me = current_worker()
    assert me is not None, "run me with: python -m clustersync run examples.hello:main"
    with Hub(sync=cluster(channel="hello")) as hub:
        hub.subscribe("greet", lambda msg: log.info("heard: %s", msg.data))
        hub.wait_ready()
        n = 0
        while True:  # until SIGTERM or Ctrl-C, which end it with SystemExit
            n += 1
            hub.publish("greet", f"worker {me.index} of {me.count} says hello #{n}")
            time.sleep(1)
