"""``python -m bench``: measure clustersync against its baselines in one run."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

from . import row_clustersync, row_mpqueue, row_pipe, row_redis, row_zmq
from .common import SCENARIOS, RunFailed, Spec, make_subreaper, run_isolated

ROWS = {
    "clustersync": row_clustersync,
    "pipe": row_pipe,
    "mpqueue": row_mpqueue,
    "redis": row_redis,
    "zmq": row_zmq,
}
BASELINES = ("pipe", "mpqueue", "redis", "zmq")
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"

PILOT_DELIVERIES = 3000  # a pilot run delivers about this many messages
PILOT_ROUNDS = 200  # latency pilot: round trips
MAX_BYTES_PER_PUBLISHER = 128 * 1024 * 1024
MAX_MESSAGES = 1_000_000
MAX_ROUNDS = 200_000
SETUP_ALLOWANCE = 15.0  # seconds for starting processes / servers, on top of the run itself


# ------------------------------------------------------------------------- options


def _csv(kind):
    def parse(text: str):
        try:
            items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput and latency of clustersync's relay next to hand-tuned and "
        "off-the-shelf baselines (pipe, mpqueue, redis, zmq).",
    )
    p.add_argument("--quick", action="store_true",
                   help="short smoke run: 1 run per figure, ~0.25 s runs (explicit options still win)")
    p.add_argument("--only", type=_csv(str), metavar="NAME[,NAME]",
                   help="rows to run: " + ",".join(ROWS) + " (default: all)")
    p.add_argument("--workers", type=_csv(int), metavar="N[,N]", help="worker counts (default 4,8)")
    p.add_argument("--payloads", type=_csv(int), metavar="BYTES[,BYTES]", help="payload sizes (default 100,4096)")
    p.add_argument("--scenarios", type=_csv(str), metavar="NAME[,NAME]",
                   help="fanout, all_to_all, sparse (every worker publishes on its topic, each subscribes "
                        "to one other's), latency (default: all four)")
    p.add_argument("--runs", type=int, help="runs per figure; the figure is their median (default 3, quick 1)")
    p.add_argument("--seconds", type=float,
                   help="target length of one run; message counts come from a short pilot run "
                   "(default 1.0, quick 0.25)")
    p.add_argument("--messages", type=int,
                   help="fixed messages per publisher (latency: round trips) instead of --seconds sizing")
    p.add_argument("--timeout", type=float,
                   help="hard limit for one run in seconds, setup included (default 120, quick 30)")
    p.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork",
                   help="start method of the clustersync row's workers (default fork)")
    p.add_argument("--consume", choices=("callback", "get", "async"), default="callback",
                   help="how the clustersync row's workers take messages: a callback subscription (default), "
                   "a thread looping on sub.get(), or async for on an asyncio loop that reads the pipe "
                   "(Hub.read_on_loop); get and async run the latency scenario only")
    p.add_argument("--primary-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the clustersync row's setup_primary_cluster(), e.g. "
                   "max_buffer=134217728 (repeatable)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results (default bench/results.json)")
    return p


def resolve(args) -> argparse.Namespace:
    if args.only:
        bad = [n for n in args.only if n not in ROWS]
        if bad:
            raise SystemExit("unknown row(s): %s (choose from %s)" % (", ".join(bad), ", ".join(ROWS)))
    if args.scenarios:
        bad = [n for n in args.scenarios if n not in SCENARIOS]
        if bad:
            raise SystemExit("unknown scenario(s): %s (choose from %s)" % (", ".join(bad), ", ".join(SCENARIOS)))
    args.rows = [r for r in ROWS if r in args.only] if args.only else list(ROWS)  # table order
    if args.consume != "callback":
        # A queue subscription drops its oldest messages when its consumer falls behind (one slow consumer
        # must not stall the worker's others), so a flood would measure that bound, not the transport.
        if args.scenarios and args.scenarios != ["latency"]:
            raise SystemExit("--consume %s measures latency only: a flood overflows a queue subscription by "
                             "design (see docs/hub.md)" % args.consume)
        args.scenarios = ["latency"]
    args.scenarios = args.scenarios or list(SCENARIOS)
    args.workers = args.workers or [4, 8]
    args.payloads = args.payloads or [100, 4096]
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.seconds is None:
        args.seconds = 0.25 if args.quick else 1.0
    if args.timeout is None:
        args.timeout = 30.0 if args.quick else 120.0
    # clustersync runs at its defaults: flow control slows publishers down to their receivers,
    # so nothing is lost without lifting a limit (--primary-option changes them).
    args.primary_options = {}
    for item in args.primary_option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit("--primary-option wants KEY=VALUE, not %r" % item)
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        args.primary_options[key] = value
    for n in args.workers:
        if not 2 <= n <= 64:
            raise SystemExit("--workers: each count must be from 2 to 64")
    for b in args.payloads:
        if not 6 <= b <= 1 << 20:
            raise SystemExit("--payloads: each size must be from 6 bytes to 1 MiB")
    if args.runs < 1 or args.seconds <= 0 or args.timeout < 20 or (args.messages is not None and args.messages < 1):
        raise SystemExit("--runs, --seconds and --messages must be positive, --timeout at least 20")
    return args


# ------------------------------------------------------------------------- sizing


def deliveries_per_message(scenario: str, workers: int) -> int:
    """Deliveries caused by one message of each publisher (throughput scenarios)."""
    if scenario == "fanout":
        return workers - 1
    if scenario == "sparse":
        return workers
    return workers * (workers - 1)


def pilot_messages(scenario: str, workers: int) -> int:
    if scenario == "latency":
        return PILOT_ROUNDS
    return max(50, math.ceil(PILOT_DELIVERIES / deliveries_per_message(scenario, workers)))


def clamp_messages(scenario: str, workers: int, payload: int, m: int) -> int:
    if scenario == "latency":
        return max(100, min(MAX_ROUNDS, m))
    cap = max(50, min(MAX_MESSAGES, MAX_BYTES_PER_PUBLISHER // payload))
    return max(50, min(cap, m))


def size_for(scenario: str, workers: int, payload: int, rate: float, seconds: float) -> int:
    """Messages per publisher (latency: round trips) for a run of about ``seconds``."""
    per = 1 if scenario == "latency" else deliveries_per_message(scenario, workers)
    return clamp_messages(scenario, workers, payload, int(rate * seconds / per))


def make_spec(scenario: str, workers: int, payload: int, messages: int, seconds_expected: float,
              timeout: float, options: dict) -> tuple[Spec, float]:
    warmup = 0
    if scenario == "latency":
        warmup = min(100, max(1, messages // 10))
        messages += warmup
    budget = min(timeout, SETUP_ALLOWANCE + max(10.0, 10.0 * seconds_expected))
    # workers give up at the deadline and report what they have; the conducting process
    # collects for 5 s more and cleans up; at ``budget`` the whole process group is killed
    spec = Spec(scenario, workers, payload, messages, deadline=time.monotonic() + budget - 10.0,
                warmup=warmup, options=options)
    return spec, budget


def calibrate(row, sc: str, n: int, pay: int, args, options: dict) -> tuple[int, float, dict]:
    """Size a row's runs to ``args.seconds``: (messages, expected seconds, last pilot).

    Two pilots: a tiny one, then one sized from it to a third of the target (a tiny run
    is dominated by its ramp-up and underestimates the rate).  messages is 0 when a
    pilot failed.
    """
    m = pilot_messages(sc, n)
    pilot: dict = {}
    for stage in (1, 2):
        spec, hard = make_spec(sc, n, pay, m, 2.0 if stage == 1 else args.seconds, args.timeout, options)
        pilot = execute(row, spec, hard)
        pilot.pop("primary_stats", None)
        rate = pilot.get("rate") or 0.0
        if not pilot.get("ok") or rate <= 0:
            return 0, 0.0, pilot
        m = size_for(sc, n, pay, rate, args.seconds / (3.0 if stage == 1 else 1.0))
    per = 1 if sc == "latency" else deliveries_per_message(sc, n)
    return m, m * per / rate, pilot


def execute(row, spec: Spec, hard: float) -> dict:
    t = time.monotonic()
    try:
        out = run_isolated(row.conduct, (spec.to_dict(),), hard)
    except RunFailed as exc:
        out = {"ok": False, "errors": [str(exc)], "rate": 0.0}
    out["messages"] = spec.messages
    out["warmup"] = spec.warmup
    out["elapsed_s"] = round(time.monotonic() - t, 3)
    return out


# ------------------------------------------------------------------------- output


def fmt_rate(x: float | None) -> str:
    if x is None or not x or math.isnan(x):
        return "-"
    if x >= 1e6:
        return "%.2fM/s" % (x / 1e6)
    if x >= 1e3:
        return "%.1fk/s" % (x / 1e3)
    return "%.0f/s" % x


def fmt_us(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    return "%.0f" % x if x < 10000 else "%.0fk" % (x / 1000)


def cell(entry: dict | None, scenario: str) -> str:
    if entry is None:
        return "-"
    med = entry.get("median") or {}
    flag = "" if entry["ok"] else "!"
    if scenario == "latency":
        if "p50_us" not in med:
            return "failed!"
        return "%s/%s/%s%s" % (fmt_us(med["p50_us"]), fmt_us(med["p99_us"]), fmt_us(med["max_us"]), flag)
    if not med.get("rate"):
        return "failed!"
    return fmt_rate(med["rate"]) + flag


def ratio(cs: dict | None, base: dict | None, scenario: str) -> float | None:
    if not cs or not base:
        return None
    a, b = cs.get("median") or {}, base.get("median") or {}
    key = "p50_us" if scenario == "latency" else "rate"
    if not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def median_of(runs: list[dict], scenario: str) -> dict:
    good = [r for r in runs if (r.get("p50_us") if scenario == "latency" else r.get("rate"))]
    if not good:
        return {}
    keys = ("p50_us", "p99_us", "max_us", "mean_us", "rounds") if scenario == "latency" else ("rate", "wall_s", "deliveries")
    return {k: statistics.median(r[k] for r in good) for k in keys if all(k in r for r in good)}


def print_table(args, rows: list[str], results: dict, out=sys.stdout) -> None:
    cs_on = "clustersync" in rows
    bases = [b for b in BASELINES if b in rows]
    head = ["scenario", "N", "payload"] + rows + (["cs/" + b for b in bases] if cs_on else [])
    lines = []
    for sc in args.scenarios:
        for n in args.workers:
            for pay in args.payloads:
                key = (sc, n, pay)
                line = [sc, str(n), "%d B" % pay]
                for r in rows:
                    line.append(cell(results.get(key + (r,)), sc))
                if cs_on:
                    for b in bases:
                        x = ratio(results.get(key + ("clustersync",)), results.get(key + (b,)), sc)
                        line.append("-" if x is None else "%.2fx" % x)
                lines.append(line)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    sep = "  "

    def show(cols):
        parts = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cols)]
        print(sep.join(parts).rstrip(), file=out)

    print(file=out)
    show(head)
    print("-" * (sum(widths) + len(sep) * (len(widths) - 1)), file=out)
    for l in lines:
        show(l)
    print(file=out)
    print("fanout/all_to_all/sparse: deliveries per second (messages received, summed over receivers, / time from "
          "first publish to last receive); latency: round trip p50/p99/max in microseconds.", file=out)
    if cs_on and bases:
        print("cs/X = clustersync / X: throughput ratio (above 1 = clustersync faster); for latency the ratio "
              "of p50 round trips (below 1 = clustersync faster).", file=out)
    print("Each figure is the median of %d run(s); '!' marks a figure with a failed check (see below)." % args.runs,
          file=out)


# ------------------------------------------------------------------------- main


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    make_subreaper()
    signal.signal(signal.SIGTERM, _on_sigterm)
    log = sys.stderr

    def say(msg: str) -> None:
        print(msg, file=log, flush=True)

    # --- which rows can run -------------------------------------------------------
    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    for name in args.rows:
        mod = ROWS[name]
        ok, why = mod.available()
        if ok and name == "clustersync":
            try:
                versions[name] = run_isolated(row_clustersync.check_import, (), 60.0) or ""
            except RunFailed as exc:
                ok, why = False, "clustersync: skipped -- import failed: %s" % str(exc).strip().splitlines()[-1]
        if not ok:
            skipped[name] = why
            continue
        if hasattr(mod, "version"):
            versions[name] = mod.version()
    rows = [r for r in args.rows if r not in skipped]

    header = [
        "clustersync benchmark: Python %s, %s %s, %d CPUs; %d run(s) per figure (median); %s"
        % (platform.python_version(), platform.system(), platform.machine(), os.cpu_count() or 0, args.runs,
           ("%d messages per publisher / round trips" % args.messages) if args.messages
           else ("runs sized to ~%.2g s each by a pilot run" % args.seconds)),
        "baselines tuned for lossless delivery:",
        "  clustersync: its defaults (max_buffer 32 MiB, flow control) unless --primary-option sets them",
    ]
    for b in BASELINES:
        header.append("  " + ROWS[b].TUNING)
    shown = []
    for r in args.rows:
        if r in skipped:
            shown.append("%s (skipped)" % r)
            continue
        v = versions.get(r) or ""
        extra = ""
        if r == "clustersync":
            extra = "start method %s, consume %s" % (args.start_method, args.consume)
            for key, value in args.primary_options.items():
                extra += ", %s=%s" % (key, value)
        detail = ", ".join(x for x in (v, extra) if x)
        shown.append("%s (%s)" % (r, detail) if detail else r)
    header.append("rows: " + ", ".join(shown))
    for line in header:
        print(line, flush=True)
    for name in args.rows:
        if name in skipped:
            print(skipped[name], flush=True)

    options = {"start_method": args.start_method, "primary_options": args.primary_options, "consume": args.consume}
    pilot_failures: dict[str, int] = {}
    results: dict[tuple, dict] = {}
    records: list[dict] = []
    started = time.monotonic()
    try:
        for sc in args.scenarios:
            for n in args.workers:
                for pay in args.payloads:
                    tag = "[%s N=%d %d B]" % (sc, n, pay)
                    sizes: dict[str, int] = {}
                    expect_s: dict[str, float] = {}
                    entries: dict[str, dict] = {}
                    active_rows = [r for r in rows if pilot_failures.get(r, 0) < 2]
                    for r in active_rows:
                        entries[r] = {"scenario": sc, "workers": n, "payload": pay, "row": r, "runs": [],
                                      "pilot": None}
                    # size the runs
                    for r in active_rows:
                        if args.messages:
                            sizes[r] = args.messages
                            expect_s[r] = 5.0
                            continue
                        m, expect, pilot = calibrate(ROWS[r], sc, n, pay, args, options)
                        entries[r]["pilot"] = pilot
                        if not m:
                            say("%s %s: pilot failed: %s" % (tag, r, _problems(pilot)))
                            sizes[r] = 0
                            pilot_failures[r] = pilot_failures.get(r, 0) + 1
                            if pilot_failures[r] >= 2:
                                say("%s: two pilot runs in a row failed: not measured any further" % r)
                            continue
                        pilot_failures[r] = 0
                        sizes[r] = m
                        expect_s[r] = expect
                    # the runs, rows interleaved
                    for i in range(args.runs):
                        for r in active_rows:
                            if not sizes.get(r):
                                continue
                            spec, hard = make_spec(sc, n, pay, sizes[r], expect_s[r], args.timeout, options)
                            out = execute(ROWS[r], spec, hard)
                            entries[r]["runs"].append(out)
                            fig = ("p50 %s us" % fmt_us(out["p50_us"])) if "p50_us" in out else fmt_rate(out.get("rate"))
                            say("%s %s run %d/%d: %s, %d msgs, %s%s" % (
                                tag, r, i + 1, args.runs, fig, spec.messages,
                                "ok" if out.get("ok") else "FAILED",
                                "" if out.get("ok") else " -- " + _problems(out)))
                    for r in active_rows:
                        e = entries[r]
                        e["messages"] = sizes[r]
                        e["median"] = median_of(e["runs"], sc)
                        e["ok"] = bool(e["runs"]) and all(x.get("ok") for x in e["runs"])
                        if not e["runs"] and e["pilot"] is not None:
                            e["errors"] = ["pilot: " + _problems(e["pilot"])]
                        results[(sc, n, pay, r)] = e
                        records.append(e)
    except KeyboardInterrupt:
        say("interrupted: reporting what was measured")

    problems = []
    if rows:
        print_table(args, rows, results)
    else:
        print("no row could run: nothing measured.")
    for e in records:
        bad = [x for x in e["runs"] if not x.get("ok")]
        if bad or not e["runs"]:
            detail = "; ".join(_problems(x) for x in bad) if bad else "; ".join(e.get("errors", ["no run"]))
            problems.append("%s N=%d %d B %s: %s" % (e["scenario"], e["workers"], e["payload"], e["row"], detail))
    if problems:
        print("failed checks:")
        for p in problems:
            print("  " + p)
    elif records:
        print("all checks passed: every receiver got every message exactly once, in order per publisher.")

    ratios = []
    if "clustersync" in rows:
        for (sc, n, pay, r), e in results.items():
            if r in BASELINES:
                x = ratio(results.get((sc, n, pay, "clustersync")), e, sc)
                if x is not None:
                    ratios.append({"scenario": sc, "workers": n, "payload": pay, "baseline": r,
                                   "metric": "p50_us" if sc == "latency" else "rate", "clustersync_over_baseline": x})
    doc = {
        "meta": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv[1:] if argv is None else argv,
            "runs": args.runs,
            "seconds": args.seconds,
            "messages": args.messages,
            "start_method": args.start_method,
            "consume": args.consume,
            "primary_options": args.primary_options,
            "rows": rows,
            "versions": versions,
            "tuning": {b: ROWS[b].TUNING for b in BASELINES},
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "skipped": skipped,
        "results": records,
        "ratios": ratios,
    }
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        print("results written to %s" % args.json)
    except OSError as exc:
        print("could not write %s: %s" % (args.json, exc))
    return 1 if problems else 0


def _problems(run: dict) -> str:
    parts = []
    for k in ("loss", "dup", "reorder", "bad"):
        if run.get(k):
            parts.append("%s %d" % (k, run[k]))
    errs = run.get("errors") or []
    if errs:
        first = errs[0].strip().splitlines()
        parts.append(first[-1] if first else "error")
        if len(errs) > 1:
            parts.append("(+%d more)" % (len(errs) - 1))
    return ", ".join(parts) or "no figure"
