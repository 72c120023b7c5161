"""Four workers keep a dict cache in step through synced service events.

Run: python examples/cache.py

Worker 0 writes through a service (create, patch, remove); every worker's
cache follows the events, and each prints what it holds at the end.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clustersync import Hub, current_worker, setup_primary_cluster  # noqa: E402
from clustersync.codec import tagged_dumps, tagged_loads  # noqa: E402
from clustersync.events import SyncedEmitter  # noqa: E402
from clustersync.sync import cluster  # noqa: E402

WORKERS = 4


class Todos:
    """The store: where writes happen (a database, in a real app)."""

    def __init__(self) -> None:
        self.rows: Dict[int, Dict[str, Any]] = {}

    def create(self, data: Dict[str, Any]) -> Dict[str, Any]:
        row = dict(data, id=len(self.rows) + 1)
        self.rows[row["id"]] = row
        return row

    def patch(self, row_id: int, data: Dict[str, Any]) -> Dict[str, Any]:
        self.rows[row_id].update(data)
        return self.rows[row_id]

    def remove(self, row_id: int) -> Dict[str, Any]:
        return self.rows.pop(row_id)


def worker(everyone_ready: Any) -> None:
    me = current_worker()
    assert me is not None
    cache: Dict[int, Dict[str, Any]] = {}
    done = threading.Event()
    with Hub(sync=cluster(channel="cache")) as hub:
        events = SyncedEmitter(hub, key="cache", serializer=tagged_dumps, deserializer=tagged_loads)
        events.on("todos", "created", lambda row, ctx: cache.__setitem__(row["id"], row))
        events.on("todos", "patched", lambda row, ctx: cache.__setitem__(row["id"], row))
        events.on("todos", "removed", lambda row, ctx: cache.pop(row["id"], None))
        events.on("todos", "done", lambda data, ctx: done.set())
        events.wait_ready(10)
        everyone_ready.wait(10)  # no replay: write once every worker listens
        if me.index == 0:
            todos = events.service("todos", Todos())
            first = todos.create({"text": "buy milk"})
            todos.create({"text": "walk the dog"})
            todos.patch(first["id"], {"done": True})
            todos.remove(2)
            events.emit("todos", "done")
        done.wait(10)
    sys.stdout.write(f"worker {me.index} cache: {cache}\n")  # one write per line: the workers share stdout
    sys.stdout.flush()


if __name__ == "__main__":
    primary = setup_primary_cluster(workers=WORKERS)
    ready = multiprocessing.get_context(primary.start_method).Barrier(WORKERS)
    for _ in range(WORKERS):
        primary.fork(worker, ready)
    primary.join(timeout=60)
