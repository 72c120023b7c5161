"""A worker for tests/test_interest.py: one hub on a channel, its subscriptions driven by the test over a pipe."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Tuple

from clustersync import Hub, Message, Subscription, current_worker
from clustersync.sync import cluster


def agent(conn: Any, channel: str) -> None:
    """Commands (each answered on ``conn``):

    - ``("sub", topic)``: subscribe to a topic or pattern, then wait until the relay has it (``wait_ready``)
    - ``("unsub", topic)``: drop that subscription
    - ``("publish", [topic, ...])``: publish each topic (its name as the data), back to back
    - ``("got",)``: ``[(topic, data), ...]`` received so far from other workers
    - ``("quit",)``
    """
    lock = threading.Lock()
    got: List[Tuple[str, Any]] = []
    subs: Dict[str, Subscription] = {}
    hub = Hub(sync=cluster(channel=channel))

    def keep(msg: Message) -> None:
        if msg.origin != hub.address:
            with lock:
                got.append((msg.topic, msg.data))

    ready = hub.wait_ready(15)
    me = current_worker()
    assert me is not None
    conn.send(("ready", me.index, ready))
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd[0] == "sub":
                subs[cmd[1]] = hub.subscribe(cmd[1], keep)
                conn.send(hub.wait_ready(15))
            elif cmd[0] == "unsub":
                subs.pop(cmd[1]).unsubscribe()
                conn.send(hub.wait_ready(15))
            elif cmd[0] == "publish":
                for topic in cmd[1]:
                    hub.publish(topic, topic)
                conn.send(len(cmd[1]))
            elif cmd[0] == "got":
                with lock:
                    conn.send(list(got))
            elif cmd[0] == "quit":
                conn.send("bye")
                return
    finally:
        hub.close()
