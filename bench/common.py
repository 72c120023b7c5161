"""Shared pieces of the clustersync benchmark harness.

* ``Spec``        -- what one run does (scenario, workers, payload, message count, deadline).
* payload codec   -- every payload carries a publisher id and a sequence number.
* ``Tracker``     -- receiver-side check: each message exactly once, in order per publisher.
* ``Control``     -- the "all subscribed" handshake and result channel between the process
                     that conducts a run and its workers (works with any start method: its
                     address and key are plain picklable values).
* ``run_isolated``-- runs one benchmark run in a forked child that leads its own process
                     group; the whole group is killed afterwards, even on failure.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import resource
import select
import signal
import socket
import struct
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Client, Listener

SCENARIOS = ("fanout", "all_to_all", "sparse", "latency")

# --------------------------------------------------------------------------- spec


@dataclass
class Spec:
    scenario: str
    workers: int
    payload: int
    messages: int  # per publisher (fanout/all_to_all/sparse) or round trips (latency)
    deadline: float = 0.0  # absolute time.monotonic() after which workers give up
    warmup: int = 0  # latency: round trips not recorded
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        return cls(**d)

    # --- roles ---------------------------------------------------------------
    @property
    def publishers(self) -> list[int]:
        if self.scenario == "fanout":
            return [0]
        if self.scenario in ("all_to_all", "sparse"):
            return list(range(self.workers))
        return [0, 1]  # latency: 0 pings, 1 pongs

    def sources(self, wid: int) -> list[int]:
        """Publishers whose messages worker ``wid`` must receive."""
        if self.scenario == "fanout":
            return [0] if wid != 0 else []
        if self.scenario == "all_to_all":
            return [p for p in range(self.workers) if p != wid]
        if self.scenario == "sparse":  # every worker publishes; each subscribes to one other's topic alone
            return [(wid + 1) % self.workers]
        return {0: [1], 1: [0]}.get(wid, [])

    def subscribers(self, pub: int) -> list[int]:
        return [w for w in range(self.workers) if pub in self.sources(w)]

    @property
    def receivers(self) -> list[int]:
        return [w for w in range(self.workers) if self.sources(w)]

    @property
    def active(self) -> set[int]:
        return set(self.publishers) | set(self.receivers)

    def expected(self, wid: int) -> int:
        return len(self.sources(wid)) * self.messages

    @property
    def expected_deliveries(self) -> int:
        return sum(self.expected(w) for w in range(self.workers))


def topic_name(pub: int) -> str:
    """Every publisher has its own topic; a receiver subscribes to the ones it expects."""
    return "t%d" % pub


# ------------------------------------------------------------------------ payload

HEADER = struct.Struct("<HI")  # publisher id, sequence number


class PayloadMaker:
    """Builds payloads of exactly ``size`` bytes: header + fixed filler."""

    def __init__(self, pub: int, size: int):
        if size < HEADER.size:
            raise ValueError("payload must be at least %d bytes" % HEADER.size)
        self.pub = pub
        self.filler = bytes((i * 7 + 13) & 0xFF for i in range(size - HEADER.size))
        self.pack = HEADER.pack

    def __call__(self, seq: int) -> bytes:
        return self.pack(self.pub, seq) + self.filler


def decode(data) -> tuple[int, int]:
    return HEADER.unpack_from(data, 0)


# ------------------------------------------------------------------------ tracker


class Tracker:
    """Receiver-side verification.

    For each expected publisher a bitmap of seen sequence numbers: a second copy counts
    as ``dup``, a message older than the newest already seen from that publisher counts
    as ``reorder``, a wrong size or unknown publisher counts as ``bad``, a message of
    the receiver's own counts as ``self`` (ignored); what is missing at the end is
    ``loss``.
    """

    __slots__ = (
        "me", "size", "m", "seen", "top", "remaining", "unique", "dup", "reorder",
        "bad", "selfcount", "t_first", "t_last", "t_done", "got",
    )

    def __init__(self, me: int, sources: list[int], messages: int, size: int, nworkers: int):
        self.me = me
        self.size = size
        self.m = messages
        self.seen: list = [None] * max(nworkers, 1)
        self.top = [-1] * max(nworkers, 1)
        self.got = [0] * max(nworkers, 1)
        for p in sources:
            self.seen[p] = bytearray(messages)
        self.remaining = len(sources) * messages
        self.unique = self.dup = self.reorder = self.bad = self.selfcount = 0
        self.t_first = self.t_last = self.t_done = 0.0

    def feed(self, data) -> bool:
        """Record one received payload; returns True once everything expected arrived."""
        now = time.monotonic()
        if not self.t_first:
            self.t_first = now
        self.t_last = now
        if len(data) != self.size:
            self.bad += 1
            return self.remaining == 0
        pub, seq = HEADER.unpack_from(data, 0)
        if pub == self.me:
            self.selfcount += 1
            return self.remaining == 0
        try:
            seen = self.seen[pub]
        except IndexError:
            seen = None
        if seen is None or seq >= self.m:
            self.bad += 1
            return self.remaining == 0
        if seen[seq]:
            self.dup += 1
            return self.remaining == 0
        seen[seq] = 1
        self.got[pub] += 1
        if seq < self.top[pub]:
            self.reorder += 1
        else:
            self.top[pub] = seq
        self.unique += 1
        self.remaining -= 1
        if self.remaining == 0:
            self.t_done = now
            return True
        return False

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def result(self) -> dict:
        return {
            "expected": self.unique + self.remaining,
            "unique": self.unique,
            "loss": self.remaining,
            "dup": self.dup,
            "reorder": self.reorder,
            "bad": self.bad,
            "self": self.selfcount,
            "t_first_recv": self.t_first,
            "t_last_recv": self.t_done or self.t_last,
        }


def check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError("deadline reached")


def receive_all(next_data, feed, deadline: float) -> None:
    """``feed(next_data())`` until ``feed`` says done; the deadline is checked every 1024."""
    n = 0
    while not feed(next_data()):
        n += 1
        if not n & 1023 and time.monotonic() > deadline:
            raise TimeoutError("deadline reached")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float | None:
    """CPU time of another process from /proc (None if unavailable)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = int(round(q * (len(sorted_values) - 1)))
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def ping_pong(wid: int, spec: "Spec", send, receive, tracker, make, res: dict, deadline: float) -> None:
    """The latency scenario for a row whose worker sends with ``send(payload)`` and blocks in ``receive()``.

    Worker 0 pings and times each round trip (into ``res["latency"]``); worker 1
    answers each ping; the others stay idle.
    """
    if wid == 0:
        rtts = []
        perf = time.perf_counter_ns
        res["t_first_pub"] = time.monotonic()
        for k in range(spec.messages):
            check_deadline(deadline)
            t0 = perf()
            send(make(k))
            res["published"] = k + 1
            data = receive()
            t1 = perf()
            tracker.feed(data)
            if k >= spec.warmup:
                rtts.append(t1 - t0)
        res["latency"] = latency_summary(rtts)
    elif wid == 1:
        for k in range(spec.messages):
            check_deadline(deadline)
            tracker.feed(receive())
            send(make(k))
            res["published"] = k + 1


def latency_summary(rtts_ns: list[int]) -> dict:
    s = sorted(rtts_ns)
    return {
        "rounds": len(s),
        "p50_us": percentile(s, 0.50) / 1000.0,
        "p99_us": percentile(s, 0.99) / 1000.0,
        "max_us": (s[-1] / 1000.0) if s else float("nan"),
        "mean_us": (sum(s) / len(s) / 1000.0) if s else float("nan"),
    }


def base_result(wid: int) -> dict:
    return {"wid": wid, "published": 0, "t_first_pub": 0.0, "t_pub_done": 0.0}


def error_result(wid: int, exc: BaseException | None = None) -> dict:
    r = base_result(wid)
    r["error"] = traceback.format_exc() if exc is not None else "unknown error"
    return r


# ------------------------------------------------------------------------ control


class Control:
    """Conductor side of the start handshake and result channel.

    Workers connect (``ControlClient``), say ``ready`` once subscribed, get ``go`` once
    every worker is ready, send their result, and idle workers wait for ``stop`` (sent
    once every active worker reported, or at the deadline).
    """

    def __init__(self, nworkers: int, active: set[int]):
        self.n = nworkers
        self.active = set(active)
        self._dir = tempfile.mkdtemp(prefix="csbench-")
        self.address = os.path.join(self._dir, "ctl")
        self.authkey = os.urandom(16)
        self._listener = Listener(self.address, "AF_UNIX", authkey=self.authkey)
        self._lock = threading.Lock()
        self._conns: dict[int, object] = {}
        self._ready: set[int] = set()
        self.results: dict[int, dict] = {}
        self._all_results = threading.Event()
        self._gone: set[int] = set()
        self._stopped = False
        self.go_time = 0.0
        self.ready_time = 0.0
        self.aux_pids: dict[str, int] = {}  # e.g. a proxy or server: CPU sampled at go and end
        self._cpu_go: dict[str, float | None] = {}

    @property
    def client_args(self) -> tuple:
        return (self.address, self.authkey)

    def start(self) -> None:
        """Start serving (call after forking workers)."""
        threading.Thread(target=self._accept_loop, name="bench-ctl", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except Exception:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        wid = None
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "hello":
                    wid = msg[1]
                    with self._lock:
                        self._conns[wid] = conn
                        if self._stopped:  # connected after the run was called off
                            self._send(conn, ("stop",))
                elif kind == "ready":
                    with self._lock:
                        self._ready.add(msg[1])
                        if len(self._ready) == self.n:
                            self.ready_time = time.monotonic()
                            self._cpu_go = {"conductor": cpu_seconds()}
                            for name, pid in self.aux_pids.items():
                                self._cpu_go[name] = proc_cpu_seconds(pid)
                            for c in self._conns.values():
                                self._send(c, ("go",))
                            self.go_time = time.monotonic()
                elif kind == "result":
                    with self._lock:
                        self.results[msg[1]] = msg[2]
                        if self.active <= set(self.results):
                            self._stop_locked()
                        self._check_done_locked()
        except (EOFError, OSError):
            pass
        # the worker hung up (normally after its result; if not, it died): stop waiting
        # for it
        with self._lock:
            if wid is not None:
                self._gone.add(wid)
                if wid not in self.results and not self.go_time:
                    self._stop_locked()  # died before the start: call the run off
            self._check_done_locked()

    def watch(self, pids: dict[int, int]) -> None:
        """Notice workers (our children, by pid) that exit without a result.

        Checks without reaping, so whoever owns the process still reaps it.
        A worker gone before the start calls the run off.
        """
        def loop() -> None:
            pending = dict(pids)
            while pending and not self._all_results.is_set():
                for wid, pid in list(pending.items()):
                    if not _has_exited(pid):
                        continue
                    pending.pop(wid)
                    time.sleep(0.2)  # a result sent just before exiting may still be on its way
                    with self._lock:
                        if wid not in self.results:
                            self._gone.add(wid)
                            if not self.go_time:
                                self._stop_locked()
                            self._check_done_locked()
                time.sleep(0.1)

        threading.Thread(target=loop, name="bench-watch", daemon=True).start()

    def _check_done_locked(self) -> None:
        if len(set(self.results) | self._gone) >= self.n:
            self._all_results.set()

    @staticmethod
    def _send(conn, msg) -> None:
        try:
            conn.send(msg)
        except OSError:
            pass

    def _stop_locked(self) -> None:
        if not self._stopped:
            self._stopped = True
            for c in self._conns.values():
                self._send(c, ("stop",))

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def cpu_report(self, results: dict[int, dict]) -> dict:
        """CPU seconds spent from the start signal to now: workers, conductor, helpers."""
        out: dict = {}
        if not self._cpu_go:
            return out
        out["conductor"] = cpu_seconds() - self._cpu_go["conductor"]
        for name, pid in self.aux_pids.items():
            now, then = proc_cpu_seconds(pid), self._cpu_go.get(name)
            if now is not None and then is not None:
                out[name] = now - then
        w = [r.get("cpu_s") for r in results.values()]
        if w and all(x is not None for x in w):
            out["workers"] = sum(w)
            out["per_worker"] = {str(k): r.get("cpu_s") for k, r in sorted(results.items())}
        out["total"] = sum(v for k, v in out.items() if k != "per_worker")
        return out

    def wait_results(self, deadline: float) -> dict[int, dict]:
        self._all_results.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return dict(self.results)

    def close(self) -> None:
        try:
            self._listener.close()
        except Exception:
            pass
        with self._lock:
            for c in self._conns.values():
                try:
                    c.close()
                except Exception:
                    pass
        try:
            os.unlink(self.address)
        except OSError:
            pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


def _has_exited(pid: int) -> bool:
    """True once process ``pid`` has exited (never reaps it)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        pass  # already reaped by its owner, or not our child (forkserver)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class ControlClient:
    """Worker side of ``Control``."""

    def __init__(self, address: str, authkey: bytes, wid: int):
        self.wid = wid
        self.conn = Client(address, "AF_UNIX", authkey=authkey)
        self.conn.send(("hello", wid))
        self._stopped = False
        self.cpu_at_go: float | None = None

    def ready(self) -> None:
        self.conn.send(("ready", self.wid))

    def poll_go(self, timeout: float) -> bool:
        """True once ``go`` arrived (waits up to ``timeout`` seconds)."""
        if self.conn.poll(timeout):
            msg = self.conn.recv()
            if msg[0] == "stop":
                self._stopped = True
                raise RuntimeError("stopped before start")
            if msg[0] == "go":
                self.cpu_at_go = cpu_seconds()
                return True
        return False

    def wait_go(self, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no start signal before the deadline")
            if self.poll_go(min(left, 1.0)):
                return

    def ready_and_wait(self, deadline: float) -> None:
        self.ready()
        self.wait_go(deadline)

    def report(self, result: dict) -> None:
        if self.cpu_at_go is not None:
            result["cpu_s"] = cpu_seconds() - self.cpu_at_go
        self.conn.send(("result", self.wid, result))

    def finish(self, result: dict, tracker, active: bool, deadline: float) -> None:
        """A worker's last steps: add the receive checks, report, wait for the stop if idle, close."""
        if tracker is not None:
            result.update(tracker.result())
        self.report(result)
        if not active:
            self.wait_stop(deadline)
        self.close()

    def wait_stop(self, deadline: float) -> None:
        while not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.conn.poll(min(left, 1.0)):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    return
                if msg[0] == "stop":
                    self._stopped = True

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


# -------------------------------------------------------------- result summaries


def summarize(spec: Spec, results: dict[int, dict], extra_errors: list[str] | None = None) -> dict:
    """Combine the workers' reports of one run into its figures and checks."""
    errors = list(extra_errors or [])
    loss = dup = reorder = bad = selfc = unique = 0
    t_first_pub: list[float] = []
    t_last_recv: list[float] = []
    for w in range(spec.workers):
        r = results.get(w)
        if r is None:
            if w in spec.active:
                errors.append("worker %d sent no result" % w)
                loss += spec.expected(w)
            continue
        if r.get("error"):
            errors.append("worker %d: %s" % (w, r["error"].strip().splitlines()[-1]))
        if w in spec.publishers:
            if r.get("published", 0) != spec.messages:
                errors.append("worker %d published %s of %d" % (w, r.get("published"), spec.messages))
            if r.get("t_first_pub"):
                t_first_pub.append(r["t_first_pub"])
        if spec.expected(w):
            if "unique" not in r:
                loss += spec.expected(w)
                continue
            loss += r["loss"]
            dup += r["dup"]
            reorder += r["reorder"]
            bad += r["bad"]
            selfc += r["self"]
            unique += r["unique"]
            if r.get("t_last_recv"):
                t_last_recv.append(r["t_last_recv"])
    out = {
        "expected": spec.expected_deliveries,
        "deliveries": unique,
        "loss": loss,
        "dup": dup,
        "reorder": reorder,
        "bad": bad,
        "self": selfc,
        "errors": errors,
    }
    if spec.scenario == "latency":
        lat = (results.get(0) or {}).get("latency")
        if lat:
            out.update(lat)
            # round trips per second (used to size runs from a pilot)
            out["rate"] = 1e6 / lat["mean_us"] if lat["rounds"] and lat["mean_us"] > 0 else 0.0
        else:
            errors.append("no latency samples")
    else:
        if t_first_pub and t_last_recv:
            wall = max(t_last_recv) - min(t_first_pub)
            out["wall_s"] = wall
            out["rate"] = unique / wall if wall > 0 else 0.0
        else:
            out["wall_s"] = 0.0
            out["rate"] = 0.0
    out["ok"] = not (errors or loss or dup or reorder or bad)
    return out


def finish(spec: Spec, results: dict[int, dict], ctl: "Control", errors: list[str] | None = None) -> dict:
    """``summarize`` plus the CPU spent during the run (and per delivery / round trip)."""
    out = summarize(spec, results, errors)
    cpu = ctl.cpu_report(results)
    if cpu.get("total") is not None:
        n = out["deliveries"] if spec.scenario != "latency" else out.get("rounds", 0)
        if n:
            cpu["us_per_delivery" if spec.scenario != "latency" else "us_per_round_trip"] = cpu["total"] / n * 1e6
    out["cpu"] = cpu
    return out


# --------------------------------------------------------------- process hygiene


def make_subreaper() -> None:
    """Linux: orphans of our runs get re-parented to us (so we can reap them)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def reap_orphans(wait: float = 2.0) -> None:
    """Reap children re-parented to us (see ``make_subreaper``), for up to ``wait`` s."""
    end = time.monotonic() + wait
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.monotonic() > end:
                return
            time.sleep(0.005)


class RunFailed(Exception):
    pass


def run_isolated(fn, args: tuple, hard_timeout: float, reap_wait: float = 2.0):
    """Run ``fn(*args)`` in a forked child that leads a new process group.

    Returns what ``fn`` returned (it must be picklable).  Whatever happens -- success,
    exception, hang past ``hard_timeout`` -- every process of that group is SIGKILLed
    before this returns, so no process of the run is left behind.  ``reap_wait``: how
    long to reap orphans afterwards (see ``reap_orphans``; a caller with children of
    its own that outlive the run, such as servers, waits that long every time).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # ---------------------------------------------------- child
        code = 0
        try:
            os.close(rfd)
            os.setpgid(0, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
                code = 1
            # length-prefixed: the run's own children may hold the pipe open, so the
            # parent cannot wait for end-of-file
            view = memoryview(struct.pack("<Q", len(payload)) + payload)
            while view:
                n = os.write(wfd, view)
                view = view[n:]
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    # ------------------------------------------------------------------- parent
    os.close(wfd)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it (or already exited)
    buf = bytearray()
    need = None
    end = time.monotonic() + hard_timeout
    timed_out = False

    def exited() -> bool:
        # waits without reaping: the process-group id stays reserved until we kill it
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    try:
        while need is None or len(buf) < need:
            left = end - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            gone = exited()
            r, _, _ = select.select([rfd], [], [], 0 if gone else min(left, 0.05))
            if r:
                data = os.read(rfd, 1 << 16)
                if not data:
                    break
                buf += data
                if need is None and len(buf) >= 8:
                    need = 8 + struct.unpack_from("<Q", buf)[0]
            elif gone:
                break
        # let the conductor finish its own clean-up
        grace = time.monotonic() + (0 if timed_out else 10.0)
        while time.monotonic() < grace and not exited():
            time.sleep(0.01)
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.EPERM):
                raise
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        os.close(rfd)
        reap_orphans(reap_wait)
    if timed_out:
        raise RunFailed("run exceeded its hard deadline of %.0f s and was killed" % hard_timeout)
    if need is None or len(buf) < need:
        raise RunFailed("run process died without a result")
    status, value = pickle.loads(bytes(buf[8:need]))
    if status != "ok":
        raise RunFailed(value.strip())
    return value


def start_workers(ctx, target, args_of, spec: Spec, procs: list) -> None:
    """Start a daemon process per worker id running ``target(*args_of(wid))``; append each to ``procs``."""
    for wid in range(spec.workers):
        p = ctx.Process(target=target, args=args_of(wid), daemon=True)
        p.start()
        procs.append(p)


def kill_processes(procs, grace: float = 2.0) -> None:
    """Join multiprocessing.Process objects; kill the ones that do not exit in time."""
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.join(max(0.0, end - time.monotonic()))
        except Exception:
            pass
    for p in procs:
        try:
            if p.is_alive():
                p.kill()
                p.join(2.0)
        except Exception:
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
