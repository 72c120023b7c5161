"""The relay's event loop: one selector, timers and a call queue, with one owner thread for life.

The first thread that runs the loop owns it for good; every other thread
talks to it through :meth:`Loop.call` (run there and wait for the result) or
:meth:`Loop.call_soon` (queue it and return; safe from signal handlers).
:func:`start_thread` runs a loop on a daemon thread of its own, with the
process's asynchronous signals blocked there so that they reach the main
thread; ``clustersync run`` runs it on its main thread instead.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import selectors
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Tuple

from .._log import RateLimitedLog

__all__ = ["Loop", "blocked_signals", "start_thread", "ASYNC_SIGNALS"]

_ratelimited = RateLimitedLog()

#: Asynchronous signals, blocked in clustersync's own threads so that they reach the application's.
ASYNC_SIGNALS = frozenset(
    {
        signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
        signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH,
    }
)


@contextmanager
def blocked_signals(signals: "frozenset[int] | tuple[int, ...]" = ASYNC_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread for the ``with`` body (threads started inside inherit the mask)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def start_thread(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """Start a daemon thread that never receives :data:`ASYNC_SIGNALS`."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    with blocked_signals():
        thread.start()
    return thread


Handler = Callable[[int], Any]


class Loop:
    """A selector loop. Register file objects with a ``handler(mask)``; schedule timers; run."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._calls: "queue.SimpleQueue[Callable[[], Any]]" = queue.SimpleQueue()
        self._timers: List[Tuple[float, int, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._after: List[Callable[[], Any]] = []
        self.owner: Optional[int] = None
        self._running = False
        self._stop = False
        self.closed = False

    # -- from any thread ---------------------------------------------------

    def on_loop(self) -> bool:
        """True on the loop's owner thread, or while no thread owns it yet."""
        return self.owner is None or self.owner == threading.get_ident()

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn`` to run on the loop and wake it. Safe from any thread and from signal handlers."""
        self._calls.put(fn)
        self.wake()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop and return its result (inline when already there)."""
        if self.on_loop():
            return fn()
        if self.closed:
            raise RuntimeError("the relay's loop is closed")
        fut: "Future[Any]" = Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)

        self.call_soon(run)
        while True:
            try:
                return fut.result(timeout=0.5)
            except TimeoutError:
                if fut.done():
                    raise
                if self.closed and fut.cancel():
                    raise RuntimeError("the relay's loop closed before it ran the call") from None

    def wake(self) -> None:
        """Make the loop's current wait return at once."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # full (it wakes anyway) or closed
            pass

    # -- on the loop -------------------------------------------------------

    def register(self, fileobj: Any, handler: Handler, events: int = selectors.EVENT_READ) -> None:
        """Call ``handler(mask)`` on the loop when ``fileobj`` is ready."""
        self._sel.register(fileobj, events, handler)

    def modify(self, fileobj: Any, events: int, handler: Handler) -> None:
        """Change what ``fileobj`` waits for."""
        self._sel.modify(fileobj, events, handler)

    def unregister(self, fileobj: Any) -> None:
        """Stop watching ``fileobj`` (no error if it was not watched)."""
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def call_at(self, when: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the loop at ``time.monotonic()`` ``when`` or soon after."""
        entry = (when, next(self._seq), fn)
        if self.on_loop():
            heapq.heappush(self._timers, entry)
        else:
            self.call_soon(lambda: heapq.heappush(self._timers, entry))

    def call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the loop in ``delay`` seconds."""
        self.call_at(time.monotonic() + delay, fn)

    def after_turn(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` at the end of every turn of the loop (for example: flush what the turn queued)."""
        self._after.append(fn)

    def stop(self) -> None:
        """Make :meth:`run` return after the current turn (safe from any thread)."""
        self._stop = True
        self.wake()

    def run(self, until: Optional[Callable[[], bool]] = None, timeout: Optional[float] = None) -> bool:
        """Run turns until ``until()`` is true, :meth:`stop` is called, or ``timeout`` passes.

        The first thread to run the loop owns it for life; returns ``until()``
        (True without ``until``, once stopped).
        """
        me = threading.get_ident()
        if self.owner is None:
            self.owner = me
        elif self.owner != me:
            raise RuntimeError("the relay's loop belongs to another thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        nested = self._running
        self._running = True
        try:
            while not self.closed:
                if until is not None and until():
                    return True
                if self._stop and not nested:
                    self._stop = False
                    return until is None
                wait = 1.0
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                self.turn(min(wait, 1.0))
            return until() if until is not None else False
        finally:
            self._running = nested

    def turn(self, timeout: float) -> None:
        """Wait up to ``timeout`` for events or the next timer; handle what is ready.

        A callback that raises is logged (at most once a second) and the loop
        goes on: one bug must not stop the relay for every worker.
        """
        timers = self._timers
        if timers:
            timeout = max(0.0, min(timeout, timers[0][0] - time.monotonic()))
        for key, mask in self._sel.select(timeout):
            try:
                key.data(mask)
            except Exception:
                _ratelimited("handler", logging.ERROR, "a handler on the relay's loop failed", exc_info=True)
        if timers:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                fn = heapq.heappop(timers)[2]
                try:
                    fn()
                except Exception:
                    _ratelimited("timer", logging.ERROR, "a timer on the relay's loop failed", exc_info=True)
        for fn in self._after:
            try:
                fn()
            except Exception:
                _ratelimited("after", logging.ERROR, "a callback on the relay's loop failed", exc_info=True)

    def _drain_wake(self, mask: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass
        calls = self._calls
        while True:
            try:
                fn = calls.get_nowait()
            except queue.Empty:
                break
            try:
                fn()
            except Exception:
                _ratelimited("call", logging.ERROR, "a call on the relay's loop failed", exc_info=True)

    def close(self) -> None:
        """Release the selector and the wake pipe. Queued calls are dropped."""
        if self.closed:
            return
        self.closed = True
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def forget_after_fork(self) -> None:
        """In a forked child: this loop is not the child's. Release it without touching the parent's."""
        self.owner = -1
        self.close()
