"""How a worker runs the app (``--interface``): call it, or serve it as an ASGI app with uvicorn.

- ``call``: call ``CALLABLE()``; a coroutine it returns is run with ``asyncio.run``.
- ``asgi``: ``CALLABLE`` is an ASGI 3 application; uvicorn serves it on the
  worker's listening sockets (those of ``--bind``, which the primary opened).
- ``auto`` (the default): ``asgi`` if :func:`is_asgi` says so, else ``call``.

Under ``asgi`` the worker is ready once uvicorn serves (after the app's
lifespan startup), and SIGTERM is uvicorn's graceful shutdown: it stops
accepting, lets open connections finish within the graceful timeout, runs the
lifespan shutdown, and the worker exits 0. uvicorn is imported in the worker
only; the primary merely checks that it can be found.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import signal
import socket
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = [
    "INTERFACES",
    "MISSING_UVICORN",
    "is_asgi",
    "uses_asgi",
    "uvicorn_missing",
    "load_uvicorn",
    "shutdown_timeout",
    "serve_asgi",
]

INTERFACES = ("auto", "asgi", "call")
#: Seconds a stopping worker lets connections it has just accepted send their request.
ACCEPT_GRACE = 0.2
#: The one line printed when uvicorn is needed and missing.
MISSING_UVICORN = 'serving an ASGI app needs uvicorn, which is not installed: pip install "clustersync[asgi]"'


def is_asgi(obj: Any) -> bool:
    """True if ``obj`` looks like an ASGI 3 application (the rule of ``--interface auto``).

    That is: a coroutine function, or an object (not a class) whose
    ``__call__`` is a coroutine function, that can be called with three
    positional arguments ``(scope, receive, send)``. Starlette, FastAPI,
    Quart and Django's ``ASGIHandler`` instances are; a function of no
    arguments, even ``async def main()``, is not.
    """
    if inspect.isclass(obj):
        return False
    if inspect.iscoroutinefunction(obj):
        fn = obj
    else:
        call = getattr(type(obj), "__call__", None)
        if call is None or not inspect.iscoroutinefunction(call):
            return False
        fn = obj.__call__
    try:
        inspect.signature(fn).bind(None, None, None)
    except (TypeError, ValueError):  # cannot take three arguments, or no signature to read
        return False
    return True


def uses_asgi(obj: Any, interface: str) -> bool:
    """Whether ``--interface interface`` serves ``obj`` with uvicorn (True) or calls it (False)."""
    if interface not in INTERFACES:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}, not {interface!r}")
    return interface == "asgi" or (interface == "auto" and is_asgi(obj))


def uvicorn_missing() -> bool:
    """True if ``import uvicorn`` cannot work here (checked without importing it)."""
    try:
        return importlib.util.find_spec("uvicorn") is None
    except (ImportError, ValueError):
        return True


def load_uvicorn() -> ModuleType:
    """Import uvicorn; raise ``ImportError`` with :data:`MISSING_UVICORN` if it is missing or too old."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(MISSING_UVICORN) from exc
    if not hasattr(uvicorn.Server, "capture_signals"):  # before 0.29
        raise ImportError(f"uvicorn {uvicorn.__version__} is too old: pip install \"clustersync[asgi]\"")
    return uvicorn


def shutdown_timeout(graceful_timeout: float) -> float:
    """Seconds uvicorn lets open connections finish after SIGTERM.

    The rest of ``--graceful-timeout`` (1 s, or half of it if that is less)
    is left for the lifespan shutdown and the worker's flush, before SIGKILL.
    """
    return max(graceful_timeout - 1.0, graceful_timeout / 2)


def serve_asgi(
    app: Any,
    sockets: Sequence[socket.socket],
    *,
    graceful_timeout: float,
    log_level: str,
    on_started: Callable[[], None],
    uvicorn: Optional[ModuleType] = None,
) -> None:
    """Serve ``app`` with uvicorn on ``sockets`` until SIGTERM; call ``on_started()`` once it serves.

    Returns after a graceful shutdown. Raises ``RuntimeError`` if the app's
    lifespan startup failed (uvicorn has logged why).
    """
    uv = uvicorn if uvicorn is not None else load_uvicorn()
    from uvicorn.config import STARTUP_FAILURE

    config = uv.Config(
        app,
        interface="asgi3",
        log_config=None,  # uvicorn's loggers propagate to the root logger: the runner's format
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout(graceful_timeout),
    )

    class Server(uv.Server):  # type: ignore[name-defined,misc]
        async def startup(self, sockets: Optional[Sequence[socket.socket]] = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_started()

        async def shutdown(self, sockets: Optional[Sequence[socket.socket]] = None) -> None:
            # Stop accepting first, then let the connections accepted just now send their request:
            # uvicorn closes a connection with no request under way at once, and the client would
            # see it reset (the other workers take the new connections on the shared socket).
            for server in getattr(self, "servers", ()):
                server.close()
            await asyncio.sleep(ACCEPT_GRACE)
            await super().shutdown(sockets=sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # SIGTERM only: the signals the primary acts on (INT, HUP...) stay ignored in a worker.
            previous = signal.signal(signal.SIGTERM, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGTERM, previous)

    server = Server(config)
    try:
        server.run(sockets=list(sockets))
    except SystemExit as exc:
        if exc.code == STARTUP_FAILURE and not server.started:
            raise RuntimeError("the app's lifespan startup failed (uvicorn logged why above)") from None
        raise
