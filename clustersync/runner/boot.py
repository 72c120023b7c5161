"""The worker side of ``clustersync run``: load ``MODULE:CALLABLE`` and call it.

:func:`run_app` is what the supervisor hands to ``Primary.fork``. It gives
the worker its signal handling (SIGTERM raises ``SystemExit(0)`` in the main
thread, like Ctrl-C raises ``KeyboardInterrupt``; the signals the primary
acts on are ignored), its log format, its listening sockets and its
``sys.path``, then imports the app and calls it, or serves it with uvicorn
if it is an ASGI app (see :mod:`.interface`). The worker says it is ready
once the callable has run for :data:`READY_AFTER` seconds, or earlier if the
app calls :func:`clustersync.notify_ready`; an ASGI app, once uvicorn serves.

Python runs signal handlers in the main thread only, between bytecodes. A
main thread blocked on a lock or a sleep misses a signal that lands in
another thread, or lands just before it blocks. So the primary forks with
:data:`SIGNALS` blocked: the worker's own threads (the link's, the readiness
timer, the watcher below) keep them blocked, and only the main thread
unblocks them, once its handlers are in place. And a watcher thread, told of
each signal through ``signal.set_wakeup_fd``, sends SIGTERM to the main
thread again until the handler has run (unless the app installed its own).

What goes wrong while loading or running the app is sent to the primary on a
datagram socket (one short message, with the traceback), so that the primary
can log it once, say why it stops, and not print one traceback per worker.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any, Callable, NamedTuple, Sequence, Tuple

from .. import _log
from ..relay.loop import blocked_signals
from ..relay.worker import current_worker, notify_ready
from . import sockets as _sockets
from .interface import load_uvicorn, serve_asgi, uses_asgi

__all__ = ["WorkerSpec", "AppLoadError", "split_app", "load_app", "run_app", "READY_AFTER"]

#: Seconds a callable must run before its worker counts as ready.
READY_AFTER = 1.0
#: Exit status of a worker that could not import the module or find the callable.
LOAD_FAILED = 4
#: The largest report a worker sends (the traceback is cut from the top to fit).
MAX_REPORT = 16 * 1024
#: Signals the primary acts on; a worker leaves them to it.
PRIMARY_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
#: Signals blocked while a worker starts, and in the threads clustersync starts in it.
SIGNALS = (signal.SIGTERM,) + PRIMARY_SIGNALS

logger = logging.getLogger("clustersync")


class WorkerSpec(NamedTuple):
    """What a worker needs to run the app: ``app`` (``MODULE:CALLABLE``), extra ``paths``, ``log_level``,
    the ``interface`` (``auto``, ``asgi`` or ``call``) and, for uvicorn, the ``graceful_timeout``."""

    app: str
    paths: Tuple[str, ...]
    log_level: str
    interface: str = "auto"
    graceful_timeout: float = 30.0


class AppLoadError(Exception):
    """The module does not import, or the callable is missing. ``str()`` is one line."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def split_app(app: str) -> Tuple[str, str]:
    """Split ``MODULE:CALLABLE``; raise ``ValueError`` if it is not that shape."""
    module, sep, attr = app.partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise ValueError(f"{app!r} is not MODULE:CALLABLE (for example myapp.server:main)")
    if not all(part.isidentifier() for part in module.split(".") + attr.split(".")):
        raise ValueError(f"{app!r} is not MODULE:CALLABLE (for example myapp.server:main)")
    return module, attr


def _app_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the frames of this module and of importlib."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename in (__file__, importlib.__file__)
        or tb.tb_frame.f_code.co_filename.startswith("<frozen importlib")
    ):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def load_app(app: str) -> Callable[[], Any]:
    """Import the module of ``app`` and return its callable, or raise :class:`AppLoadError`."""
    module_name, attr = split_app(app)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise AppLoadError(
                f"cannot import module {module_name!r}: no module named {missing!r} "
                f"(looked in {os.getcwd()} and the rest of sys.path; see --app-dir)"
            ) from None
        raise AppLoadError(f"importing {module_name!r} failed: {exc}", _app_traceback(exc)) from None
    except Exception as exc:
        raise AppLoadError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}", _app_traceback(exc)
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise AppLoadError(f"{app} is not callable (it is {type(obj).__name__})")
    app_callable: Callable[[], Any] = obj
    return app_callable


_stopping = threading.Event()


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM in a worker: unwind the app from the main thread, once."""
    signal.signal(signal.SIGTERM, _ignore)
    _stopping.set()
    raise SystemExit(0)


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing (unlike SIG_IGN, it does not pass to programs the app executes)."""


def _blocked_thread(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """Start a daemon thread that never receives :data:`SIGNALS` (threads inherit the mask)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    with blocked_signals(SIGNALS):
        thread.start()
    return thread


def _watch_sigterm(wakeup: int, main: int) -> None:
    """After a SIGTERM, poke the main thread with it again until ``_stop`` has run there."""
    while True:
        try:
            seen = os.read(wakeup, 512)
        except OSError:
            return
        if not seen:
            return
        if signal.SIGTERM not in seen:
            continue
        delay = 0.05
        while not _stopping.wait(delay):
            if signal.getsignal(signal.SIGTERM) is not _stop:
                break  # the app handles SIGTERM itself
            signal.pthread_kill(main, signal.SIGTERM)
            delay = min(delay * 2, 1.0)


def _install_signals() -> None:
    """In the main thread: the worker's handlers, the watcher, then unblock."""
    signal.signal(signal.SIGTERM, _stop)
    for sig in PRIMARY_SIGNALS:
        signal.signal(sig, _ignore)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    _blocked_thread(_watch_sigterm, r, threading.get_ident(), name="clustersync-sigterm")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # here, in the main thread, and nowhere else


def _report(report: socket.socket, kind: str, error: str, details: str = "") -> None:
    """Tell the primary what went wrong; log it here if that fails."""
    me = current_worker()
    message = {"pid": os.getpid(), "index": me.index if me else -1, "kind": kind, "error": error}
    room = MAX_REPORT - len(json.dumps(message)) - 64
    message["details"] = details[-room:] if room > 0 else ""
    try:
        report.send(json.dumps(message).encode())
    except OSError:
        logger.error("%s%s", error, "\n" + details.rstrip() if details else "")


def _ready_after(returned: threading.Event) -> None:
    """Tell the primary the worker is ready once the app has run READY_AFTER seconds."""
    if not returned.wait(READY_AFTER):
        notify_ready()


def run_app(spec: WorkerSpec, listen: Sequence[socket.socket], report: socket.socket) -> None:
    """The worker's target: set the worker up, load the app, call it."""
    _install_signals()
    me = current_worker()
    _log.configure(spec.log_level, f"worker {me.index}" if me else "worker")
    _sockets._install(listen)
    for path in reversed(spec.paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    report.setblocking(False)
    try:
        app = load_app(spec.app)
        asgi = uses_asgi(app, spec.interface)
        if asgi:
            try:
                uvicorn = load_uvicorn()
            except ImportError as exc:
                raise AppLoadError(str(exc)) from None
            if not listen:
                raise AppLoadError(
                    f"{spec.app} is an ASGI app and there is no socket to serve it on: "
                    "give --bind HOST:PORT (or --interface call to call it instead)"
                )
    except AppLoadError as exc:
        _report(report, "load", str(exc), exc.details)
        raise SystemExit(LOAD_FAILED) from None
    returned = threading.Event()
    if not asgi:  # an ASGI app is ready once uvicorn serves
        _blocked_thread(_ready_after, returned, name="clustersync-ready")
    try:
        if asgi:
            serve_asgi(
                app,
                listen,
                graceful_timeout=spec.graceful_timeout,
                log_level=spec.log_level,
                on_started=notify_ready,
                uvicorn=uvicorn,
            )
        else:
            result = app()
            if inspect.iscoroutine(result):
                asyncio.run(result)
    except SystemExit:
        raise
    except BaseException as exc:
        _report(report, "raised", f"{type(exc).__name__}: {exc}", _app_traceback(exc))
        raise SystemExit(1) from None
    finally:
        returned.set()
        report.close()
