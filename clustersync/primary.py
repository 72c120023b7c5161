"""The primary: forks workers and relays frames between them.

One thread runs the loop (a selector over the workers' sockets, their
process sentinels and a wake-up pipe). Frames are routed on their header and
channel alone; payloads are never decoded. Each worker has a bounded output
buffer: when it is full, frames for that worker are dropped and counted,
and the others never wait.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import selectors
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional

from ._log import RateLimitedLog, logger
from .hub import DEFAULT_MAX_MESSAGE
from .wire import (
    ACK,
    BROADCAST,
    DATA,
    HEADER,
    HEADER_SIZE,
    KINDS,
    MAX_WORKERS,
    PING,
    PONG,
    READY,
    STOP,
    SUB,
    UNSUB,
    pack_frame,
)
from .worker import bootstrap, current_worker

__all__ = ["Primary", "WorkerHandle", "setup_primary_cluster"]

DEFAULT_MAX_BUFFER = 32 * 1024 * 1024
DEFAULT_OUT_LIMIT = 32 * 1024 * 1024
READ_SIZE = 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
IOV_MAX = 512

_ratelimited = RateLimitedLog()


class WorkerHandle:
    """A worker as the primary sees it: ``index``, ``pid``, ``process`` and counters."""

    def __init__(self, index: int, process: Any, sock: socket.socket) -> None:
        self.index = index
        self.process = process
        self.sock = sock
        self.pid: int = process.pid
        self.started = time.monotonic()
        self.connected = True
        self.ready = False
        self.inbuf = bytearray()
        self.out: List[Any] = []
        self.out_bytes = 0
        self.want_write = False
        self.dirty = False
        self.channels: Dict[bytes, int] = {}
        self.frames_in = 0
        self.frames_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0
        self.dropped_frames = 0
        self.last_seen = self.started
        self.pong = 0  # the highest ping number this worker answered
        self.reaped = False
        self._exitcode: Optional[int] = None
        #: Why the primary itself killed this worker (liveness, a malformed frame), or None.
        self.kill_reason: Optional[str] = None

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
        return {
            "index": self.index,
            "pid": self.pid,
            "alive": self.connected,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "buffered": self.out_bytes,
            "dropped": self.dropped,
            "dropped_frames": self.dropped_frames,
        }

    def __repr__(self) -> str:
        return f"<WorkerHandle index={self.index} pid={self.pid} exitcode={self.exitcode}>"


class Primary:
    """Forks workers, relays their frames, and stops them.

    Use :func:`setup_primary_cluster` to get the process's one primary.
    ``workers`` is the slot count workers see in ``current_worker().count``
    (default: the number forked so far). ``max_buffer`` bounds each worker's
    output buffer in the primary; ``max_message`` the largest message;
    ``out_limit`` each worker's own outgoing buffer, where ``publish`` waits
    up to ``publish_block`` seconds for room before dropping. With
    ``timeout``, a worker that has not been heard from for that many seconds
    (it answers pings from its I/O thread, so only a stopped process or one
    whose GIL is held stays silent) is killed.
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
    ) -> None:
        if start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"start_method must be 'fork', 'spawn' or 'forkserver', not {start_method!r}")
        if workers is not None and not (isinstance(workers, int) and 0 < workers <= MAX_WORKERS):
            raise ValueError(f"workers must be an int from 1 to {MAX_WORKERS}")
        for name, value in (("max_buffer", max_buffer), ("max_message", max_message), ("out_limit", out_limit)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int")
        self._ctx = multiprocessing.get_context(start_method)
        self.start_method: str = self._ctx.get_start_method()
        self.slots = workers
        self.max_buffer = max_buffer
        self.max_message = max_message
        self.graceful_timeout = graceful_timeout
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds, or None")
        #: Liveness: a worker silent for this long (no frame, no answer to a ping) is killed.
        self.timeout = timeout
        self._next_liveness = 0.0
        self._pings = 0
        self._stop_groups: List[Any] = []  # (ping numbers asked, deadline): stops waiting for answers
        self._max_body = max_message + 256 * 1024 + 2 * 65535
        self._config = {
            "max_message": max_message,
            "out_limit": out_limit,
            "publish_block": publish_block,
            "flush_timeout": 5.0,
        }
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._calls: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._workers: Dict[int, WorkerHandle] = {}
        self._routes: Dict[bytes, Dict[WorkerHandle, int]] = {}
        self._dirty: List[WorkerHandle] = []
        self._loop_thread: Optional[int] = None
        self._closed = False
        self._forking: Optional[socket.socket] = None
        self.exited: List[WorkerHandle] = []
        self.unroutable = 0
        #: Called on the loop thread with each worker that exited (after it was reaped).
        self.on_worker_exit: Optional[Callable[[WorkerHandle], None]] = None
        #: Called on the loop thread when a worker sends READY.
        self.on_worker_ready: Optional[Callable[[WorkerHandle], None]] = None
        _live_primaries.add(self)

    # -- workers -----------------------------------------------------------

    @property
    def workers(self) -> List[WorkerHandle]:
        """The running workers, by index."""
        return [self._workers[i] for i in sorted(self._workers)]

    def fork(self, target: Callable[..., Any], *args: Any, index: Optional[int] = None) -> WorkerHandle:
        """Start a worker running ``target(*args)``; return its handle.

        The worker gets the lowest free index unless ``index`` is given.
        With ``spawn``/``forkserver``, ``target`` and ``args`` must pickle.
        """
        if self._closed:
            raise RuntimeError("fork() on a closed primary")
        if not callable(target):
            raise TypeError("target must be callable")
        handle: WorkerHandle = self._in_loop(lambda: self._fork(target, args, index))
        return handle

    def _fork(self, target: Callable[..., Any], args: Any, index: Optional[int]) -> WorkerHandle:
        if index is None:
            index = 0
            while index in self._workers:
                index += 1
        elif index in self._workers:
            raise ValueError(f"worker index {index} is in use")
        if not 0 <= index < MAX_WORKERS:
            raise ValueError(f"worker index must be from 0 to {MAX_WORKERS - 1}")
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
        try:
            process.start()
        finally:
            self._forking = None
            child.close()
        parent.setblocking(False)
        w = WorkerHandle(index, process, parent)
        self._workers[index] = w
        self._sel.register(parent, selectors.EVENT_READ, ("io", w))
        self._sel.register(process.sentinel, selectors.EVENT_READ, ("exit", w))
        logger.debug("worker %d started (pid %d)", index, w.pid)
        return w

    # -- the loop ----------------------------------------------------------

    def _in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread (here, if the loop is not running elsewhere)."""
        owner = self._loop_thread
        if owner is None or owner == threading.get_ident():
            return fn()
        fut: "Future[Any]" = Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self._calls.put(call)
        self.wake()
        return fut.result()

    def wake(self) -> None:
        """Wake the loop (safe from any thread and from signal handlers)."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def run(self, until: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Relay until ``until()`` is true or ``timeout`` passes; return ``until()``."""
        if self._loop_thread is not None and self._loop_thread != threading.get_ident():
            raise RuntimeError("the primary's loop is already running on another thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        outer = self._loop_thread
        self._loop_thread = threading.get_ident()
        try:
            while not until():
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                self.poll(wait)
            return until()
        finally:
            self._loop_thread = outer

    def poll(self, timeout: Optional[float]) -> None:
        """One turn of the loop: wait up to ``timeout`` for events, handle them, flush.

        The wait is cut short for the primary's own timers (liveness pings, stops
        waiting for answers).
        """
        if self.timeout is not None or self._stop_groups:
            now = time.monotonic()
            due = [self._next_liveness] if self.timeout is not None else []
            due.extend(deadline for _, deadline in self._stop_groups)
            soonest = max(0.0, min(due) - now)
            timeout = soonest if timeout is None else min(timeout, soonest)
        for key, mask in self._sel.select(timeout):
            kind, w = key.data
            if kind == "io":
                if mask & selectors.EVENT_READ:
                    self._read(w)
                if mask & selectors.EVENT_WRITE and w.connected:
                    self._flush(w)
            elif kind == "exit":
                self._reap(w)
            else:
                self._drain_wake()
        if self.timeout is not None:
            self._check_liveness()
        if self._stop_groups:
            self._advance_stops()
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for w in dirty:
                w.dirty = False
                if w.connected and not w.want_write:
                    self._flush(w)

    def ping(self, w: WorkerHandle) -> int:
        """Send ``w`` a ping; return its number. Its answer comes after everything ``w`` published before."""
        self._pings += 1
        self._enqueue_control(w, pack_frame(PING, b"", 0xFFFF, w.index, count=self._pings))
        return self._pings

    def _check_liveness(self) -> None:
        """Ping the workers every timeout/4; kill one silent for longer than the timeout."""
        now = time.monotonic()
        if now < self._next_liveness:
            return
        timeout = self.timeout
        assert timeout is not None
        self._next_liveness = now + timeout / 4
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

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            call()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Relay until every worker has exited; True if they all did within ``timeout``."""
        return self.run(lambda: not self._workers, timeout)

    # -- reading and routing -----------------------------------------------

    def _read(self, w: WorkerHandle) -> None:
        try:
            data = w.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect(w)
            return
        w.bytes_in += len(data)
        w.last_seen = time.monotonic()
        buf: Any
        if w.inbuf:
            w.inbuf += data
            buf = w.inbuf
        else:
            buf = data
        n = len(buf)
        off = 0
        unpack = HEADER.unpack_from
        routes = self._routes
        max_body = self._max_body
        while n - off >= HEADER_SIZE:
            body_len, kind, clen, origin, dest, count = unpack(buf, off)
            if body_len > max_body or kind not in KINDS or clen > body_len or origin != w.index:
                self._protocol_error(w, body_len, kind, clen, origin)
                return
            end = off + HEADER_SIZE + body_len
            if end > n:
                break
            w.frames_in += 1
            if kind == DATA:
                w.messages_in += count
                chan = bytes(buf[off + HEADER_SIZE : off + HEADER_SIZE + clen])
                subs = routes.get(chan)
                if subs:
                    frame = buf[off:end]
                    if dest == BROADCAST:
                        for t, hubs in subs.items():
                            if t is not w or hubs > 1:
                                self._enqueue(t, frame, count)
                    else:
                        one = self._workers.get(dest)
                        if one is not None and one in subs:
                            self._enqueue(one, frame, count)
                        else:
                            self.unroutable += count
                else:
                    self.unroutable += count
            else:
                chan = bytes(buf[off + HEADER_SIZE : off + HEADER_SIZE + clen])
                self._control(w, kind, chan, count)
            off = end
        if off == n:
            w.inbuf = bytearray()
        elif buf is w.inbuf:
            del buf[:off]
        else:
            w.inbuf = bytearray(memoryview(buf)[off:])

    def _control(self, w: WorkerHandle, kind: int, chan: bytes, count: int) -> None:
        if kind == SUB:
            w.channels[chan] = w.channels.get(chan, 0) + 1
            self._routes.setdefault(chan, {})[w] = w.channels[chan]
            self._enqueue_control(w, pack_frame(ACK, chan, 0xFFFF, w.index))
        elif kind == UNSUB:
            left = w.channels.get(chan, 0) - 1
            if left > 0:
                w.channels[chan] = left
                self._routes[chan][w] = left
            else:
                w.channels.pop(chan, None)
                subs = self._routes.get(chan)
                if subs is not None:
                    subs.pop(w, None)
                    if not subs:
                        del self._routes[chan]
        elif kind == READY:
            if not w.ready:
                w.ready = True
                if self.on_worker_ready is not None:
                    self.on_worker_ready(w)
        elif kind == PONG:
            w.pong = max(w.pong, count)  # last_seen was updated by the read
            if self._stop_groups:
                self._advance_stops()

    def _enqueue(self, t: WorkerHandle, frame: Any, count: int) -> None:
        size = len(frame)
        if t.out_bytes + size > self.max_buffer and t.out and not t.want_write:
            self._flush(t)  # a large read batch: write what the socket takes before judging
            if not t.connected:
                return
        if t.out_bytes + size > self.max_buffer:
            t.dropped += count
            t.dropped_frames += 1
            _ratelimited(
                ("drop", t.index),
                logging.WARNING,
                "worker %d (pid %d) is not keeping up: its output buffer is full (%d bytes); "
                "%d messages dropped for it so far",
                t.index,
                t.pid,
                self.max_buffer,
                t.dropped,
            )
            return
        t.out.append(frame)
        t.out_bytes += size
        t.frames_out += 1
        t.messages_out += count
        if not t.dirty:
            t.dirty = True
            self._dirty.append(t)

    def _enqueue_control(self, t: WorkerHandle, frame: bytes) -> None:
        t.out.append(frame)
        t.out_bytes += len(frame)
        if not t.dirty:
            t.dirty = True
            self._dirty.append(t)

    def _flush(self, w: WorkerHandle) -> None:
        out = w.out
        while out:
            chunk = out if len(out) <= IOV_MAX else out[:IOV_MAX]
            try:
                sent = w.sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._disconnect(w)
                return
            w.bytes_out += sent
            w.out_bytes -= sent
            offered = 0
            i = 0
            for part in chunk:
                size = len(part)
                if sent < size:
                    break
                sent -= size
                offered += size
                i += 1
            partial = i < len(chunk)
            if partial and sent:
                out[i] = memoryview(out[i])[sent:]
            del out[:i]
            if partial:
                break
        want = bool(out)
        if want != w.want_write:
            w.want_write = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._sel.modify(w.sock, events, ("io", w))

    # -- failures and exits ------------------------------------------------

    def _protocol_error(self, w: WorkerHandle, body_len: int, kind: int, clen: int, origin: int) -> None:
        logger.error(
            "worker %d (pid %d) sent a malformed frame (kind %d, length %d, channel length %d, "
            "origin %d): dropping its connection and stopping it",
            w.index,
            w.pid,
            kind,
            body_len,
            clen,
            origin,
        )
        self._kill(w, "malformed frame")

    def _kill(self, w: WorkerHandle, reason: str) -> None:
        """Cut ``w`` off and SIGKILL it; ``reason`` is kept for whoever reports its exit."""
        w.kill_reason = reason
        self._disconnect(w)
        try:
            w.process.kill()
        except Exception:
            pass

    def _disconnect(self, w: WorkerHandle) -> None:
        """Forget ``w``'s connection: no more routing to or from it."""
        if not w.connected:
            return
        w.connected = False
        if w.inbuf:
            logger.error(
                "worker %d (pid %d) closed its pipe in the middle of a frame: %d bytes discarded",
                w.index,
                w.pid,
                len(w.inbuf),
            )
        for chan in w.channels:
            subs = self._routes.get(chan)
            if subs is not None:
                subs.pop(w, None)
                if not subs:
                    del self._routes[chan]
        w.channels.clear()
        w.out.clear()
        w.out_bytes = 0
        w.inbuf = bytearray()
        try:
            self._sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        w.sock.close()

    def _reap(self, w: WorkerHandle) -> None:
        """The process ended: route what it wrote before exiting, then forget it."""
        self._drain(w)
        self._disconnect(w)
        try:
            self._sel.unregister(w.process.sentinel)
        except (KeyError, ValueError):
            pass
        w.process.join(1.0)
        w._exitcode = w.process.exitcode
        if w._exitcode is not None:
            w.reaped = True
            w.process.close()  # release its sentinel: restarts must not accumulate descriptors
        if self._workers.get(w.index) is w:
            del self._workers[w.index]
        self.exited.append(w)
        del self.exited[:-256]
        code = w.exitcode
        logger.debug("worker %d (pid %d) exited with %s", w.index, w.pid, code)
        if self.on_worker_exit is not None:
            self.on_worker_exit(w)

    # -- stopping ----------------------------------------------------------

    def begin_stop(self, workers: List[WorkerHandle], wait: float = 2.0) -> None:
        """Ask ``workers`` to stop once they have everything published before now. Returns at once.

        Each gets a ping; its answer follows everything it published before.
        Once all have answered (or ``wait`` seconds passed), each gets a STOP
        frame behind everything routed to it, and SIGTERMs itself when it
        reads it. A worker whose pipe is gone gets SIGTERM directly. The loop
        (:meth:`poll`) carries this out.
        """
        asked: Dict[WorkerHandle, int] = {}
        for w in workers:
            if w.connected:
                asked[w] = self.ping(w)
            else:
                self._terminate(w)
        if asked:
            self._stop_groups.append((asked, time.monotonic() + wait))
            self._advance_stops()

    def _advance_stops(self) -> None:
        if not self._stop_groups:
            return
        now = time.monotonic()
        waiting = []
        for asked, deadline in self._stop_groups:
            if now < deadline and not all(w.pong >= n or not w.connected for w, n in asked.items()):
                waiting.append((asked, deadline))
                continue
            for w in asked:
                if w.connected:
                    self._enqueue_control(w, pack_frame(STOP, b"", 0xFFFF, w.index))
                    self._flush(w)
                if not w.connected:
                    self._terminate(w)
        self._stop_groups = waiting

    @staticmethod
    def _terminate(w: WorkerHandle) -> None:
        if not w.reaped:
            try:
                w.process.terminate()
            except Exception:
                pass

    def stop_workers(self, timeout: Optional[float] = None) -> bool:
        """Stop every worker (:meth:`begin_stop`), relay until they exit, SIGKILL after ``timeout``.

        Returns True if all exited before the timeout.
        """
        graceful = self.graceful_timeout if timeout is None else timeout
        self.begin_stop(self.workers, wait=min(graceful / 2, 5.0))
        clean = self.run(lambda: not self._workers, graceful)
        if not clean:
            for w in list(self._workers.values()):
                logger.warning("worker %d (pid %d) did not stop in %.1f s: killing it", w.index, w.pid, graceful)
                try:
                    w.process.kill()
                except Exception:
                    pass
            self.run(lambda: not self._workers, 5.0)
        return clean

    def _drain(self, w: WorkerHandle) -> None:
        """Read and route everything ``w`` has written so far."""
        while w.connected:
            before = w.bytes_in
            self._read(w)
            if w.bytes_in == before:
                break

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the workers (SIGTERM, then SIGKILL after ``timeout``) and release everything."""
        if self._closed:
            return
        self._in_loop(lambda: self._close(timeout))

    def _close(self, timeout: Optional[float]) -> None:
        if self._closed:
            return
        try:
            self.stop_workers(timeout)
        finally:
            self._closed = True
            for w in list(self._workers.values()):
                self._disconnect(w)
            self._release()
            global _primary
            if _primary is self:
                _primary = None

    def _release(self) -> None:
        _live_primaries.discard(self)
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def stats(self) -> Dict[str, Any]:
        """Relay counters: per worker (running and recently exited) and totals."""
        workers = [w.stats() for w in self.workers]
        return {
            "workers": workers,
            "exited": [w.stats() for w in self.exited[-16:]],
            "dropped": sum(w.dropped for w in self.workers) + sum(w.dropped for w in self.exited),
            "buffered": sum(w.out_bytes for w in self.workers),
            "unroutable": self.unroutable,
            "channels": {c.decode("utf-8", "replace"): len(s) for c, s in self._routes.items()},
        }

    def __enter__(self) -> "Primary":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_primary: Optional[Primary] = None
_live_primaries: "weakref.WeakSet[Primary]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child is not the primary: close the primary's descriptors there."""
    global _primary
    _primary = None
    for p in list(_live_primaries):
        socks = [w.sock for w in p._workers.values()]
        if p._forking is not None:
            socks.append(p._forking)
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass
        p._workers = {}
        p._routes = {}
        p._closed = True
        p._release()


os.register_at_fork(after_in_child=_after_fork_in_child)


def setup_primary_cluster(**options: Any) -> Optional[Primary]:
    """Return this process's primary, creating it on the first call.

    In a worker it does nothing and returns None. Options (first call only):
    ``start_method`` ("fork", "spawn", "forkserver"; default: multiprocessing's),
    ``workers``, ``max_buffer`` (32 MiB), ``max_message`` (8 MiB), ``out_limit``
    (32 MiB), ``publish_block`` (1.0 s), ``graceful_timeout`` (10 s).
    """
    global _primary
    if current_worker() is not None:
        return None
    if _primary is None or _primary.closed:
        _primary = Primary(**options)
    return _primary
