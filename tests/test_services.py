"""Services across workers: five workers through the real relay, and the same API on broadcast_channel."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from typing import Any, Dict, List

import pytest

from clustersync import Hub
from clustersync.relay.primary import Primary
from clustersync.services import Services, ServiceUnavailable, call_context
from clustersync.sync import broadcast_channel

from . import workers

EXPOSE = {0: [], 1: ["todos", "solo"], 2: ["todos", "victim", "retry"], 3: ["todos", "retry"], 4: []}


def _next(results: Any, kind: str, deadline: float, seen: List[Any]) -> Any:
    while True:
        for item in seen:
            if item[0] == kind:
                seen.remove(item)
                return item
        try:
            seen.append(results.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no {kind!r} within the deadline; got {seen}") from None


@pytest.mark.timeout(120)
def test_services_across_five_workers() -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    phase, go_late, finished = ctx.Barrier(5), ctx.Event(), ctx.Event()
    primary = Primary(start_method="fork", workers=5)
    seen: List[Any] = []
    try:
        handles = {i: primary.fork(workers.services_node, results, phase, go_late, finished, EXPOSE[i], index=i)
                   for i in range(5)}
        deadline = time.monotonic() + 90
        _, _, out = _next(results, "report", deadline, seen)
        # Worker 2 hangs in two calls; kill it and see both callers hear of it at once.
        _next(results, "hanging", deadline, seen)
        _next(results, "hanging", deadline, seen)
        # Worker 2's queue feeder may still hold the queue's shared write lock just after its
        # report arrived; killing it then would block every later put. Wait it out.
        with results._wlock:  # type: ignore[attr-defined]
            killed_at = time.monotonic()
            os.kill(handles[2].pid, signal.SIGKILL)
        _, _, outcome = _next(results, "after-kill", deadline, seen)
        done = {item[1]: item for item in (_next(results, "done", deadline, seen) for _ in range(3))}
    finally:
        finished.set()
        primary.close(timeout=5)
        results.close()

    assert out["forms"] == [1, 2, 3, 4]  # proxy, call, async proxy, call_async
    context = out["context"]
    assert context["remote"] is True and context["caller"] == 0
    assert out["spread"] == [1] * 33 + [2] * 33 + [3] * 33  # round-robin over the three providers
    assert out["available"] == {"todos": [1, 2, 3], "solo": [1], "victim": [2], "retry": [2, 3]}
    assert out["gather"] == {1: 1, 2: 2, 3: 3}
    assert out["errors"] == [
        ("ValueError", "a bad value"),  # a built-in type arrives as itself
        ("Registered", "registered"),  # so does a registered one
        ("RemoteError", "Unregistered", "not registered", True),  # else RemoteError, with the remote traceback
        ("AttributeError", "'todos' does not expose a method 'missing'"),
        ("ServiceUnavailable", True),  # no provider: at once
        ("TimeoutError",),
    ]
    assert out["health"] == [200, 404]
    started, ended = out["solo"]
    assert any(started < t < ended for t in done[1][3])  # worker 1's pub/sub ran during its slow call
    assert out["late"] == 4  # exposed after the start, found by waiting for it
    assert done[4][2] == 1  # unicast: the late worker received the one call addressed to it, nothing else
    assert outcome["victim"] != "returned" and outcome["victim"] - killed_at < 1.0  # failed at once
    assert outcome["retry"] == [3, 3]  # the idempotent call was retried on worker 3


def test_services_on_broadcast_channel_threads() -> None:
    a = Services(Hub(sync=broadcast_channel(channel="svc-threads")), methods=["whoami"], errors=[workers.Registered])
    b = Services(Hub(sync=broadcast_channel(channel="svc-threads")), timeout=5.0)

    class Store:
        def get(self, item: int) -> List[Any]:
            ctx = call_context()
            return [item, ctx is not None and ctx.from_remote]

        def whoami(self) -> str:
            return "a"

    try:
        assert b.available() == {}
        with pytest.raises(ServiceUnavailable):
            b.call("store", "get", 1)
        a.expose("store", Store())
        assert b.available() == {"store": [-1]}
        assert b.remote("store").get(7) == [7, True]
        assert b.call("store", "whoami") == "a"
        assert a.call("store", "whoami") == "a"  # the worker's own provider is one like any other
        assert Store().get(1) == [1, False]  # a plain local call has no call context
        a.unexpose("store")
        with pytest.raises(ServiceUnavailable):
            b.call("store", "get", 1)
        assert b.healthcheck()[0] == 404
    finally:
        a.close()
        b.close()


def test_closing_fails_pending_calls_and_withdraws_services() -> None:
    hub_a, hub_b = Hub(sync=broadcast_channel(channel="svc-close")), Hub(sync=broadcast_channel(channel="svc-close"))
    a, b = Services(hub_a, methods=["wait"]), Services(hub_b)
    import threading

    release = threading.Event()

    class Store:
        def wait(self) -> str:
            release.wait(10)
            return "late"

    a.expose("store", Store())
    errors: List[Any] = []
    caller = threading.Thread(target=lambda: _call(b, errors))
    caller.start()
    while not a._pending and not b._pending:  # the call is on its way
        if not caller.is_alive():
            break
        time.sleep(0.001)
    b.close()
    caller.join(5)
    release.set()
    assert errors and isinstance(errors[0], ServiceUnavailable)
    a.close()
    c = Services(Hub(sync=broadcast_channel(channel="svc-close")))
    assert c.available() == {}  # a's services went with it
    c.close()
    hub_a.close()
    hub_b.close()


def _call(services: Services, errors: List[Any]) -> None:
    try:
        services.call("store", "wait")
    except Exception as exc:
        errors.append(exc)


def test_options_hooks_filters_and_remote_paths() -> None:
    seen: List[Any] = []
    hooks = {"before": [lambda c: seen.append(("before", c["method"]))],
             "after": [lambda c: seen.append(("after", c["result"]))],
             "error": [lambda c: seen.append(("error", type(c["error"]).__name__))]}
    a = Services(Hub(sync=broadcast_channel(channel="svc-opts")), services=["public"])
    b = Services(Hub(sync=broadcast_channel(channel="svc-opts")), hooks=hooks,
                 remote_services=lambda p: p != "hidden", remote_path=lambda p: "remote-" + p)

    class Store:
        def get(self, item: int) -> int:
            return item * 2

    try:
        with pytest.raises(ValueError, match="services="):
            a.expose("internal", Store())
        a.expose("public", Store())
        assert b.available() == {"remote-public": [-1]}
        assert b.call("remote-public", "get", 21) == 42
        with pytest.raises(ServiceUnavailable):
            b.call("remote-nothing", "get", 1)
        assert seen == [("before", "get"), ("after", 42), ("before", "get"), ("error", "ServiceUnavailable")]
    finally:
        a.close()
        b.close()


def test_a_hub_without_presence_is_refused() -> None:
    with pytest.raises(RuntimeError, match="presence"):
        Services(Hub())
    with pytest.raises(TypeError):
        Services("not a hub")  # type: ignore[arg-type]


def test_healthcheck_says_503_when_a_provider_does_not_answer() -> None:
    import threading

    hub_a = Hub(sync=broadcast_channel(channel="svc-health"))
    hub_b = Hub(sync=broadcast_channel(channel="svc-health"))
    a, b = Services(hub_a), Services(hub_b)

    class Store:
        def get(self, item: int) -> int:
            return item

    gate = threading.Event()
    blocked = threading.Event()
    hub_a.subscribe("block", lambda m: (blocked.set(), gate.wait(10)))
    try:
        a.expose("store", Store())
        assert b.healthcheck(timeout=2.0) == (200, {"key": "default", "services": {"store": [-1]}, "silent": []})
        hub_b.publish("block", "hold a's delivery thread")
        assert blocked.wait(5)
        status, detail = b.healthcheck(timeout=0.3)
        assert status == 503 and detail["silent"] == [str(hub_a.address)]
    finally:
        gate.set()
        a.close()
        b.close()
        hub_a.close()
        hub_b.close()


def test_service_events_reach_the_proxies_listeners() -> None:
    import threading

    from clustersync.events import SyncedEmitter

    hub_a = Hub(sync=broadcast_channel(channel="svc-events"))
    hub_b = Hub(sync=broadcast_channel(channel="svc-events"))
    a = Services(hub_a, events=SyncedEmitter(hub_a, key="svc"))
    b = Services(hub_b, events=SyncedEmitter(hub_b, key="svc"))

    class Todos:
        def create(self, data: Dict[str, Any]) -> Dict[str, Any]:
            return dict(data, id=1)

    got: List[Any] = []
    heard = threading.Event()
    try:
        a.expose("todos", Todos())
        todos = b.remote("todos")
        todos.on("created", lambda data, ctx: (got.append((data, ctx["synced"])), heard.set()))
        assert todos.create({"text": "x"}) == {"text": "x", "id": 1}
        assert heard.wait(5)
        assert got == [({"text": "x", "id": 1}, True)]
    finally:
        a.close()
        b.close()
        hub_a.close()
        hub_b.close()


def test_a_blocking_call_from_a_delivery_callback_is_refused_at_once() -> None:
    import threading

    hub_a, hub_b = Hub(sync=broadcast_channel(channel="svc-cb")), Hub(sync=broadcast_channel(channel="svc-cb"))
    a, b = Services(hub_a), Services(hub_b)

    class Store:
        def get(self, item: int) -> int:
            return item

    errors: List[Any] = []
    done = threading.Event()

    def callback(msg: Any) -> None:
        try:
            b.call("store", "get", 1)
        except RuntimeError as exc:
            errors.append(str(exc))
        done.set()

    try:
        a.expose("store", Store())
        hub_b.subscribe("poke", callback)
        hub_a.publish("poke", "call from your callback")
        assert done.wait(5)
        assert errors and "call_async" in errors[0]
    finally:
        a.close()
        b.close()
        hub_a.close()
        hub_b.close()
