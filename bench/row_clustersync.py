"""Row ``clustersync``: the package under test, through its public API only.

The process conducting the run becomes the primary (``setup_primary_cluster``) and
forks the workers with ``primary.fork``; the relay runs on its own thread while ``primary.join()`` waits.
Each worker makes ``Hub(sync=cluster(channel="bench"))``, subscribes a callback to the
topic of every publisher it expects, waits for ``hub.wait_ready()``, says ready, and
after the common start publishes with plain ``hub.publish(topic, bytes)`` (no flush
calls: batching is clustersync's business).  Results travel back over the harness's
own control socket, so the worker arguments are plain picklable values and the row
works with every start method.
"""

from __future__ import annotations

import importlib.util
import threading
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
    latency_summary,
    topic_name,
)

NAME = "clustersync"
CHANNEL = "bench"
START_METHOD = "fork"  # the harness's --start-method overrides it (spec.options)


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("clustersync") is None:
        return False, "clustersync: skipped -- the clustersync package is not importable from here"
    return True, ""


def check_import() -> str:
    """Run in a throw-away process: import what the row needs, return the version."""
    import clustersync
    from clustersync import Hub, Message  # noqa: F401
    from clustersync.sync import cluster, setup_primary_cluster  # noqa: F401

    return getattr(clustersync, "__version__", "")


def _worker(wid: int, spec_d: dict, ctl_address: str, authkey: bytes) -> None:
    spec = Spec.from_dict(spec_d)
    ctl = ControlClient(ctl_address, authkey, wid)
    res = base_result(wid)
    sources = spec.sources(wid)
    tracker = Tracker(wid, sources, spec.messages, spec.payload, spec.workers) if sources else None
    deadline = spec.deadline
    hub = None
    consumer = None
    done = threading.Event()
    try:
        from clustersync import Hub
        from clustersync.sync import cluster

        hub = Hub(sync=cluster(channel=CHANNEL))
        make = PayloadMaker(wid, spec.payload)
        topic = topic_name(wid)
        publish = hub.publish

        if spec.scenario == "latency" and wid == 0:
            rtts: list[int] = []
            perf = time.perf_counter_ns
            state = {"k": 0, "t0": 0}

            def on_msg(msg) -> None:  # a pong: record the round trip, send the next ping
                t1 = perf()
                tracker.feed(msg.data)
                k = state["k"]
                if k >= spec.warmup:
                    rtts.append(t1 - state["t0"])
                k += 1
                state["k"] = k
                if k < spec.messages:
                    state["t0"] = perf()
                    publish(topic, make(k))
                    res["published"] = k + 1
                else:
                    done.set()

        elif spec.scenario == "latency" and wid == 1:
            state = {"k": 0}

            def on_msg(msg) -> None:  # a ping: answer at once
                tracker.feed(msg.data)
                k = state["k"]
                publish(topic, make(k))
                state["k"] = k + 1
                res["published"] = k + 1
                if k + 1 >= spec.messages:
                    done.set()

        else:
            feed = tracker.feed if tracker is not None else None

            def on_msg(msg) -> None:
                if feed(msg.data):
                    done.set()

        consume = spec.options.get("consume", "callback")
        consumer = None
        if consume == "callback":
            for p in sources:
                hub.subscribe(topic_name(p), on_msg)
        elif sources:  # latency: one publisher per receiver (the harness runs get and async there only)
            consumer = _consumer(hub, hub.subscribe(topic_name(sources[0])), on_msg, done, consume, res)
        if not hub.wait_ready(timeout=max(0.1, min(10.0, deadline - time.monotonic()))):
            raise RuntimeError("hub.wait_ready() returned False")
        ctl.ready_and_wait(deadline)

        if spec.scenario == "latency":
            if wid == 0:
                res["t_first_pub"] = time.monotonic()
                state["t0"] = perf()
                publish(topic, make(0))
                res["published"] = 1
            if wid in (0, 1) and not done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("deadline reached")
            if wid == 0:
                res["latency"] = latency_summary(rtts)
        else:
            if wid in spec.publishers:
                res["t_first_pub"] = time.monotonic()
                for k in range(spec.messages):
                    if not k & 255:
                        check_deadline(deadline)
                        res["published"] = k
                    publish(topic, make(k))
                res["published"] = spec.messages
                res["t_pub_done"] = time.monotonic()
            if tracker is not None and not done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("deadline reached")
    except BaseException:
        res["error"] = traceback.format_exc()
    try:
        if hub is not None:
            hub.close()  # flushes what is still queued for the other workers; ends a consumer's loop
        if consumer is not None:
            consumer.join(5.0)
    except BaseException:
        res.setdefault("error", traceback.format_exc())
    ctl.finish(res, tracker, wid in spec.active, deadline)


def _consumer(hub, sub, on_msg, done, consume: str, res: dict) -> threading.Thread:
    """A thread taking messages from the queue subscription ``sub`` as an application would:
    ``for msg in sub`` (``get``), or ``async for msg in sub`` on an asyncio loop of its own
    (``async``, reading the worker's pipe on that loop). It ends when the hub closes."""

    def run_get() -> None:
        for msg in sub:
            on_msg(msg)
            if done.is_set():
                return

    async def run_async() -> None:
        hub.read_on_loop()
        async for msg in sub:
            on_msg(msg)
            if done.is_set():
                return

    def run() -> None:
        try:
            if consume == "get":
                run_get()
            else:
                import asyncio

                asyncio.run(run_async())
        except BaseException:
            res["error"] = traceback.format_exc()
            done.set()

    thread = threading.Thread(target=run, name="bench-consumer", daemon=True)
    thread.start()
    return thread


def conduct(spec_d: dict) -> dict:
    from clustersync.sync import setup_primary_cluster

    spec = Spec.from_dict(spec_d)
    start_method = spec.options.get("start_method", START_METHOD)
    ctl = Control(spec.workers, spec.active)
    primary = None
    handles = []
    stats = None
    errors: list[str] = []
    try:
        primary = setup_primary_cluster(start_method=start_method, **spec.options.get("primary_options", {}))
        if primary is None:
            raise RuntimeError("setup_primary_cluster() returned None in the conducting process")
        for wid in range(spec.workers):
            handles.append(primary.fork(_worker, wid, spec.to_dict(), ctl.address, ctl.authkey))
        ctl.start()
        ctl.watch({wid: h.pid for wid, h in enumerate(handles) if isinstance(getattr(h, "pid", None), int)})
        if not primary.join(timeout=max(1.0, spec.deadline + 5.0 - time.monotonic())):
            errors.append("primary.join() timed out: workers still running at the deadline")
        results = ctl.wait_results(time.monotonic() + 2.0)
        try:
            stats = primary.stats()
        except Exception as exc:
            stats = {"error": repr(exc)}
        out = finish(spec, results, ctl, errors)
        out["primary_stats"] = _jsonable(stats)
        return out
    finally:
        if primary is not None:
            try:
                try:
                    primary.close(timeout=2.0)
                except TypeError:  # a close() without the timeout keyword
                    primary.close()
            except Exception:
                pass
        for h in handles:  # belt and braces: the run's process group is killed anyway
            proc = getattr(h, "process", None)
            try:
                if proc is not None and proc.is_alive():
                    proc.kill()
                    proc.join(2.0)
            except Exception:
                pass
        ctl.close()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)
