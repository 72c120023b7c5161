"""Synced events: an event emitted in one worker reaches the listeners of every worker.

A :class:`SyncedEmitter` sits on a :class:`~clustersync.hub.Hub`. ``emit``
runs the local listeners first (before it returns, whether or not the
backplane is up), then publishes the event on the hub topic
``clustersync.events/<key>``, and every other emitter with the same ``key``
runs its listeners once, with ``context["synced"]`` True. A received event
is never sent on again. ``service(path, store)`` wraps an object so that
its ``create``/``update``/``patch``/``remove`` emit ``created``/``updated``/
``patched``/``removed`` with their result once they succeed.

On the wire an event is one hub message: the emitter's own codec (JSON by
default; :func:`~clustersync.codec.tagged_dumps` keeps ``datetime`` and
friends) encodes the dict ``{"key", "path", "event", "data", "context", "emitter"}``
and the hub carries the bytes. See docs/events.md.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Tuple

from .codec import Codec, Deserializer, Serializer
from .hub import Hub
from .message import NO_WORKER, Message
from .topics import Subscription

__all__ = ["SyncedEmitter", "SyncedService", "SYNC", "TOPIC_PREFIX", "Listener", "STANDARD_EVENTS"]

#: A context key: ``context[SYNC] = False`` keeps an event local (feathers-sync's ``SYNC``).
SYNC = "clustersync.sync"
#: Events go on the hub topic ``TOPIC_PREFIX + key``.
TOPIC_PREFIX = "clustersync.events/"
#: The service methods that emit an event, and the event each emits.
STANDARD_EVENTS = {"create": "created", "update": "updated", "patch": "patched", "remove": "removed"}

#: ``listener(data, context)``; a coroutine function is run on the loop it was registered from.
Listener = Callable[[Any, Dict[str, Any]], Any]

_emitter_numbers = itertools.count(1)
_RESERVED = ("path", "event", "synced", "origin")


class _Entry:
    """One registered listener: the function, the loop of a coroutine listener, and whether it runs once."""

    __slots__ = ("listener", "loop", "once")

    def __init__(self, listener: Listener, loop: Optional[asyncio.AbstractEventLoop], once: bool) -> None:
        self.listener = listener
        self.loop = loop
        self.once = once


class SyncedEmitter:
    """Emit events that every emitter with the same ``key`` sees, in every worker.

    ``hub``: the hub that carries the events (any driver). ``key``: the sync
    group; emitters with another key never see these events.
    ``receive=False``: publish events but ignore everyone else's (a CLI, a
    cron job). ``serializer``/``deserializer``: the codec of event payloads
    (default JSON; ``clustersync.codec.tagged_dumps``/``tagged_loads`` keep
    ``datetime``, ``Decimal``, ``UUID``, ``bytes``, tuples and sets).
    """

    def __init__(
        self,
        hub: Hub,
        *,
        key: str = "clustersync",
        receive: bool = True,
        serializer: Optional[Serializer] = None,
        deserializer: Optional[Deserializer] = None,
    ) -> None:
        if not isinstance(hub, Hub):
            raise TypeError(f"hub must be a Hub, not {type(hub).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty str naming the sync group")
        self.hub = hub
        self.key = key
        self.topic = TOPIC_PREFIX + key
        self.receive = receive
        self._codec = Codec(serializer, deserializer)
        #: This emitter's id: a received event that carries it is its own, and is not run twice.
        self.id = f"{hub.id}/{next(_emitter_numbers)}"
        self._lock = threading.Lock()
        self._listeners: Dict[Tuple[str, str], Tuple[_Entry, ...]] = {}
        self._sync_out: Tuple[Callable[[Dict[str, Any]], Any], ...] = ()
        self.emitted = 0
        self.received = 0
        self.malformed = 0
        self._sub: Optional[Subscription] = hub.subscribe(self.topic, self._on_message) if receive else None

    # -- listeners -------------------------------------------------------------

    def on(self, path: str, event: str, listener: Listener) -> None:
        """Call ``listener(data, context)`` for every ``event`` on ``path``, local or synced.

        A coroutine function is run on the asyncio loop running where ``on``
        is called (call it inside a coroutine); its exceptions, like any
        listener's, go to the hub's ``on_error(exc, "delivery")``.
        """
        self._add(path, event, listener, once=False)

    def once(self, path: str, event: str, listener: Listener) -> None:
        """Like :meth:`on`, for the next such event only."""
        self._add(path, event, listener, once=True)

    def off(self, path: str, event: str, listener: Listener) -> None:
        """Remove ``listener`` (registered with :meth:`on` or :meth:`once`); nothing if it is not there."""
        with self._lock:
            entries = self._listeners.get((path, event), ())
            kept = tuple(e for e in entries if e.listener != listener)
            if kept:
                self._listeners[(path, event)] = kept
            else:
                self._listeners.pop((path, event), None)

    def _add(self, path: str, event: str, listener: Listener, once: bool) -> None:
        _check_name("path", path)
        _check_name("event", event)
        if not callable(listener):
            raise TypeError("listener must be callable")
        loop = None
        if inspect.iscoroutinefunction(listener):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "a coroutine listener runs on the asyncio loop it was registered from: "
                    "call on()/once() inside a coroutine"
                ) from None
        with self._lock:
            key = (path, event)
            self._listeners[key] = self._listeners.get(key, ()) + (_Entry(listener, loop, once),)

    # -- emitting --------------------------------------------------------------

    def emit(
        self, path: str, event: str, data: Any = None, context: Optional[Mapping[str, Any]] = None, *, sync: bool = True
    ) -> None:
        """Run the local listeners of ``event`` on ``path``, then send it to every other emitter with this key.

        ``sync=False``, or a context whose :data:`SYNC` key is False, keeps it
        local. The data and context are encoded first: if they cannot be,
        ``TypeError`` names the value and no listener runs anywhere. Only the
        relay to other workers is best-effort (``on_error(exc, "publish")``).
        """
        _check_name("path", path)
        _check_name("event", event)
        extra = dict(context) if context is not None else {}
        if not isinstance(context, (Mapping, type(None))):
            raise TypeError(f"context must be a dict, not {type(context).__name__}")
        sync = sync and extra.pop(SYNC, True) is not False
        for name in _RESERVED:
            extra.pop(name, None)
        payload = {"key": self.key, "path": path, "event": event, "data": data, "context": extra, "emitter": self.id}
        wire = self._codec.encode(payload)  # raises TypeError/ValueError before anything runs
        if len(wire) >= self.hub.max_message:
            raise ValueError(f"the event is {len(wire)} bytes encoded; the hub carries less than {self.hub.max_message}")
        self.emitted += 1
        worker = self.hub.address.worker
        self._dispatch(path, event, data, extra, synced=False, origin=None if worker == NO_WORKER else worker)
        if not sync:
            return
        for fn in self._sync_out:
            try:
                out = self._codec.decode(wire)  # a copy for each, as a receiver would see it
                del out["emitter"]
                fn(out)
            except Exception as exc:
                self.hub.report(exc, "publish")
        if not self.hub.closed:
            self.hub.publish(self.topic, wire)

    def service(
        self, path: str, store: Any, *, custom_events: Optional[Mapping[str, str]] = None
    ) -> "SyncedService":
        """Wrap ``store``: its ``create``/``update``/``patch``/``remove`` (and the methods of
        ``custom_events``, ``{"method": "event"}``) emit their event with the result once they succeed."""
        return SyncedService(self, path, store, custom_events or {})

    # -- receiving -------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        """An event from another emitter (the hub's callback for the events topic)."""
        try:
            if type(msg.data) is not bytes:
                raise ValueError(f"a synced event arrived as {type(msg.data).__name__}, not bytes")
            payload = self._codec.decode(msg.data)
            path, event, context = _check_payload(payload, self.key)
        except Exception as exc:
            self.malformed += 1
            self.hub.report(exc, "delivery")
            return
        if payload.get("emitter") == self.id:
            return  # our own, already run locally
        self.received += 1
        worker = msg.origin.worker
        self._dispatch(path, event, payload["data"], context, synced=True, origin=None if worker == NO_WORKER else worker)

    def sync_in(self, payload: Mapping[str, Any]) -> None:
        """Run the listeners for ``payload`` (``{key, path, event, data, context}``) as if it had been received.

        It is not sent on. ``ValueError`` for a payload of the wrong shape or key.
        """
        path, event, context = _check_payload(payload, self.key)
        self.received += 1
        self._dispatch(path, event, payload.get("data"), context, synced=True, origin=None)

    def on_sync_out(self, fn: Callable[[Dict[str, Any]], Any]) -> None:
        """Call ``fn(payload)`` with every event this emitter syncs (to bridge to another system)."""
        if not callable(fn):
            raise TypeError("fn must be callable")
        with self._lock:
            self._sync_out = self._sync_out + (fn,)

    def _dispatch(self, path: str, event: str, data: Any, extra: Dict[str, Any], *, synced: bool, origin: Optional[int]) -> None:
        entries = self._listeners.get((path, event))
        if not entries:
            return
        fired = [e for e in entries if e.once]
        if fired:
            with self._lock:
                now = self._listeners.get((path, event), ())
                kept = tuple(e for e in now if e not in fired)
                if kept:
                    self._listeners[(path, event)] = kept
                else:
                    self._listeners.pop((path, event), None)
                entries = tuple(e for e in entries if not e.once or e in now)
        for entry in entries:
            context = dict(extra)
            context.update(path=path, event=event, synced=synced, origin=origin)
            try:
                if entry.loop is not None:
                    future = asyncio.run_coroutine_threadsafe(
                        _awaitable(entry.listener(data, context)), entry.loop
                    )
                    future.add_done_callback(self._async_done)
                else:
                    entry.listener(data, context)
            except Exception as exc:
                self.hub.report(exc, "delivery")

    def _async_done(self, future: "Any") -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self.hub.report(exc, "delivery")

    # -- state -------------------------------------------------------------------

    @property
    def sync_type(self) -> str:
        """The backplane's name: ``"cluster"``, ``"broadcast_channel"``, ...; ``"local"`` without one."""
        return self.hub.sync_type

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once the hub's backplane subscription is live (events sent from then on reach the others)."""
        return self.hub.wait_ready(timeout)

    def stats(self) -> Dict[str, Any]:
        """Counters: emitted, received, malformed."""
        return {"key": self.key, "emitted": self.emitted, "received": self.received, "malformed": self.malformed}

    def close(self) -> None:
        """Stop receiving (the hub stays open: it is yours)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.unsubscribe()


class SyncedService:
    """A store whose mutating methods emit synced events once they succeed (see :meth:`SyncedEmitter.service`).

    Calls of other methods and attribute reads go to the store as they are.
    ``emit(event, data)`` emits an event on the service's path: synced if it
    is a standard event or one of ``custom_events``, local otherwise.
    """

    def __init__(self, emitter: SyncedEmitter, path: str, store: Any, custom_events: Mapping[str, str]) -> None:
        _check_name("path", path)
        for method, event in custom_events.items():
            _check_name("method", method)
            _check_name("event", event)
            if not callable(getattr(store, method, None)):
                raise ValueError(f"custom_events names {method!r}, which the store does not have")
        self.emitter = emitter
        self.path = path
        self.store = store
        self.events: Dict[str, str] = {m: e for m, e in STANDARD_EVENTS.items() if callable(getattr(store, m, None))}
        self.events.update(custom_events)
        self._synced = frozenset(self.events.values())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        event = self.events.get(name)
        if event is None:
            return attr
        if inspect.iscoroutinefunction(attr):

            async def call_async(*args: Any, **kwargs: Any) -> Any:
                result = await attr(*args, **kwargs)
                self._emit_result(name, event, result)
                return result

            return call_async

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            self._emit_result(name, event, result)
            return result

        return call

    def _emit_result(self, method: str, event: str, result: Any) -> None:
        self.emitter.emit(self.path, event, result, {"method": method, "result": result})

    def emit(self, event: str, data: Any = None, context: Optional[Mapping[str, Any]] = None) -> None:
        """Emit ``event`` on this service's path: synced if the service declares it, local otherwise."""
        self.emitter.emit(self.path, event, data, context, sync=event in self._synced)

    def __repr__(self) -> str:
        return f"<SyncedService {self.path!r} events={sorted(self._synced)}>"


def _check_name(kind: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{kind} must be a non-empty str, not {value!r:.40}")


def _check_payload(payload: Any, key: str) -> Tuple[str, str, Dict[str, Any]]:
    """``(path, event, context)`` of a well-formed event payload for ``key``; ``ValueError`` otherwise."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"a synced event must be a dict, not {type(payload).__name__}")
    if payload.get("key") != key:
        raise ValueError(f"a synced event for key {payload.get('key')!r:.40}, not {key!r}")
    path, event, context = payload.get("path"), payload.get("event"), payload.get("context", {})
    if not isinstance(path, str) or not path or not isinstance(event, str) or not event:
        raise ValueError("a synced event needs a non-empty str path and event")
    if not isinstance(context, Mapping):
        raise ValueError(f"a synced event's context must be a dict, not {type(context).__name__}")
    return path, event, {k: v for k, v in context.items() if k not in _RESERVED}


async def _awaitable(value: Awaitable[Any]) -> Any:
    return await value

