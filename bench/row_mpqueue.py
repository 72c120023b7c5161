"""Row ``mpqueue``: the naive standard-library way, ``multiprocessing.Queue``.

Every worker has one inbound ``multiprocessing.Queue``; a publisher fans out itself:
it ``put``s each message into the inbound queue of every subscriber of its topic (no
relay process).  Receivers ``get`` one message at a time.  Queues are unbounded, so
nothing is dropped.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback

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

NAME = "mpqueue"
TUNING = "mpqueue: one unbounded inbound Queue per worker, publisher puts into each subscriber's queue"


def available() -> tuple[bool, str]:
    return True, ""


def _get(q, deadline):
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError("deadline reached") from None


def _worker(queues: list, wid: int, spec_d: dict, ctl_args: tuple) -> None:
    spec = Spec.from_dict(spec_d)
    ctl = ControlClient(*ctl_args, wid)
    res = base_result(wid)
    inbox = queues[wid]
    sources = spec.sources(wid)
    tracker = Tracker(wid, sources, spec.messages, spec.payload, spec.workers) if sources else None
    try:
        ctl.ready_and_wait(spec.deadline)
        make = PayloadMaker(wid, spec.payload)
        if spec.scenario == "latency":
            ping_pong(wid, spec, queues[1 - wid].put, lambda: _get(inbox, spec.deadline), tracker, make, res, spec.deadline)
        else:
            if wid in spec.publishers:
                dests = [queues[d] for d in spec.subscribers(wid)]
                res["t_first_pub"] = time.monotonic()
                for k in range(spec.messages):
                    if not k & 255:
                        check_deadline(spec.deadline)
                        res["published"] = k
                    p = make(k)
                    for q in dests:
                        q.put(p)
                res["published"] = spec.messages
                res["t_pub_done"] = time.monotonic()
            if tracker is not None:
                receive_all(lambda: _get(inbox, spec.deadline), tracker.feed, spec.deadline)
    except BaseException:
        res["error"] = traceback.format_exc()
    ctl.finish(res, tracker, wid in spec.active, spec.deadline)


def conduct(spec_d: dict) -> dict:
    spec = Spec.from_dict(spec_d)
    ctx = mp.get_context("fork")
    ctl = Control(spec.workers, spec.active)
    queues = [ctx.Queue() for _ in range(spec.workers)]
    procs = []
    try:
        start_workers(ctx, _worker, lambda wid: (queues, wid, spec.to_dict(), ctl.client_args), spec, procs)
        ctl.start()
        ctl.watch({wid: p.pid for wid, p in enumerate(procs)})
        results = ctl.wait_results(spec.deadline + 5.0)
        return finish(spec, results, ctl)
    finally:
        kill_processes(procs)
        for q in queues:
            q.close()
            q.cancel_join_thread()
        ctl.close()
