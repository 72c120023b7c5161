"""Supervision for ``clustersync run``: keep N workers running ``MODULE:CALLABLE``.

The supervisor is callbacks and timers on the relay's own loop, which runs
on the main thread (the primary is made with ``thread=False``). Signal
handlers only queue a call to :meth:`Supervisor._dispatch_signals` on the
loop, which dispatches each signal to a ``handle_<name>`` method. Worker
exits and readiness arrive through the primary's ``on_worker_exit`` /
``on_worker_ready`` callbacks; restarts, rolling restarts and kill deadlines
are timers on the loop, and :meth:`Supervisor._tick` runs after every turn.

Each worker index is a :class:`Slot`. A worker is *ready* once its callable
has run for a second or called ``notify_ready()``. A worker that fails before
it is ready on its first start, or five times in a row, stops the command:
the app is broken, restarting it would only loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from .. import __version__
from ..relay.loop import blocked_signals
from .boot import MAX_REPORT, SIGNALS as WORKER_SIGNALS, WorkerSpec, run_app
from ..relay.primary import Primary, WorkerHandle
from .sockets import Address, bind, describe, parse_address, with_port
from .interface import MISSING_UVICORN, uvicorn_missing
from .reload import POLL as RELOAD_POLL, Watcher, describe_changes

__all__ = ["RunConfig", "Supervisor", "Backoff", "describe_exit", "exit_status", "RESTART_POLICIES"]

logger = logging.getLogger("clustersync")

RESTART_POLICIES = ("on-failure", "always", "never")
#: Failures before ready, in a row, after which the command stops.
MAX_BOOT_FAILURES = 5
#: The most workers ``clustersync run`` starts (``-w``, and SIGTTIN): each is a Python process of its own.
MAX_RUN_WORKERS = 1024
#: Seconds to wait for killed workers to be reaped before giving up on them.
KILL_WAIT = 5.0

EXIT_OK = 0
EXIT_KILLED = 1  # a stop had to kill workers; also: cannot listen, internal error
EXIT_BOOT = 3  # the app failed to boot

SIGNALS = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
}

OOM_HINT = " (clustersync did not send it: the kernel's out-of-memory killer is a common cause, see dmesg)"


@dataclass(frozen=True)
class RunConfig:
    """The options of ``clustersync run``."""

    app: str
    workers: int
    binds: Tuple[str, ...] = ()
    reuse_port: bool = False
    restart: str = "on-failure"
    graceful_timeout: float = 30.0
    timeout: Optional[float] = None
    start_method: Optional[str] = None
    log_level: str = "info"
    app_dir: Optional[str] = None
    uplink: Optional[str] = None
    bus: Optional[str] = None
    interface: str = "auto"  # auto, asgi or call: see runner/interface.py
    reload: bool = False  # rolling restart when a .py file under app_dir (or the cwd) changes


class Backoff:
    """Restart delays that double with each quick exit: ``first``, 2x, 4x... up to ``maximum``.

    A worker that stayed up ``stable`` seconds or more starts the series again.
    """

    def __init__(self, first: float = 0.1, maximum: float = 10.0, stable: float = 10.0) -> None:
        self.first = first
        self.maximum = maximum
        self.stable = stable
        self.count = 0

    def next(self, uptime: float) -> float:
        """The delay before restarting a worker that ran ``uptime`` seconds."""
        if uptime >= self.stable:
            self.count = 0
        self.count += 1
        delay: float = min(self.first * 2.0 ** (self.count - 1), self.maximum)
        return delay


def describe_exit(code: Optional[int]) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``, from a process exit code."""
    if code is None:
        return "exited (status unknown)"
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def exit_status(code: Optional[int]) -> int:
    """A process exit code as a shell would report it (killed by signal N: 128 + N)."""
    if code is None:
        return 1
    return code if code >= 0 else 128 - code


class Slot:
    """One worker index: its current worker, if any, and its history."""

    def __init__(self, index: int, *, initial: bool, generation: int) -> None:
        self.index = index
        self.initial = initial  # one of the workers the command started with
        self.generation = generation  # bumped by SIGHUP: older workers get replaced
        self.handle: Optional[WorkerHandle] = None
        self.starts = 0
        self.boot_failures = 0  # failures before ready, in a row
        self.backoff = Backoff()
        self.restart_at: Optional[float] = None
        self.rolling = False  # replaced by a rolling restart; the restart waits until its successor is ready
        self.done = False  # returned (or failed with --restart never): not restarted


class Supervisor:
    """Runs ``config.app`` in ``config.workers`` workers until they are done or a signal stops them."""

    def __init__(self, config: RunConfig) -> None:
        if config.restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {', '.join(RESTART_POLICIES)}")
        if not 0 < config.workers <= MAX_RUN_WORKERS:
            raise ValueError(f"workers must be from 1 to {MAX_RUN_WORKERS}")
        self.config = config
        paths = [os.getcwd()]
        if config.app_dir:
            paths.insert(0, os.path.abspath(config.app_dir))
        self.spec = WorkerSpec(config.app, tuple(paths), config.log_level, config.interface, config.graceful_timeout)
        self._watcher: Optional[Watcher] = None  # --reload
        self.primary: Optional[Primary] = None
        self.slots: Dict[int, Slot] = {}
        self.target = config.workers
        self.generation = 0
        self._pid = os.getpid()
        self._signals: Deque[int] = deque()
        self._deferred: List[int] = []
        self._addresses: List[Address] = [parse_address(b) for b in config.binds]
        self._listeners: List[Optional[socket.socket]] = []  # None: bound per worker (--reuse-port)
        self._unix_paths: List[str] = []
        # Each worker reports what went wrong on a datagram pair of its own: it holds one end,
        # the supervisor the other, so no worker can write (or read) another's report.
        self._report_socks: Dict[WorkerHandle, socket.socket] = {}
        _supervisors.add(self)
        self._terminated: Set[WorkerHandle] = set()  # workers this supervisor asked to stop
        self._kill_at: Dict[WorkerHandle, float] = {}
        self._bridge: Optional[WorkerHandle] = None
        self._reloading = False
        self._stopping = False
        self._killed = False
        self._give_up_at: Optional[float] = None
        self._status: Optional[int] = None
        self._error: Optional[str] = None
        self._first_failure: Optional[int] = None

    # -- running -------------------------------------------------------------

    def run(self) -> int:
        """Supervise until done; return the command's exit status."""
        cfg = self.config
        if cfg.interface == "asgi" and uvicorn_missing():
            logger.error("%s", MISSING_UVICORN)
            return EXIT_BOOT
        try:
            self._open_listeners()
        except OSError as exc:
            logger.error("%s", exc.strerror or exc)
            self._close_listeners()
            return EXIT_KILLED
        try:
            primary = Primary(
                # The uplink's threads run in the primary: a fork would copy the locks they hold.
                start_method=cfg.start_method or ("forkserver" if cfg.uplink else "fork"),
                workers=cfg.workers,
                graceful_timeout=cfg.graceful_timeout,
                timeout=cfg.timeout,
                thread=False,
                uplink=cfg.uplink,
                listen=cfg.bus,
            )
        except (OSError, ValueError, ImportError) as exc:
            logger.error("%s", exc)
            self._close_listeners()
            return EXIT_KILLED
        self.primary = primary
        primary.on_worker_exit = self._on_exit
        primary.on_worker_ready = self._on_ready
        primary.loop.after_turn(lambda: self._tick(time.monotonic()))
        if cfg.reload:
            self._watch_files()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            logger.info(
                "clustersync %s: running %s in %d worker%s (start method %s, restart %s%s)",
                __version__,
                cfg.app,
                cfg.workers,
                "" if cfg.workers == 1 else "s",
                primary.start_method,
                cfg.restart,
                f", uplink {cfg.uplink}" if cfg.uplink else "",
            )
            for index in range(cfg.workers):
                self.slots[index] = Slot(index, initial=True, generation=0)
            for slot in list(self.slots.values()):
                if self._signals:
                    self._dispatch_signals()  # a stop that came during the start wins
                if not self._stopping:
                    self._start(slot)
            primary.loop.run(self._finished)
            status = self._exit_status()
        except BaseException:
            logger.exception("the supervisor failed; stopping the workers")
            status = EXIT_KILLED
        finally:
            try:
                primary.close(timeout=cfg.graceful_timeout)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                self._close_listeners()
                for sock in self._report_socks.values():
                    sock.close()
                self._report_socks.clear()
        if self._error:
            logger.error("%s", self._error)
        else:
            logger.info("exiting with status %d", status)
        return status

    def _exit_status(self) -> int:
        if self._status is not None:
            return self._status
        if self._stopping:
            return EXIT_KILLED if self._killed else EXIT_OK
        return self._first_failure or EXIT_OK

    def _finished(self) -> bool:
        assert self.primary is not None
        if self.primary.workers:
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                for w in self.primary.workers:
                    logger.error("worker %d (pid %d) did not die after SIGKILL; giving up on it", w.index, w.pid)
                return True
            return False
        return self._stopping or all(s.done for s in self.slots.values())

    def _at(self, when: float) -> None:
        """Make sure the loop turns (and so ticks) at ``when``."""
        assert self.primary is not None
        self.primary.loop.call_at(when, lambda: None)

    def _tick(self, now: float) -> None:
        """Timers: kill workers past their deadline, start due restarts, advance a rolling restart."""
        assert self.primary is not None
        for w, deadline in list(self._kill_at.items()):
            if now >= deadline:
                logger.warning(
                    "worker %d (pid %d) did not stop within %.1f s: killing it",
                    w.index,
                    w.pid,
                    self.config.graceful_timeout,
                )
                self._kill(w)
        if self._stopping:
            return
        busy = {w.index for w in self.primary.workers}
        for slot in sorted(self.slots.values(), key=lambda s: s.index):
            if slot.restart_at is not None and slot.restart_at <= now and slot.index not in busy:
                self._start(slot)
                if self._stopping:
                    return
        if self._reloading:
            self._roll()

    # -- sockets -------------------------------------------------------------

    def _open_listeners(self) -> None:
        for i, address in enumerate(self._addresses):
            per_worker = self.config.reuse_port and not address.is_unix
            sock = bind(address, reuse_port=per_worker)
            if address.path is not None:
                self._unix_paths.append(address.path)
            logger.info("listening on %s%s", describe(sock), " (a socket per worker)" if per_worker else "")
            if per_worker:
                # Each worker binds its own; this first bind checks the address and fixes port 0.
                self._addresses[i] = with_port(address, sock.getsockname()[1])
                sock.close()
                self._listeners.append(None)
            else:
                self._listeners.append(sock)

    def _worker_sockets(self) -> Tuple[List[socket.socket], List[socket.socket]]:
        """The sockets for a new worker, and those of them the primary must close once it started."""
        out: List[socket.socket] = []
        own: List[socket.socket] = []
        try:
            for address, shared in zip(self._addresses, self._listeners):
                if shared is not None:
                    out.append(shared)
                else:
                    sock = bind(address, reuse_port=True)
                    own.append(sock)
                    out.append(sock)
        except OSError:
            for sock in own:
                sock.close()
            raise
        return out, own

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            if sock is not None:
                sock.close()
        self._listeners = []
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths = []

    # -- starting and stopping workers ----------------------------------------

    def _fork(self, index: int) -> WorkerHandle:
        assert self.primary is not None
        self.primary.slots = self.target
        listen, own = self._worker_sockets()
        rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.setblocking(False)
        try:
            # The worker starts with these blocked; run_app unblocks them in its main thread only.
            with blocked_signals(WORKER_SIGNALS):
                w = self.primary.fork(run_app, self.spec, listen, tx, index=index)
        except BaseException:
            rx.close()
            raise
        finally:
            tx.close()  # the worker has its copy
            for sock in own:  # the worker has its copy; one left here would queue connections nobody takes
                sock.close()
        self._report_socks[w] = rx
        return w

    def _start(self, slot: Slot) -> None:
        slot.restart_at = None
        try:
            w = self._fork(slot.index)
        except Exception as exc:
            self._failed_before_ready(slot, f"worker {slot.index} could not be started: {exc}", "", 0.0)
            return
        slot.handle = w
        slot.starts += 1
        slot.generation = self.generation

    def _terminate(self, *workers: WorkerHandle) -> None:
        """Stop ``workers`` gracefully; SIGKILL those still there after the graceful timeout.

        The primary stops them together: each gets what the others published
        before now, then a STOP frame on which it SIGTERMs itself.
        """
        assert self.primary is not None
        deadline = time.monotonic() + self.config.graceful_timeout
        for w in workers:
            self._terminated.add(w)
            self._kill_at[w] = deadline
        self._at(deadline)
        self.primary.begin_stop(list(workers), wait=min(self.config.graceful_timeout / 2, 2.0))

    def _kill(self, w: WorkerHandle) -> None:
        self._terminated.add(w)
        self._kill_at.pop(w, None)
        if self._stopping:
            self._killed = True
            if self._give_up_at is None:
                self._give_up_at = time.monotonic() + KILL_WAIT
                self._at(self._give_up_at)
        assert self.primary is not None
        self.primary.kill(w)

    def _begin_stop(self, why: str) -> None:
        """Stop every worker: SIGTERM now, SIGKILL after the graceful timeout."""
        assert self.primary is not None
        if self._stopping:
            return
        self._stopping = True
        workers = self.primary.workers
        if workers:
            logger.info(
                "%s: stopping %d worker%s (SIGKILL after %.1f s)",
                why,
                len(workers),
                "" if len(workers) == 1 else "s",
                self.config.graceful_timeout,
            )
        for slot in self.slots.values():
            slot.restart_at = None
        self._terminate(*workers)

    def _stop_now(self, why: str) -> None:
        assert self.primary is not None
        self._stopping = True
        workers = self.primary.workers
        if workers:
            logger.warning("%s: killing %d worker%s now", why, len(workers), "" if len(workers) == 1 else "s")
        for slot in self.slots.values():
            slot.restart_at = None
        for w in workers:
            self._kill(w)

    def _fail(self, message: str, details: str = "") -> None:
        """The app cannot run: stop, and end with ``message`` as the last line and status 3."""
        if details:
            logger.error("%s", details.rstrip())
        self._error = message
        self._status = EXIT_BOOT
        self._begin_stop("the app failed to boot")

    # -- events from the primary ---------------------------------------------

    def _on_ready(self, w: WorkerHandle) -> None:
        logger.info("worker %d (pid %d) ready", w.index, w.pid)
        slot = self.slots.get(w.index)
        if slot is not None and slot.handle is w:
            slot.boot_failures = 0
            if slot.generation == self.generation:
                slot.rolling = False

    def _on_exit(self, w: WorkerHandle) -> None:
        self._kill_at.pop(w, None)
        asked = w in self._terminated
        self._terminated.discard(w)
        report = self._report_for(w)
        code = w.exitcode
        how = describe_exit(code)
        who = f"worker {w.index} (pid {w.pid})"
        slot = self.slots.get(w.index)
        if slot is not None and slot.handle is w:
            slot.handle = None
        else:
            slot = None  # retired by SIGTTOU, or the rolling restart's stand-in
        if self._stopping:
            quiet = self._status == EXIT_BOOT
            logger.log(logging.DEBUG if quiet else logging.INFO, "%s stopped (%s)", who, how)
            return
        if slot is None:
            logger.info("%s stopped (%s)", who, how)
            if w is self._bridge:
                self._bridge = None
                if not w.ready and not asked:
                    self._abandon_reload(f"the stand-in {who} {how} before it was ready")
            return
        if slot.rolling and asked:
            logger.info("%s stopped for the rolling restart (%s)", who, how)
            slot.restart_at = time.monotonic()
            return
        uptime = time.monotonic() - w.started
        policy = self.config.restart
        if report is not None:
            cause = f"{how} after {report['error']}"
        elif w.kill_reason is not None:
            cause = f"{how} (by the primary: {w.kill_reason})"
        elif code == -signal.SIGKILL and not asked:
            cause = how + OOM_HINT
        else:
            cause = how
        details = f"{who}: {report['details']}" if report is not None and report.get("details") else ""
        if code == 0:
            if policy == "always":
                delay = slot.backoff.next(uptime)
                slot.restart_at = time.monotonic() + delay
                self._at(slot.restart_at)
                logger.info("%s returned; restarting it in %.1f s (--restart always)", who, delay)
            else:
                slot.done = True
                logger.info("%s finished (exit status 0)", who)
            return
        first_start = slot.initial and slot.starts <= 1
        load_error = report is not None and report.get("kind") == "load"
        if not w.ready and (policy != "never" or (load_error and first_start)):
            if load_error:
                message = f"cannot load {self.config.app}: {report['error']}"  # type: ignore[index]
            else:
                message = f"{who} {cause} before it was ready"
            self._failed_before_ready(slot, message, details, uptime)
            return
        if policy == "never":
            slot.done = True
            if self._first_failure is None:
                self._first_failure = exit_status(code)
            logger.error("%s %s; not restarting it (--restart never)%s", who, cause, _tail(details))
            return
        delay = slot.backoff.next(uptime)
        slot.restart_at = time.monotonic() + delay
        self._at(slot.restart_at)
        logger.error("%s %s; restarting it in %.1f s%s", who, cause, delay, _tail(details))

    def _failed_before_ready(self, slot: Slot, message: str, details: str, uptime: float) -> None:
        slot.boot_failures += 1
        if self.config.reload:  # development: wait for the fix (the next change) instead of stopping
            logger.error("%s; waiting for a file to change (--reload)%s", message, _tail(details))
            return
        if slot.initial and slot.starts <= 1:  # the first start: the app cannot boot
            self._fail(message, details)
        elif slot.boot_failures >= MAX_BOOT_FAILURES:
            self._fail(
                f"worker {slot.index} failed {slot.boot_failures} times in a row before it was ready "
                f"(last: {message})",
                details,
            )
        else:
            delay = slot.backoff.next(uptime)
            slot.restart_at = time.monotonic() + delay
            self._at(slot.restart_at)
            logger.error(
                "%s (%d of %d failures before ready); restarting it in %.1f s%s",
                message,
                slot.boot_failures,
                MAX_BOOT_FAILURES,
                delay,
                _tail(details),
            )

    def _report_for(self, w: WorkerHandle) -> Optional[Dict[str, Any]]:
        """What the worker ``w`` reported before exiting, if anything; a report about another pid is refused."""
        sock = self._report_socks.pop(w, None)
        if sock is None:
            return None
        report = None
        try:
            while True:
                try:
                    data = sock.recv(MAX_REPORT + 1024)
                except OSError:  # BlockingIOError: nothing more
                    break
                try:
                    message = json.loads(data)
                    pid = message["pid"]
                    if not isinstance(message, dict):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    logger.warning("worker %d (pid %d) sent a report that does not parse: ignored", w.index, w.pid)
                    continue
                if pid != w.pid:
                    logger.warning(
                        "worker %d (pid %d) sent a report about pid %r: ignored (a worker reports only on itself)",
                        w.index,
                        w.pid,
                        pid,
                    )
                    continue
                report = message
        finally:
            sock.close()
        return report

    # -- rolling restart -------------------------------------------------------

    def _roll(self) -> None:
        """Replace the workers older than the last SIGHUP, one at a time, never leaving none ready."""
        live = [s for s in sorted(self.slots.values(), key=lambda s: s.index) if not s.done]
        if any(s.rolling for s in live):
            return  # a replacement is on its way
        stale = []
        for s in live:
            if s.generation < self.generation:
                if s.handle is None:
                    s.generation = self.generation  # waiting to restart: it will start with the new code
                else:
                    stale.append(s)
        if not stale:
            self._end_reload("rolling restart done")
            return
        slot = stale[0]
        bridge = self._bridge
        others = any(s is not slot and s.handle is not None and s.handle.ready for s in live)
        if not others and not (bridge is not None and bridge.ready):
            if bridge is None:
                self._start_bridge()
            return
        assert slot.handle is not None
        slot.rolling = True
        logger.info("rolling restart: replacing worker %d (pid %d)", slot.index, slot.handle.pid)
        self._terminate(slot.handle)

    def _start_bridge(self) -> None:
        """Start a stand-in worker at the next free index, so a lone worker can be replaced."""
        assert self.primary is not None
        index = max([w.index for w in self.primary.workers] + list(self.slots)) + 1
        try:
            self._bridge = self._fork(index)
        except Exception as exc:
            self._abandon_reload(f"the stand-in worker could not be started: {exc}")
            return
        logger.info(
            "rolling restart: worker %d (pid %d) stands in while the only worker is replaced",
            index,
            self._bridge.pid,
        )

    def _end_reload(self, message: str) -> None:
        self._reloading = False
        if self._bridge is not None and self._bridge not in self._terminated:
            self._terminate(self._bridge)
        logger.info("%s", message)
        self._signals.extend(self._deferred)  # SIGTTIN/SIGTTOU that came in meanwhile
        self._deferred = []

    def _abandon_reload(self, why: str) -> None:
        for s in self.slots.values():
            s.generation = self.generation
        self._end_reload(f"rolling restart abandoned: {why}; the running workers keep their code")

    # -- --reload ------------------------------------------------------------------

    def _watch_files(self) -> None:
        """--reload: look at the app's .py files every RELOAD_POLL seconds, on the loop."""
        assert self.primary is not None
        self._watcher = Watcher(self.config.app_dir or os.getcwd())
        logger.info("--reload: watching %d .py files under %s", len(self._watcher), self._watcher.root)
        self.primary.loop.call_later(RELOAD_POLL, self._poll_files)

    def _poll_files(self) -> None:
        assert self.primary is not None and self._watcher is not None
        if self._stopping:
            return
        changed = self._watcher.changed()
        if changed:
            logger.info("--reload: %s: rolling restart", describe_changes(self._watcher.root, changed))
            now = time.monotonic()
            for slot in self.slots.values():
                if slot.handle is None and slot.restart_at is None and not slot.done:
                    slot.restart_at = now  # it failed before ready and waits for a fix: try the new code
            self.generation += 1
            self._reloading = True
        self.primary.loop.call_later(RELOAD_POLL, self._poll_files)

    # -- signals -----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The handler: queue the signal, wake the loop. Nothing else happens in a handler."""
        if os.getpid() != self._pid:
            return  # a worker forked from here (cannot happen: it starts with these signals blocked)
        if len(self._signals) < 16:
            self._signals.append(signum)
        if self.primary is not None:
            self.primary.loop.call_soon(self._dispatch_signals)

    def _dispatch_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            getattr(self, "handle_" + SIGNALS[signal.Signals(signum)])()

    def handle_term(self) -> None:
        """SIGTERM: graceful stop."""
        self._begin_stop("SIGTERM")

    def handle_int(self) -> None:
        """SIGINT: graceful stop; a second one stops at once."""
        if self._stopping:
            self._stop_now("second SIGINT")
        else:
            self._begin_stop("SIGINT (press Ctrl-C again to stop at once)")

    def handle_quit(self) -> None:
        """SIGQUIT: stop at once."""
        self._stop_now("SIGQUIT")

    def handle_hup(self) -> None:
        """SIGHUP: rolling restart (new workers import the app afresh)."""
        if self._stopping:
            return
        self.generation += 1
        self._reloading = True
        logger.info("SIGHUP: rolling restart of %d worker%s", self.target, "" if self.target == 1 else "s")

    def handle_ttin(self) -> None:
        """SIGTTIN: one worker more."""
        if self._stopping:
            return
        if self._reloading:
            self._deferred.append(signal.SIGTTIN)
            return
        if self.target >= MAX_RUN_WORKERS:
            logger.warning("SIGTTIN: already at the most workers there can be (%d)", MAX_RUN_WORKERS)
            return
        slot = Slot(self.target, initial=False, generation=self.generation)
        self.target += 1
        self.slots[slot.index] = slot
        slot.restart_at = time.monotonic()
        logger.info("SIGTTIN: one worker more, now %d", self.target)

    def handle_ttou(self) -> None:
        """SIGTTOU: one worker fewer (the highest index goes)."""
        if self._stopping:
            return
        if self._reloading:
            self._deferred.append(signal.SIGTTOU)
            return
        if self.target <= 1:
            logger.warning("SIGTTOU: already down to one worker")
            return
        self.target -= 1
        slot = self.slots.pop(self.target)
        logger.info("SIGTTOU: one worker fewer, now %d", self.target)
        if slot.handle is not None:
            self._terminate(slot.handle)


_supervisors: "weakref.WeakSet[Supervisor]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A worker forked from here keeps only its own report socket: close the others' ends."""
    for supervisor in list(_supervisors):
        for sock in supervisor._report_socks.values():
            sock.close()
        supervisor._report_socks = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def _tail(details: str) -> str:
    """A traceback appended to a log message, on lines of its own."""
    return "\n" + details.rstrip() if details else ""
