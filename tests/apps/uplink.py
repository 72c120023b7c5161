"""Workers for tests/test_uplink.py: an agent the test drives over a pipe, and an app for ``clustersync run``.

Module level, so the forkserver (the start method of a primary with an
uplink) can import them in a worker.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from clustersync import Hub, Message, current_worker
from clustersync.sync import cluster

TOPICS = ("t", "ask", "answer", "fin")


def record_of(hub_index: int, msg: Message) -> Tuple[Any, ...]:
    """What a hub of the agent keeps of a message: (hub, topic, origin worker, origin hub, data)."""
    return (hub_index, msg.topic, msg.origin.worker, msg.origin.hub, msg.data)


def agent(conn: Any, channel: str, nhubs: int) -> None:
    """``nhubs`` hubs on ``channel`` in this worker, driven by the test through ``conn`` (a Pipe end).

    Every hub records what it receives on the topics of :data:`TOPICS`; on
    "ask" it answers the asker alone (``to=msg.origin``) on "answer", then
    broadcasts "fin" (its own questions aside; per-publisher FIFO: whoever has the "fin" would have had
    a misdelivered answer before it). Commands (each answered on ``conn``):

    - ``("publish", hub, topic, datas, to)``: publish each of ``datas``
    - ``("got", hub)``: the records so far
    - ``("stats", hub)``: ``hub.stats()``
    - ``("quit",)``: close the hubs and return
    """
    lock = threading.Lock()
    got: List[List[Tuple[Any, ...]]] = [[] for _ in range(nhubs)]
    hubs: List[Hub] = []

    def make(i: int) -> Hub:
        hub = Hub(sync=cluster(channel=channel))

        def keep(msg: Message) -> None:
            with lock:
                got[i].append(record_of(i, msg))

        def answer(msg: Message) -> None:
            if msg.origin == hub.address:
                return  # its own question, delivered locally
            hub.publish("answer", msg.data, to=msg.origin)
            hub.publish("fin", msg.data)

        for topic in TOPICS:
            hub.subscribe(topic, keep)
        hub.subscribe("ask", answer)
        return hub

    for i in range(nhubs):
        hubs.append(make(i))
    ready = all(h.wait_ready(15) for h in hubs)
    me = current_worker()
    assert me is not None
    conn.send(("ready", me.index, [h.address for h in hubs], ready))
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            kind = cmd[0]
            if kind == "publish":
                _, i, topic, datas, to = cmd
                for data in datas:
                    hubs[i].publish(topic, data, to=to)
                conn.send(("ok", len(datas)))
            elif kind == "got":
                with lock:
                    conn.send(list(got[cmd[1]]))
            elif kind == "stats":
                conn.send(hubs[cmd[1]].stats())
            elif kind == "quit":
                conn.send(("bye",))
                return
            else:
                conn.send(("unknown", kind))
    finally:
        for h in hubs:
            h.close()


# --------------------------------------------------------------- an app for `clustersync run`


def _write(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def all_to_all() -> None:
    """Every worker of every host publishes ``$TEST_COUNT`` numbered messages on channel "app".

    Rendezvous in ``$TEST_STATE_DIR``: each worker writes ``ready-<host>-<index>``
    once its hub is ready, publishes when the test writes ``go``, then "end";
    once it has "end" from each of ``$TEST_PEERS`` other publishers, it writes
    everything it received to ``result-<host>-<index>.json`` and returns when
    the test writes ``done``.
    """
    me = current_worker()
    assert me is not None
    state = Path(os.environ["TEST_STATE_DIR"])
    host = os.environ["TEST_HOST"]
    count = int(os.environ["TEST_COUNT"])
    peers = int(os.environ["TEST_PEERS"])
    name = f"{host}-{me.index}"
    lock = threading.Lock()
    got: List[List[Any]] = []
    ends: Dict[Tuple[int, str], int] = {}
    hub = Hub(sync=cluster(channel="app"))

    def keep(msg: Message) -> None:
        with lock:
            got.append([msg.topic, msg.origin.worker, msg.origin.hub, msg.data])
            if msg.topic == "end":
                ends[msg.origin] = ends.get(msg.origin, 0) + 1

    hub.subscribe("t", keep)
    hub.subscribe("end", keep)
    ready = hub.wait_ready(15)
    _write(state / f"ready-{name}", {"address": list(hub.address), "ready": ready})
    if not _wait(lambda: (state / "go").exists(), 30):
        raise SystemExit(f"{name}: no go")
    for i in range(count):
        hub.publish("t", {"host": host, "w": me.index, "hub": hub.id, "i": i})
    hub.publish("end", {"host": host, "w": me.index, "hub": hub.id})
    _wait(lambda: len([o for o in ends if o != hub.address]) >= peers, 20)  # short of the test's deadline: a loss shows as a result
    with lock:
        snapshot = list(got)
    _write(state / f"result-{name}.json", {"address": list(hub.address), "got": snapshot, "stats": hub.stats()})
    if not _wait(lambda: (state / "done").exists(), 30):
        raise SystemExit(f"{name}: no done")
    with lock:
        late = got[len(snapshot):]
    if late:  # anything after the report: a duplicate, or a message from nowhere
        _write(state / f"late-{name}.json", late)
    hub.close()
