"""The primary: starts workers, relays their frames, watches them live, and stops them.

The relay runs on a :class:`~clustersync.relay.loop.Loop`. By default the
primary starts that loop on a thread of its own, so it relays from the moment
:func:`setup_primary_cluster` returns, whatever the calling thread does next;
``clustersync run`` runs the same loop on its main thread instead
(``thread=False``). Every public method is safe from any thread: it runs on
the loop. Routing is the :class:`~clustersync.relay.router.Router`'s; this
module owns processes, liveness and the stop protocol.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util  # noqa: F401  its exit handler (join every child) must run after ours
import os
import signal
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from .._log import logger
from ..message import DEFAULT_MAX_MESSAGE, UPLINK_WORKER
from .loop import Loop, start_thread
from .router import Peer, Router
from .wire import FIRST_PEER, MAX_WORKERS, PING, PONG, READY, STATS, STOP, pack_frame
from .worker import bootstrap, current_worker

if TYPE_CHECKING:
    from .bus import BusListener
    from .uplink import Uplink, UplinkBridge

__all__ = ["Primary", "WorkerHandle", "setup_primary_cluster", "DEFAULT_START_METHOD"]

DEFAULT_MAX_BUFFER = 32 * 1024 * 1024
DEFAULT_OUT_LIMIT = 32 * 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
#: The library's start method: the relay thread runs beside the caller's threads, and a
#: fork() from a process with threads copies whatever locks they hold at that moment.
#: The forkserver starts every worker from a clean single-threaded process instead.
DEFAULT_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class WorkerHandle(Peer):
    """A worker as the primary sees it: ``index``, ``pid``, ``process``, state and relay counters."""

    def __init__(self, index: int, process: Any, sock: socket.socket) -> None:
        super().__init__(index, sock)
        self.process = process
        self._pid: int = process.pid
        self.started = time.monotonic()
        self.ready = False
        self.pong = 0  # the highest ping number this worker answered
        self.reaped = False
        self._exitcode: Optional[int] = None
        #: Why the primary itself killed this worker (liveness, a malformed frame), or None.
        self.kill_reason: Optional[str] = None
        #: What the loop watches for the process's end (a pidfd where there is one).
        self.exit_fd: int = process.sentinel

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._pid

    @property
    def exitcode(self) -> Optional[int]:
        """The process's exit code (negative: killed by that signal), None while it runs."""
        if self.reaped:
            return self._exitcode
        code: Optional[int] = self.process.exitcode
        return code

    def is_alive(self) -> bool:
        """True while the worker process runs."""
        return not self.reaped and bool(self.process.is_alive())

    def stats(self) -> Dict[str, Any]:
        """This worker's relay counters."""
        out = self.counters()
        out["pid"] = self._pid
        return out

    def __repr__(self) -> str:
        return f"<WorkerHandle index={self.index} pid={self._pid} exitcode={self.exitcode}>"


class Primary:
    """Starts workers, relays their frames, and stops them.

    Use :func:`setup_primary_cluster` to get the process's one primary.
    ``start_method``: ``"fork"``, ``"spawn"`` or ``"forkserver"`` (default
    :data:`DEFAULT_START_METHOD`). ``workers`` is the slot count workers see
    in ``current_worker().count`` (default: the number started so far).
    ``max_buffer`` bounds each worker's output buffer in the primary;
    ``max_message`` the largest message; ``out_limit`` each worker's own
    outgoing buffer, where ``publish`` waits up to ``publish_block`` seconds
    for room before dropping. A worker whose buffer passes half of
    ``max_buffer`` pauses the workers on its channels (flow control) until it
    is back under a quarter; one that stays behind ``stall_timeout`` seconds
    is declared stalled and the others go on without it. With ``timeout``, a
    worker that has not been heard from for that many seconds is killed. ``thread=False``: the caller
    runs :attr:`loop` itself (``clustersync run`` does). ``uplink``: a
    backplane URL (``redis://``, ``postgresql://``, ``nats://``...) or an
    :func:`~clustersync.relay.uplink.uplink`; the primary then bridges every
    channel between its workers and that backplane, over one connection
    (see docs/beyond-one-host.md). ``listen``: a Unix socket path where
    processes this primary did not start join its relay (mode 0600; the same
    user, or ``allow_uids``/``allow_gids``, see docs/web-apps.md).
    """

    def __init__(
        self,
        *,
        start_method: Optional[str] = None,
        workers: Optional[int] = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_message: int = DEFAULT_MAX_MESSAGE,
        out_limit: int = DEFAULT_OUT_LIMIT,
        publish_block: float = 1.0,
        graceful_timeout: float = 10.0,
        timeout: Optional[float] = None,
        stall_timeout: float = 0.5,
        thread: bool = True,
        uplink: "Union[str, Uplink, None]" = None,
        listen: Optional[str] = None,
        allow_uids: Sequence[int] = (),
        allow_gids: Sequence[int] = (),
    ) -> None:
        if start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"start_method must be 'fork', 'spawn' or 'forkserver', not {start_method!r}")
        if workers is not None and not (isinstance(workers, int) and 0 < workers <= MAX_WORKERS):
            raise ValueError(f"workers must be an int from 1 to {MAX_WORKERS}")
        for name, value in (("max_buffer", max_buffer), ("max_message", max_message), ("out_limit", out_limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds, or None")
        if not graceful_timeout >= 0:
            raise ValueError("graceful_timeout must be a number of seconds, 0 or more")
        if not stall_timeout > 0:
            raise ValueError("stall_timeout must be a positive number of seconds")
        spec = None
        if uplink is not None:
            from .uplink import as_uplink

            spec = as_uplink(uplink)  # a bad URL or a missing client library raises before anything starts
        self._ctx = multiprocessing.get_context(start_method or DEFAULT_START_METHOD)
        self.start_method: str = self._ctx.get_start_method()
        self.slots = workers
        self.max_buffer = max_buffer
        self.max_message = max_message
        self.graceful_timeout = graceful_timeout
        #: Liveness: a worker silent for this long (no frame, no answer to a ping) is killed.
        self.timeout = timeout
        self._pings = 0
        self._config = {
            "max_message": max_message,
            "out_limit": out_limit,
            "publish_block": publish_block,
            "flush_timeout": 5.0,
            "start_method": self.start_method,
        }
        # Workers (and a forkserver) start with the creating thread's signal mask, not the relay thread's.
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        #: The loop the relay runs on.
        self.loop = Loop()
        self.router = Router(
            self.loop,
            max_buffer=max_buffer,
            max_message=max_message,
            on_control=self._on_control,
            on_broken=self._on_broken,
            stall_timeout=stall_timeout,
        )
        self._workers: Dict[int, WorkerHandle] = {}
        self._stop_groups: List[Any] = []  # (ping numbers asked, deadline): stops waiting for answers
        self._changed = threading.Condition()
        self._closed = False
        self._forking: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self.exited: List[WorkerHandle] = []
        #: Called on the loop with each worker that exited (after it was reaped).
        self.on_worker_exit: Optional[Callable[[WorkerHandle], None]] = None
        #: Called on the loop when a worker sends READY.
        self.on_worker_ready: Optional[Callable[[WorkerHandle], None]] = None
        #: The bus, when the primary listens on a Unix socket.
        self.bus: "Optional[BusListener]" = None
        if listen is not None:
            from .bus import BusListener

            self.router.on_gone = self._peer_gone
            try:
                self.bus = BusListener(
                    self.loop, self.router, listen,
                    {"max_message": max_message, "out_limit": out_limit, "publish_block": publish_block},
                    allow_uids, allow_gids,
                )
            except BaseException:
                self.loop.close()  # nothing else was started: release the loop's descriptors
                raise
        #: The host uplink, when there is one.
        self.uplink: "Optional[UplinkBridge]" = None
        if spec is not None:
            from .uplink import UplinkBridge

            here, there = socket.socketpair()
            self._uplink_peer = Peer(UPLINK_WORKER, here)
            self.router.on_routes = self._routes_changed
            self.router.add(self._uplink_peer)
            self.uplink = UplinkBridge(spec, there, max_message, out_limit)
            self.uplink.session.on_subscribed = self._uplink_subscribed
        _live_primaries.add(self)
        if timeout is not None:
            self.loop.call_soon(self._check_liveness)
        if thread:
            started = threading.Event()
            self._thread = start_thread(self._run_thread, started, name="clustersync-relay")
            started.wait()
            atexit.register(_close_at_exit, weakref.ref(self))

    def _run_thread(self, started: threading.Event) -> None:
        self.loop.owner = threading.get_ident()
        started.set()
        try:
            self.loop.run()
        except BaseException:
            logger.exception("the relay's loop failed; the primary stops relaying")
            raise
        finally:
            if not self._closed:  # it ended without close(): calls from other threads must not wait for it
                self.loop.close()

    # -- workers -----------------------------------------------------------

    @property
    def workers(self) -> List[WorkerHandle]:
        """The running workers, by index."""
        if self._closed:
            return []
        result: List[WorkerHandle] = self.loop.call(lambda: [self._workers[i] for i in sorted(self._workers)])
        return result

    def fork(self, target: Callable[..., Any], *args: Any, index: Optional[int] = None) -> WorkerHandle:
        """Start a worker running ``target(*args)``; return its handle.

        The worker gets the lowest free index unless ``index`` is given.
        With ``spawn``/``forkserver``, ``target`` and ``args`` must pickle.
        Safe from any thread.
        """
        if self._closed:
            raise RuntimeError("fork() on a closed primary")
        if not callable(target):
            raise TypeError("target must be callable")
        handle: WorkerHandle = self.loop.call(lambda: self._fork(target, args, index))
        return handle

    def _fork(self, target: Callable[..., Any], args: Any, index: Optional[int]) -> WorkerHandle:
        if self._closed:
            raise RuntimeError("fork() on a closed primary")
        if index is None:
            index = 0
            while index in self._workers:
                index += 1
        elif not isinstance(index, int) or isinstance(index, bool):
            raise TypeError("index must be an int")
        elif index in self._workers:
            raise ValueError(f"worker index {index} is in use")
        if not 0 <= index < FIRST_PEER:
            raise ValueError(f"worker index must be from 0 to {FIRST_PEER - 1}")
        count = self.slots if self.slots is not None else max(len(self._workers), index) + 1
        parent, child = socket.socketpair()
        for sock in (parent, child):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=bootstrap,
            args=(target, args, child, index, count, self._config),
            name=f"clustersync-worker-{index}",
        )
        self._forking = parent  # a forked child must not keep the primary's end open
        held = signal.pthread_sigmask(signal.SIG_SETMASK, self._mask) if self._thread is not None else None
        try:
            process.start()
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self._forking = None
            child.close()
        w = WorkerHandle(index, process, parent)
        self._workers[index] = w
        self.router.add(w)
        w.exit_fd = _watch_exit(process)
        self.loop.register(w.exit_fd, lambda mask: self._reap(w))
        logger.debug("worker %d started (pid %d)", index, w.pid)
        return w

    # -- control frames and liveness -------------------------------------------

    def _routes_changed(self, chan: bytes) -> None:
        """The uplink carries a channel while a worker of this host is on it.

        While the uplink subscribes a new channel on the backplane (and the
        backplane is up), the relay holds the ACKs that make hubs on it ready,
        for at most ``ping_timeout``: a hub that is ready hears other hosts.
        """
        bridge = self.uplink
        if bridge is None:
            return
        subs = self.router.routes.get(chan, {})
        on = any(p.index != UPLINK_WORKER for p in subs)
        if bridge.set_channel(chan, on) and on and bridge.session.up:
            self.router.holding.add(chan)
            self.loop.call_later(bridge.session.options.ping_timeout, lambda: self.router.release(chan))
        elif not on:
            self.router.release(chan)

    def _uplink_subscribed(self, names: List[str]) -> None:
        """The backplane has these channels: release their ACKs (called on the uplink's reader thread)."""
        for name in names:
            self.loop.call_soon(functools.partial(self.router.release, name.encode()))

    def _peer_gone(self, peer: Peer) -> None:
        if self.bus is not None:
            self.bus.gone(peer)

    def _on_control(self, peer: Peer, kind: int, chan: bytes, count: int) -> None:
        if kind == STATS:
            if self.bus is not None:
                self.bus.answer_stats(peer, count, self._stats())
            return
        if not isinstance(peer, WorkerHandle):
            return  # the uplink's or a bus peer's hello, or a READY: workers only
        w = peer
        if kind == READY:
            if not w.ready:
                w.ready = True
                if self.on_worker_ready is not None:
                    self.on_worker_ready(w)
        elif kind == PONG:
            w.pong = max(w.pong, count)  # last_seen was updated by the read
            if self._stop_groups:
                self._advance_stops()

    def _on_broken(self, peer: Peer, reason: str) -> None:
        if not isinstance(peer, WorkerHandle):
            what = "the uplink" if peer.index == UPLINK_WORKER else f"bus peer {peer.index} (pid {peer.pid})"
            logger.error("%s sent %s: it is cut off; the others never see it", what, reason)
            return
        w = peer
        self._kill(w, "malformed frame")  # before the log line: it must not see its pipe close and exit first
        logger.error(
            "worker %d (pid %d) sent %s: it is cut off and stopped; the other workers never see it",
            w.index,
            w.pid,
            reason,
        )

    def ping(self, w: WorkerHandle) -> int:
        """Send ``w`` a ping; return its number. Its answer comes after everything ``w`` published before."""
        self._pings += 1
        self.router.enqueue_control(w, pack_frame(PING, b"", 0xFFFF, w.index, count=self._pings))
        return self._pings

    def _check_liveness(self) -> None:
        """Ping the workers every timeout/4; kill one silent for longer than the timeout."""
        timeout = self.timeout
        if timeout is None or self._closed:
            return
        now = time.monotonic()
        self.loop.call_at(now + timeout / 4, self._check_liveness)
        for w in list(self._workers.values()):
            if not w.connected or not w.bytes_in:
                continue  # not booted yet: the clock starts with the worker's hello
            silent = now - w.last_seen
            if silent > timeout:
                logger.error(
                    "worker %d (pid %d) did not answer for %.1f s (timeout %.1f s): killing it",
                    w.index,
                    w.pid,
                    silent,
                    timeout,
                )
                self._kill(w, f"silent for over {timeout:g} s")
            else:
                self.ping(w)

    # -- failures and exits ------------------------------------------------

    def kill(self, w: WorkerHandle, reason: Optional[str] = None) -> None:
        """SIGKILL ``w`` (``reason``, if given, is kept for whoever reports its exit). Safe from any thread."""
        self.loop.call(lambda: self._kill(w, reason))

    def _kill(self, w: WorkerHandle, reason: Optional[str]) -> None:
        """The one kill path: cut ``w`` off and SIGKILL it with its process group."""
        if not w.reaped:  # first: cut off, it could see its pipe close and exit on its own
            _signal_group(w.pid, signal.SIGKILL)
        if reason is not None:
            w.kill_reason = reason
            self.router.disconnect(w)

    def _terminate(self, w: WorkerHandle) -> None:
        if not w.reaped:
            try:
                os.kill(w.pid, signal.SIGTERM)
            except OSError:  # already gone
                pass

    def _reap(self, w: WorkerHandle) -> None:
        """The process ended: route what it wrote before exiting, stop what it left behind, forget it.

        The end is seen on a pidfd (Linux), so a child the worker forked,
        which holds copies of the worker's descriptors, cannot hide it. What
        is left in the worker's process group (its own children) is killed
        before the worker is reaped, while its pid cannot have been reused.
        """
        self.router.drain(w)
        self.router.disconnect(w)
        _signal_group(w.pid, signal.SIGKILL, leader=False)
        self._forget_exit_fd(w)
        w.process.join(1.0)
        w._exitcode = w.process.exitcode
        if w._exitcode is not None:
            w.reaped = True
            w.process.close()  # release its sentinel: restarts must not accumulate descriptors
        if self._workers.get(w.index) is w:
            del self._workers[w.index]
        self.exited.append(w)
        del self.exited[:-256]
        logger.debug("worker %d (pid %d) exited with %s", w.index, w.pid, w.exitcode)
        with self._changed:
            self._changed.notify_all()
        if self.on_worker_exit is not None:
            self.on_worker_exit(w)

    # -- stopping ----------------------------------------------------------

    def begin_stop(self, workers: List[WorkerHandle], wait: float = 2.0) -> None:
        """Ask ``workers`` to stop once they have everything published before now. Returns at once.

        Each gets a ping; its answer follows everything it published before.
        Once all have answered (or ``wait`` seconds passed), each gets a STOP
        frame behind everything routed to it, and SIGTERMs itself when it
        reads it. A worker whose pipe is gone gets SIGTERM directly.
        """
        self.loop.call(lambda: self._begin_stop(workers, wait))

    def _begin_stop(self, workers: List[WorkerHandle], wait: float) -> None:
        asked: Dict[WorkerHandle, int] = {}
        for w in workers:
            if w.connected:
                asked[w] = self.ping(w)
            else:
                self._terminate(w)
        if asked:
            deadline = time.monotonic() + wait
            self._stop_groups.append((asked, deadline))
            self.loop.call_at(deadline, self._advance_stops)
            self._advance_stops()
            # Called after a turn's flush (the runner's tick), the pings would wait for the next turn: turn now.
            self.loop.wake()

    def _advance_stops(self) -> None:
        now = time.monotonic()
        waiting = []
        for asked, deadline in self._stop_groups:
            if now < deadline and not all(w.pong >= n or not w.connected for w, n in asked.items()):
                waiting.append((asked, deadline))
                continue
            for w in asked:
                if w.connected:
                    self.router.enqueue_control(w, pack_frame(STOP, b"", 0xFFFF, w.index))
                    self.router.flush(w)
                if not w.connected:
                    self._terminate(w)
        self._stop_groups = waiting

    def _wait_until(self, done: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Wait until ``done()`` (checked on the loop's side) or ``timeout``; run the loop if it is ours."""
        if self.loop.on_loop():
            return self.loop.run(done, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._thread is not None and not self._thread.is_alive():
                    return done()
                self._changed.wait(0.5 if left is None else min(left, 0.5))
        return True

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every worker has exited; True if they all did within ``timeout``.

        Only waits: the relay runs on its own thread whether or not anyone joins.
        """
        return self._wait_until(lambda: not self._workers, timeout)

    def stop_workers(self, timeout: Optional[float] = None) -> bool:
        """Stop every worker (:meth:`begin_stop`), wait for them, SIGKILL after ``timeout``.

        Returns True if all exited before the timeout.
        """
        graceful = self.graceful_timeout if timeout is None else timeout
        self.begin_stop(self.workers, wait=min(graceful / 2, 5.0))
        clean = self._wait_until(lambda: not self._workers, graceful)
        if not clean:
            for w in self.workers:
                logger.warning("worker %d (pid %d) did not stop in %.1f s: killing it", w.index, w.pid, graceful)
                self.kill(w)
            self._wait_until(lambda: not self._workers, 5.0)
        return clean

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the workers (gracefully, SIGKILL after ``timeout``), stop relaying, release everything."""
        if self._closed:
            return
        try:
            self.stop_workers(timeout)
        finally:
            bridge = self.uplink
            if bridge is not None:
                bridge.close()  # after the workers: what they published last still leaves
            if self.loop.closed:
                self._shut()
            else:
                self.loop.call(self._shut)
            thread = self._thread
            if thread is not None:
                self.loop.stop()
                if thread is not threading.current_thread():
                    thread.join(5.0)
            self.loop.close()
            _live_primaries.discard(self)
            global _primary
            if _primary is self:
                _primary = None

    def _forget_exit_fd(self, w: WorkerHandle) -> None:
        self.loop.unregister(w.exit_fd)
        if w.exit_fd != w.process.sentinel:  # a pidfd of ours
            try:
                os.close(w.exit_fd)
            except OSError:
                pass
        w.exit_fd = w.process.sentinel

    def _shut(self) -> None:
        self._closed = True
        if self.bus is not None:
            self.bus.close()
        if self.uplink is not None:
            self.router.disconnect(self._uplink_peer)
        for w in list(self._workers.values()):
            self.router.disconnect(w)
            self._forget_exit_fd(w)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def stats(self) -> Dict[str, Any]:
        """Relay counters: per worker (running and recently exited) and totals. Safe from any thread."""
        if self._closed:
            return self._stats()
        result: Dict[str, Any] = self.loop.call(self._stats)
        return result

    def _stats(self) -> Dict[str, Any]:
        running = [self._workers[i] for i in sorted(self._workers)]
        return {
            "workers": [w.stats() for w in running],
            "exited": [w.stats() for w in self.exited[-16:]],
            "dropped": sum(w.dropped for w in running) + sum(w.dropped for w in self.exited),
            "buffered": sum(w.out_bytes for w in running),
            "unroutable": self.router.unroutable,
            "malformed": self.router.malformed,
            "stalls": self.router.stalls,
            "channels": self.router.channels(),
            "uplink": self.uplink.stats() if self.uplink is not None else None,
            "bus": self.bus.stats() if self.bus is not None else None,
        }

    def __enter__(self) -> "Primary":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watch_exit(process: Any) -> int:
    """A descriptor that becomes readable when ``process`` ends: a pidfd on Linux, else its sentinel.

    multiprocessing's sentinel is a pipe the worker's own children inherit,
    so it stays open while any of them lives; a pidfd does not.
    """
    pidfd_open = getattr(os, "pidfd_open", None)  # Linux 5.3+, Python 3.9+
    if pidfd_open is not None:
        try:
            fd: int = pidfd_open(process.pid)
            return fd
        except OSError:  # an older kernel, or the process is already reaped
            pass
    sentinel: int = process.sentinel
    return sentinel


def _signal_group(pid: int, sig: int, leader: bool = True) -> None:
    """Send ``sig`` to the process group a worker leads (its children too); ``leader``: or to the worker alone."""
    try:
        os.killpg(pid, sig)
        return
    except OSError:  # no such group: the worker has not made it yet, or it is empty
        pass
    if leader:
        try:
            os.kill(pid, sig)
        except OSError:  # already gone
            pass


_primary: Optional[Primary] = None
_live_primaries: "weakref.WeakSet[Primary]" = weakref.WeakSet()


def _close_at_exit(ref: "weakref.ReferenceType[Primary]") -> None:
    primary = ref()
    if primary is not None and not primary.closed:
        primary.close()


def _after_fork_in_child() -> None:
    """A forked child is not the primary: close the primary's descriptors there."""
    global _primary
    _primary = None
    for p in list(_live_primaries):
        # Every peer's connection (workers, the bus's peers, the uplink) and the bus's socket: a child
        # holding a copy would keep a peer the relay cut off from ever seeing its end.
        socks = [peer.sock for peer in p.router.peers.values()] + [w.sock for w in p._workers.values()]
        if p.bus is not None:
            socks.append(p.bus.sock)
        if p._forking is not None:
            socks.append(p._forking)
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass
        for w in p._workers.values():
            if w.exit_fd != w.process.sentinel:
                try:
                    os.close(w.exit_fd)
                except OSError:
                    pass
        p._workers = {}
        p._closed = True
        p.loop.forget_after_fork()
        _live_primaries.discard(p)


os.register_at_fork(after_in_child=_after_fork_in_child)


def setup_primary_cluster(**options: Any) -> Optional[Primary]:
    """Return this process's primary, relaying from now on, creating it on the first call.

    In a worker it does nothing and returns None. Options (first call only):
    ``start_method`` ("fork", "spawn", "forkserver"; default "forkserver",
    see docs/drivers.md), ``workers``, ``max_buffer`` (32 MiB), ``max_message``
    (8 MiB), ``out_limit`` (32 MiB), ``publish_block`` (1.0 s),
    ``graceful_timeout`` (10 s), ``timeout`` (None), ``stall_timeout`` (0.5 s),
    ``uplink`` (None: a backplane URL bridges every channel to other hosts),
    ``listen`` (None: a Unix socket path where other processes join the
    relay), ``allow_uids``/``allow_gids`` (who else may join).
    The primary is closed at
    interpreter exit: its workers are stopped gracefully.
    """
    global _primary
    if current_worker() is not None:
        return None
    if _primary is None or _primary.closed:
        _primary = Primary(**options)
    return _primary

