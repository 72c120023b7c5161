"""Row ``zmq``: ZeroMQ through pyzmq, with an XPUB/XSUB proxy process.

Written the way pyzmq users write a fast path: every message is one frame (a
3-byte topic prefix, then the payload; SUB filters on the prefix), and a
receiver drains everything the socket holds with non-blocking ``recv`` after
each ``poll`` instead of one blocking multi-frame call per message.

The proxy process binds an XSUB socket (publishers connect their PUB sockets to it)
and an XPUB socket (subscribers connect their SUB sockets) over ``ipc://`` and runs
``zmq.proxy``.  Every socket has SNDHWM = RCVHWM = 0 (no high-water mark), so nothing
is dropped once a subscription is in place.  PUB/SUB subscriptions travel
asynchronously, so before the start each receiver also subscribes to a probe topic of
its own (after its data topics) and publishers send probes until every receiver has
seen one from each of its publishers: then every data subscription has reached the
publishers and the proxy.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import shutil
import struct
import tempfile
import time
import traceback
from collections import deque

from .common import (
    Control,
    ControlClient,
    PayloadMaker,
    Spec,
    Tracker,
    base_result,
    check_deadline,
    finish,
    kill_processes,
    start_workers,
    ping_pong,
    receive_all,
)

NAME = "zmq"
TUNING = (
    "zmq: XPUB/XSUB proxy process over ipc://, single-frame messages (topic prefix + payload), "
    "non-blocking drain after each poll, SNDHWM=RCVHWM=0 on every socket, probe handshake before start"
)
PROBE = struct.Struct("<H")


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("zmq") is None:
        return False, "zmq: skipped -- pyzmq is not installed (pip install pyzmq)"
    return True, ""


def version() -> str:
    try:
        from importlib.metadata import version as v

        import zmq

        return "pyzmq %s, libzmq %s" % (v("pyzmq"), zmq.zmq_version())
    except Exception:
        return ""


def _topic(pub: int) -> bytes:
    return b"t" + PROBE.pack(pub)  # fixed width: no prefix collisions


def _probe_topic(receiver: int) -> bytes:
    return b"p" + PROBE.pack(receiver)


def _nohwm(sock) -> None:
    import zmq

    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


def _proxy(front: str, back: str) -> None:
    import zmq

    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    _nohwm(xsub)
    xsub.bind(front)
    xpub = ctx.socket(zmq.XPUB)
    _nohwm(xpub)
    xpub.bind(back)
    zmq.proxy(xsub, xpub)


def _worker(front: str, back: str, wid: int, spec_d: dict, ctl_args: tuple) -> None:
    import zmq

    spec = Spec.from_dict(spec_d)
    ctl = ControlClient(*ctl_args, wid)
    res = base_result(wid)
    sources = spec.sources(wid)
    tracker = Tracker(wid, sources, spec.messages, spec.payload, spec.workers) if sources else None
    deadline = spec.deadline
    ctx = zmq.Context()
    pub = sub = None
    try:
        is_pub = wid in spec.publishers
        if is_pub:
            pub = ctx.socket(zmq.PUB)
            _nohwm(pub)
            pub.connect(front)
        if sources:
            sub = ctx.socket(zmq.SUB)
            _nohwm(sub)
            sub.setsockopt(zmq.RCVTIMEO, 500)
            sub.connect(back)
            for p in sources:
                sub.setsockopt(zmq.SUBSCRIBE, _topic(p))
            sub.setsockopt(zmq.SUBSCRIBE, _probe_topic(wid))
        # --- probe handshake, then the common start ------------------------------
        my_probes = [_probe_topic(r) for r in spec.subscribers(wid)] if is_pub else []
        need = set(sources)
        said_ready = False
        while True:
            for t in my_probes:
                pub.send(t + PROBE.pack(wid))
            if sub is not None and need:
                while sub.poll(0):
                    frame = sub.recv()
                    if frame[:1] == b"p":
                        need.discard(PROBE.unpack_from(frame, 3)[0])
            if not need and not said_ready:
                ctl.ready()
                said_ready = True
            if said_ready:
                if ctl.poll_go(0.002):
                    break
            else:
                ctl.poll_go(0)  # raises if the run was called off meanwhile
                time.sleep(0.002)
            if time.monotonic() > deadline:
                raise TimeoutError("probe handshake did not complete")

        make = PayloadMaker(wid, spec.payload)
        topic = _topic(wid)
        pending: deque = deque()

        def next_data():
            while not pending:
                if not sub.poll(500):
                    if time.monotonic() > deadline:
                        raise TimeoutError("deadline reached")
                    continue
                recv = sub.recv
                try:
                    while True:  # everything the socket holds, without blocking
                        frame = recv(zmq.NOBLOCK)
                        if frame[:1] == b"t":
                            pending.append(frame[3:])
                except zmq.Again:
                    pass
            return pending.popleft()

        if spec.scenario == "latency":
            ping_pong(wid, spec, lambda payload: pub.send(topic + payload), next_data, tracker, make, res, deadline)
        else:
            if is_pub:
                send = pub.send
                res["t_first_pub"] = time.monotonic()
                for k in range(spec.messages):
                    if not k & 255:
                        check_deadline(deadline)
                        res["published"] = k
                    send(topic + make(k))
                res["published"] = spec.messages
                res["t_pub_done"] = time.monotonic()
            if tracker is not None:
                receive_all(next_data, tracker.feed, deadline)
    except BaseException:
        res["error"] = traceback.format_exc()
    ctl.finish(res, tracker, wid in spec.active, deadline)
    # a publisher's queued messages may still be on their way to slower receivers:
    # let them go until the deadline rather than dropping them
    linger = max(0, int((deadline - time.monotonic()) * 1000))
    for s in (pub, sub):
        if s is not None:
            s.close(linger=linger)
    ctx.term()


def conduct(spec_d: dict) -> dict:
    spec = Spec.from_dict(spec_d)
    ctx = mp.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="csbench-zmq-")
    front = "ipc://" + os.path.join(tmp, "xsub")
    back = "ipc://" + os.path.join(tmp, "xpub")
    ctl = Control(spec.workers, spec.active)
    procs = []
    try:
        proxy = ctx.Process(target=_proxy, args=(front, back), daemon=True)
        proxy.start()
        procs.append(proxy)
        ctl.aux_pids["proxy"] = proxy.pid
        start_workers(ctx, _worker, lambda wid: (front, back, wid, spec.to_dict(), ctl.client_args), spec, procs)
        ctl.start()
        ctl.watch({wid: p.pid for wid, p in enumerate(procs[1:])})
        results = ctl.wait_results(spec.deadline + 5.0)
        return finish(spec, results, ctl)
    finally:
        kill_processes(procs[1:])
        kill_processes(procs[:1], grace=0.0)
        ctl.close()
        shutil.rmtree(tmp, ignore_errors=True)
