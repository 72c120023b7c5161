"""Services across workers: call an object that lives in another worker as if it were local.

A :class:`Services` object sits on a :class:`~clustersync.hub.Hub` whose
driver keeps a presence table (``cluster``, ``broadcast_channel``).
``expose(path, store)`` advertises ``svc/<key>/<path>`` in that table; the
primary holds it, sends it whole to every worker that joins the channel
(before ``wait_ready`` returns) and withdraws a worker's entries the moment
the worker is gone. So the registry is authoritative and immediate: no
polling, no discovery race, and a call in flight to a worker that dies
fails at once.

A call is one message addressed (``to=``) to one provider's hub, round-robin
across the providers of the path; the answer is addressed back to
``msg.origin``. Requests and answers travel on the hub topic
``clustersync.services/<key>``, encoded by the hub's codec (so arguments and
results are JSON values, or whatever the hub's serializer carries). The
serving side runs each call on a bounded pool of threads, and coroutine
methods on an event loop of its own, so a slow method never holds up
message delivery in its worker. See docs/services.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import functools
import inspect
import itertools
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from ._log import logger
from .hub import Hub
from .message import Address, Message, delivering

__all__ = [
    "Services",
    "RemoteError",
    "ServiceUnavailable",
    "CallContext",
    "call_context",
    "STANDARD_METHODS",
    "TOPIC_PREFIX",
]

#: Calls and answers go on the hub topic ``TOPIC_PREFIX + key``.
TOPIC_PREFIX = "clustersync.services/"
#: The methods a store may expose without being named in ``methods=`` (Feathers' service methods).
STANDARD_METHODS = ("find", "get", "create", "update", "patch", "remove")
_ADVERT = "svc/"
# On Python 3.10 these are not yet the built-in TimeoutError.
_TIMEOUTS = (TimeoutError, FutureTimeout, asyncio.TimeoutError)

Selector = Union[None, Sequence[str], Callable[[str], bool]]


class ServiceUnavailable(LookupError):
    """No worker provides the path (now, or within the wait), or the one called died or left."""


class RemoteError(Exception):
    """An exception raised by the remote method whose type is neither built-in nor registered.

    ``type_name``, ``message`` and ``remote_traceback`` (the text) describe it.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


class CallContext(NamedTuple):
    """What :func:`call_context` returns inside a served call."""

    #: True: the call came through ``Services`` (from this worker or another).
    from_remote: bool
    #: The calling worker's index (``-1`` outside a worker).
    caller: int
    #: The calling hub's address.
    origin: Address


_context: "contextvars.ContextVar[Optional[CallContext]]" = contextvars.ContextVar("clustersync_call", default=None)


def call_context() -> Optional[CallContext]:
    """Inside a method served to a remote call: who called. None outside one (a plain local call)."""
    return _context.get()


class _Pending:
    """A call on its way: its future, where it went, and whether it may go again."""

    __slots__ = ("future", "path", "method", "args", "kwargs", "provider", "retry")

    def __init__(self, path: str, method: str, args: List[Any], kwargs: Dict[str, Any], retry: bool) -> None:
        self.future: "Future[Any]" = Future()
        self.path = path
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.provider: Optional[Address] = None
        self.retry = retry


class _Exposed(NamedTuple):
    store: Any
    methods: Tuple[str, ...]
    idempotent: Tuple[str, ...]


class Services:
    """Expose objects to every worker, and call the ones other workers expose.

    ``hub``: a hub whose driver keeps a presence table. ``key``: the
    partition; services of another key are invisible. ``timeout``: the
    default seconds a call waits for its answer. ``workers``: the threads
    that serve calls here (at most ``4 * workers`` calls wait their turn;
    more are refused with ``ServiceUnavailable``). ``services``: which of
    this worker's paths may be exposed (a list, or a predicate), and
    ``remote_services`` which remote paths to use; ``remote_path(path)``
    gives the local name a remote path is called by. ``hooks``:
    ``{"before": [...], "after": [...], "error": [...]}``, functions of a
    dict ``{path, method, args, kwargs, result, error}`` run around every
    call. ``methods``: the custom methods (beyond find/get/create/update/
    patch/remove) a store may expose. ``errors``: exception types raised
    remotely that are raised here as themselves. ``events``: a
    :class:`~clustersync.events.SyncedEmitter`; exposed stores emit their
    service events through it and proxies' ``on`` listen to them.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        key: str = "default",
        timeout: float = 20.0,
        workers: int = 8,
        services: Selector = None,
        remote_services: Selector = None,
        remote_path: Optional[Callable[[str], str]] = None,
        hooks: Optional[Mapping[str, Iterable[Callable[[Dict[str, Any]], Any]]]] = None,
        methods: Iterable[str] = (),
        errors: Iterable[type] = (),
        events: Any = None,
    ) -> None:
        if not isinstance(hub, Hub):
            raise TypeError(f"hub must be a Hub, not {type(hub).__name__}")
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError("key must be a non-empty str without '/'")
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError("workers must be a positive int")
        self.hub = hub
        self.key = key
        self.timeout = timeout
        self.topic = TOPIC_PREFIX + key
        self._services = services
        self._remote_services = remote_services
        self._remote_path = remote_path
        self._hooks = {stage: tuple(hooks.get(stage, ())) for stage in ("before", "after", "error")} if hooks else {}
        self._custom = frozenset(methods)
        self._errors = {cls.__name__: cls for cls in errors}
        for cls in self._errors.values():
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(f"errors must be exception types, not {cls!r}")
        self.events = events
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._pending: Dict[int, _Pending] = {}
        self._exposed: Dict[str, _Exposed] = {}
        # The registry: remote path -> providers, in the order they came; key "" for other keys.
        self._providers: Dict[Tuple[str, str], List[Address]] = {}
        # What each provider lets a caller retry: (key, path, provider) -> method names.
        self._idempotent: Dict[Tuple[str, str, Address], Tuple[str, ...]] = {}
        self._next: Dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clustersync-service")
        self._room = threading.BoundedSemaphore(workers * 5)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False
        self._sub = hub.subscribe(self.topic, self._on_message)
        self._unwatch = hub.watch_adverts(self._on_advert)

    # -- exposing ----------------------------------------------------------------

    def expose(
        self, path: str, store: Any, methods: Optional[Iterable[str]] = None, idempotent: Iterable[str] = ("get", "find")
    ) -> None:
        """Make ``store`` callable from every worker as ``path``.

        ``methods``: the methods to expose (None: its public methods that are
        standard service methods or allowed by ``Services(methods=...)``).
        ``idempotent``: the methods a caller may retry on another provider
        when the first one dies mid-call.
        """
        _check_path(path)
        if self._closed:
            raise RuntimeError("expose() on closed Services")
        if not _selected(self._services, path):
            raise ValueError(f"{path!r} is not among the services this worker may expose (services=)")
        if methods is None:
            names = [m for m in dir(store) if not m.startswith("_") and callable(getattr(store, m, None))]
            chosen = tuple(m for m in names if m in STANDARD_METHODS or m in self._custom)
        else:
            chosen = tuple(methods)
            for m in chosen:
                if m.startswith("_") or not callable(getattr(store, m, None)):
                    raise ValueError(f"the store has no public method {m!r}")
        if not chosen:
            raise ValueError(f"nothing to expose on {path!r}: no standard method, and none named in methods=")
        if self.events is not None:
            store = self.events.service(path, store)
        with self._lock:
            if path in self._exposed:
                raise ValueError(f"{path!r} is already exposed here")
            self._exposed[path] = _Exposed(store, chosen, tuple(m for m in idempotent if m in chosen))
        self.hub.advertise(self._entry(path))
        # Registered when the backplane says so: from then on a worker that learns of it by any
        # means (a barrier, a message) finds it, because a miss first syncs with the backplane.
        with self._lock:
            registered = self._lock.wait_for(
                lambda: self.hub.address in self._providers.get((self.key, path), ()), self.timeout
            )
        if not registered:
            logger.warning("%s: the backplane did not confirm %r within %g s", self.hub.address, path, self.timeout)

    def unexpose(self, path: str) -> None:
        """Stop serving ``path`` from this worker (calls already running finish)."""
        with self._lock:
            if path not in self._exposed:
                return
            entry = self._entry(path)
            del self._exposed[path]
        self.hub.advertise(entry, on=False)

    def _entry(self, path: str) -> str:
        exposed = self._exposed.get(path)
        idem = ",".join(exposed.idempotent) if exposed else ""
        return f"{_ADVERT}{self.key}/{path}|{idem}"

    # -- the registry --------------------------------------------------------------

    def _on_advert(self, address: Address, entry: str, present: bool) -> None:
        if not entry.startswith(_ADVERT):
            return
        rest, _, _idem = entry[len(_ADVERT):].partition("|")
        key, _, path = rest.partition("/")
        if not path:
            return
        failed: List[_Pending] = []
        with self._lock:
            providers = self._providers.setdefault((key, path), [])
            if present:
                if address not in providers:
                    providers.append(address)
                self._idempotent[(key, path, address)] = tuple(m for m in _idem.split(",") if m)
            else:
                if address in providers:
                    providers.remove(address)
                self._idempotent.pop((key, path, address), None)
                if not providers:
                    del self._providers[(key, path)]
                if key == self.key:
                    failed = [p for p in self._pending.values() if p.provider == address and p.path == path]
            self._lock.notify_all()
        for pending in failed:
            self._provider_gone(pending, address)

    def available(self) -> Dict[str, List[int]]:
        """``{path: [worker indexes]}`` of the services of this key that can be called now."""
        self._ensure_ready()
        with self._lock:
            out: Dict[str, List[int]] = {}
            for (key, path), providers in self._providers.items():
                if key != self.key or not _selected(self._remote_services, path):
                    continue
                out[self._local_name(path)] = sorted(a.worker for a in providers)
            return out

    def _local_name(self, path: str) -> str:
        return self._remote_path(path) if self._remote_path is not None else path

    def _remote_name(self, name: str) -> str:
        if self._remote_path is None:
            return name
        with self._lock:
            for (key, path) in self._providers:
                if key == self.key and self._remote_path(path) == name:
                    return path
        return name

    def _ensure_ready(self) -> None:
        self.hub.wait_ready(self.timeout)

    # -- calling ---------------------------------------------------------------------

    def call(self, path: str, method: str, *args: Any, timeout: Optional[float] = None, wait: bool = False, **kwargs: Any) -> Any:
        """Call ``method(*args, **kwargs)`` of ``path`` on a worker that exposes it; return its result.

        Raises what the method raised (see the class), ``ServiceUnavailable``
        when no worker provides ``path`` (``wait=True``: waits for one up to
        the timeout) or the provider died mid-call, and ``TimeoutError``.
        """
        limit = self.timeout if timeout is None else timeout
        _not_on_a_delivery_thread()
        ctx = self._before(path, method, args, kwargs)
        try:
            future = self._submit(path, method, list(args), dict(kwargs), limit, wait)
            try:
                result = future.result(timeout=limit)
            except _TIMEOUTS:
                self._forget(future)
                raise TimeoutError(f"{path}.{method} did not answer within {limit:g} s") from None
        except BaseException as exc:
            self._on_error(ctx, exc)
            raise
        return self._after(ctx, result)

    async def call_async(
        self, path: str, method: str, *args: Any, timeout: Optional[float] = None, wait: bool = False, **kwargs: Any
    ) -> Any:
        """The asyncio form of :meth:`call`: the event loop is never blocked."""
        limit = self.timeout if timeout is None else timeout
        ctx = self._before(path, method, args, kwargs)
        try:
            loop = asyncio.get_running_loop()
            future = await loop.run_in_executor(
                None, lambda: self._submit(path, method, list(args), dict(kwargs), limit, wait)
            )
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(future), limit)
            except _TIMEOUTS:
                self._forget(future)
                raise TimeoutError(f"{path}.{method} did not answer within {limit:g} s") from None
        except BaseException as exc:
            self._on_error(ctx, exc)
            raise
        return self._after(ctx, result)

    def remote(self, path: str) -> "RemoteService":
        """A proxy: ``services.remote("todos").get(1)`` is ``call("todos", "get", 1)``."""
        _check_path(path)
        return RemoteService(self, path)

    def remote_async(self, path: str) -> "RemoteService":
        """The asyncio proxy: ``await services.remote_async("todos").get(1)``."""
        _check_path(path)
        return RemoteService(self, path, asynchronous=True)

    def gather(self, path: str, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Dict[int, Any]:
        """Call ``method`` on every worker that exposes ``path``: ``{worker index: result or the exception}``."""
        limit = self.timeout if timeout is None else timeout
        _not_on_a_delivery_thread()
        self._ensure_ready()
        remote = self._remote_name(path)
        with self._lock:
            providers = list(self._providers.get((self.key, remote), ()))
        futures = {a: self._send(remote, method, list(args), dict(kwargs), a, retry=False) for a in providers}
        deadline = time.monotonic() + limit
        out: Dict[int, Any] = {}
        for address, future in futures.items():
            try:
                out[address.worker] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except _TIMEOUTS:
                self._forget(future)
                out[address.worker] = TimeoutError(f"{path}.{method} on {address} did not answer within {limit:g} s")
            except BaseException as exc:  # the result is the exception, as documented
                out[address.worker] = exc
        return out

    def healthcheck(self, key: Optional[str] = None, timeout: float = 2.0) -> Tuple[int, Dict[str, Any]]:
        """``(200, detail)`` when every provider of the key answers within ``timeout``; ``(404, ...)``
        when none is registered; ``(503, ...)`` when some do not answer. ``detail`` lists paths and laggards."""
        key = self.key if key is None else key
        self._ensure_ready()
        with self._lock:
            hubs: Dict[Address, List[str]] = {}
            for (k, path), providers in self._providers.items():
                if k == key:
                    for a in providers:
                        hubs.setdefault(a, []).append(path)
        if not hubs:
            return 404, {"key": key, "services": {}}
        futures = {a: self._send("", "__ping__", [], {}, a, retry=False) for a in hubs}
        deadline = time.monotonic() + timeout
        silent = []
        for address, future in futures.items():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:
                self._forget(future)
                silent.append(str(address))
        services: Dict[str, List[int]] = {}
        for address, paths in hubs.items():
            for p in paths:
                services.setdefault(p, []).append(address.worker)
        detail = {"key": key, "services": {p: sorted(w) for p, w in services.items()}, "silent": silent}
        return (503 if silent else 200), detail

    # -- the calling side, inside ------------------------------------------------------

    def _submit(
        self, path: str, method: str, args: List[Any], kwargs: Dict[str, Any], limit: float, wait: bool
    ) -> "Future[Any]":
        if self._closed:
            raise RuntimeError("a call on closed Services")
        _check_path(path)
        if not isinstance(method, str) or not method or method.startswith("_"):
            raise ValueError(f"method must be a public method name, not {method!r}")
        self._ensure_ready()
        remote = self._remote_name(path)
        if not _selected(self._remote_services, remote):
            raise ServiceUnavailable(f"{path!r} is not among the remote services used here (remote_services=)")
        provider = self._pick(remote, 0.0)
        if provider is None:
            # Not known here yet? Whatever the backplane had seen when we asked is known after this.
            self.hub.sync_adverts(limit)
            provider = self._pick(remote, limit if wait else 0.0)
        if provider is None:
            raise ServiceUnavailable(f"no worker provides {path!r} (key {self.key!r})")
        with self._lock:
            idem = method in self._idempotent.get((self.key, remote, provider), ())
        return self._send(remote, method, args, kwargs, provider, retry=idem)

    def _pick(self, path: str, wait: float, avoid: Optional[Address] = None) -> Optional[Address]:
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                providers = [a for a in self._providers.get((self.key, path), ()) if a != avoid]
                if providers:
                    n = self._next.get(path, 0)
                    self._next[path] = n + 1
                    return providers[n % len(providers)]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)

    def _send(
        self, path: str, method: str, args: List[Any], kwargs: Dict[str, Any], provider: Address, retry: bool
    ) -> "Future[Any]":
        pending = _Pending(path, method, args, kwargs, retry)
        self._dispatch(pending, provider)
        return pending.future

    def _dispatch(self, pending: _Pending, provider: Address) -> None:
        call_id = next(self._ids)
        with self._lock:
            pending.provider = provider
            self._pending[call_id] = pending
        request = {"t": "call", "id": call_id, "path": pending.path, "method": pending.method,
                   "args": pending.args, "kwargs": pending.kwargs}
        try:
            self.hub.publish(self.topic, request, to=provider)
        except Exception as exc:  # it cannot be encoded: the caller's error, at once
            with self._lock:
                self._pending.pop(call_id, None)
            pending.future.set_exception(exc)

    def _forget(self, future: "Future[Any]") -> None:
        with self._lock:
            for call_id, pending in list(self._pending.items()):
                if pending.future is future:
                    del self._pending[call_id]

    def _provider_gone(self, pending: _Pending, address: Address) -> None:
        with self._lock:
            for call_id, p in list(self._pending.items()):
                if p is pending:
                    del self._pending[call_id]
        if pending.future.done():
            return
        if pending.retry:
            pending.retry = False
            other = self._pick(pending.path, 0.0, avoid=address)
            if other is not None:
                self._dispatch(pending, other)
                return
        pending.future.set_exception(
            ServiceUnavailable(f"the worker serving {pending.path}.{pending.method} ({address}) is gone")
        )

    def _answer(self, body: Mapping[str, Any]) -> None:
        with self._lock:
            pending = self._pending.pop(body.get("id"), None)  # type: ignore[arg-type]
        if pending is None or pending.future.done():
            return  # late: the caller gave up
        if body.get("ok"):
            pending.future.set_result(body.get("value"))
        else:
            pending.future.set_exception(self._rebuild(body))

    def _rebuild(self, body: Mapping[str, Any]) -> BaseException:
        name = str(body.get("type", "Exception"))
        message = str(body.get("message", ""))
        details = str(body.get("traceback", ""))
        if name == "ServiceUnavailable":
            return ServiceUnavailable(message)
        cls = self._errors.get(name) or getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                exc = cls(message)
                exc.__notes__ = [f"raised remotely:\n{details}"] if details else []
                return exc
            except Exception:  # a type that does not take one message
                pass
        return RemoteError(name, message, details)

    # -- hooks --------------------------------------------------------------------------

    def _before(self, path: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        ctx: Dict[str, Any] = {"path": path, "method": method, "args": list(args), "kwargs": dict(kwargs),
                               "result": None, "error": None}
        for hook in self._hooks.get("before", ()):
            hook(ctx)
        return ctx

    def _after(self, ctx: Dict[str, Any], result: Any) -> Any:
        ctx["result"] = result
        for hook in self._hooks.get("after", ()):
            hook(ctx)
        return ctx["result"]

    def _on_error(self, ctx: Dict[str, Any], exc: BaseException) -> None:
        ctx["error"] = exc
        for hook in self._hooks.get("error", ()):
            try:
                hook(ctx)
            except Exception:
                logger.exception("an error hook of %s.%s failed", ctx["path"], ctx["method"])

    # -- the serving side ----------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        body = msg.data
        if not isinstance(body, dict):
            self.hub.report(ValueError(f"a services message that is not a dict: {type(body).__name__}"), "delivery")
            return
        kind = body.get("t")
        if kind == "reply":
            self._answer(body)
        elif kind == "call":
            self._serve(msg.origin, body)
        else:
            self.hub.report(ValueError(f"a services message of unknown kind {kind!r:.40}"), "delivery")

    def _serve(self, origin: Address, body: Mapping[str, Any]) -> None:
        call_id = body.get("id")
        if body.get("method") == "__ping__":
            self._reply(origin, call_id, True, None)
            return
        if not self._room.acquire(blocking=False):
            self._reply_error(origin, call_id, ServiceUnavailable("too many calls waiting here"), "")
            return
        try:
            self._pool.submit(self._run, origin, body)
        except RuntimeError:  # the pool is shut down
            self._room.release()
            self._reply_error(origin, call_id, ServiceUnavailable("the services here are closed"), "")

    def _run(self, origin: Address, body: Mapping[str, Any]) -> None:
        call_id = body.get("id")
        try:
            fn = self._method(str(body.get("path")), str(body.get("method")))
            args = body.get("args") or []
            kwargs = body.get("kwargs") or {}
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise TypeError("a call's args must be a list and its kwargs a dict")
            token = _context.set(CallContext(True, origin.worker, origin))
            try:
                if inspect.iscoroutinefunction(fn):
                    result = asyncio.run_coroutine_threadsafe(
                        _with_context(fn(*args, **kwargs), CallContext(True, origin.worker, origin)), self._aio()
                    ).result()
                else:
                    result = fn(*args, **kwargs)
            finally:
                _context.reset(token)
        except Exception as exc:
            self._reply_error(origin, call_id, exc, traceback.format_exc())
        else:
            self._reply(origin, call_id, True, result)
        finally:
            self._room.release()

    def _method(self, path: str, method: str) -> Callable[..., Any]:
        with self._lock:
            exposed = self._exposed.get(path)
        if exposed is None:
            raise ServiceUnavailable(f"{path!r} is not served here any more")
        if method not in exposed.methods:
            raise AttributeError(f"{path!r} does not expose a method {method!r}")
        fn: Callable[..., Any] = getattr(exposed.store, method)
        return fn

    def _reply(self, origin: Address, call_id: Any, ok: bool, value: Any) -> None:
        try:
            self.hub.publish(self.topic, {"t": "reply", "id": call_id, "ok": ok, "value": value}, to=origin)
        except (TypeError, ValueError) as exc:  # the result cannot be encoded: say so
            self._reply_error(origin, call_id, exc, "")
        except RuntimeError:  # the hub closed meanwhile
            pass

    def _reply_error(self, origin: Address, call_id: Any, exc: BaseException, details: str) -> None:
        message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
        body = {"t": "reply", "id": call_id, "ok": False, "type": type(exc).__name__, "message": message,
                "traceback": details}
        try:
            self.hub.publish(self.topic, body, to=origin)
        except RuntimeError:  # the hub closed meanwhile
            pass

    def _aio(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="clustersync-service-loop", daemon=True).start()
                self._loop = loop
            return self._loop

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Unexpose this worker's services; pending calls fail with ``ServiceUnavailable``. Safe twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
            paths = list(self._exposed)
        for path in paths:
            try:
                self.unexpose(path)
            except RuntimeError:  # the hub is closed: its entries went with it
                pass
        for p in pending:
            if not p.future.done():
                p.future.set_exception(ServiceUnavailable("these services were closed while the call was pending"))
        self._unwatch()
        self._sub.unsubscribe()
        self._pool.shutdown(wait=False, cancel_futures=True)
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def __enter__(self) -> "Services":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class RemoteService:
    """A proxy of a remote path: ``proxy.get(1)`` is ``services.call(path, "get", 1)``
    (``await proxy.get(1)`` and ``call_async`` for the asyncio proxy)."""

    def __init__(self, services: Services, path: str, asynchronous: bool = False) -> None:
        self._services = services
        self._path = path
        self._call = services.call_async if asynchronous else services.call

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self._call, self._path, method)

    def on(self, event: str, listener: Callable[[Any, Dict[str, Any]], Any]) -> None:
        """Listen to the service's events (needs ``Services(events=...)``)."""
        if self._services.events is None:
            raise RuntimeError("events need Services(..., events=SyncedEmitter(...))")
        self._services.events.on(self._path, event, listener)

    def __repr__(self) -> str:
        return f"<RemoteService {self._path!r}>"


async def _with_context(coro: Any, ctx: CallContext) -> Any:
    _context.set(ctx)
    return await coro


def _not_on_a_delivery_thread() -> None:
    """A blocking call on the thread that would deliver its answer can only time out: refuse it at once.

    Every thread that hands messages to hubs says so (``message.delivering_on``): the relay link's reader
    and whatever thread holds its reading role, and the in-process drivers' delivery threads."""
    if delivering():
        raise RuntimeError(
            "a blocking call from a subscription callback would wait for an answer that the same thread "
            "delivers: call from another thread, or schedule call_async on your event loop"
        )


def _check_path(path: object) -> None:
    if not isinstance(path, str) or not path or "|" in path:
        raise ValueError(f"a service path must be a non-empty str without '|', not {path!r:.40}")


def _selected(selector: Selector, path: str) -> bool:
    if selector is None:
        return True
    if callable(selector):
        return bool(selector(path))
    return path in selector

