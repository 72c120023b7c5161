"""The Hub on its own: local delivery, codec, errors, bounds, closing."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, List, Tuple

import pytest

from clustersync import Address, Hub, Message, Subscription, SubscriptionClosed
from clustersync.codec import Codec
from clustersync.sync import broadcast_channel

from .conftest import wait_for


def test_local_subscriber_gets_message_before_publish_returns() -> None:
    hub = Hub()
    got: List[Message] = []
    hub.subscribe("chat", got.append)
    hub.publish("chat", "hi")
    assert got == [Message("", "chat", "hi", hub.address)]
    assert got[0].origin == hub.address


@pytest.mark.parametrize(
    "value",
    ["text é ☃", b"\x00\xffbytes", {"a": [1, 2.5, None, True]}, [1, "x"], 42, 1.5, None, True, ""],
)
def test_values_round_trip_through_the_codec_with_their_type(value: Any) -> None:
    codec = Codec()
    out = codec.decode(codec.encode(value))
    assert out == value and type(out) is type(value)


def test_bytearray_arrives_as_bytes() -> None:
    hub = Hub()
    got: List[Any] = []
    hub.subscribe("t", lambda m: got.append(m.data))
    hub.publish("t", bytearray(b"ab"))
    assert got == [b"ab"] and type(got[0]) is bytes


def test_bad_arguments_raise_at_once() -> None:
    hub = Hub()
    with pytest.raises(TypeError, match="topic must be a str"):
        hub.publish(5, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="set"):
        hub.publish("t", {1, 2})
    with pytest.raises(TypeError, match="object"):
        hub.publish("t", object())
    with pytest.raises(TypeError, match="topic must be a str"):
        hub.subscribe(b"t")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Hub(namespace=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Hub(max_message=0)


def test_message_over_max_message_raises_value_error() -> None:
    hub = Hub(max_message=100)
    hub.publish("t", "x" * 20)
    with pytest.raises(ValueError, match="max_message"):
        hub.publish("t", "x" * 200)
    with pytest.raises(ValueError, match="max_message"):
        hub.publish("t", b"x" * 200)
    with pytest.raises(ValueError, match="max_message"):
        hub.publish("t", ["x" * 200])


def test_custom_serializer_replaces_json() -> None:
    calls: List[Any] = []

    def ser(value: Any) -> bytes:
        calls.append(value)
        return repr(sorted(value)).encode()

    hub = Hub(serializer=ser, deserializer=lambda b: set(eval(b.decode())))
    wire = hub._codec.encode({3, 1})
    assert hub._codec.decode(wire) == {1, 3}
    assert calls == [{3, 1}]
    assert hub._codec.decode(hub._codec.encode("s")) == "s"  # str still travels as itself
    with pytest.raises(ValueError):
        Hub(serializer=ser)


def test_namespaces_separate_hubs_and_publish_can_target_another() -> None:
    got: List[Tuple[str, Any]] = []
    hub = Hub(namespace="a")
    hub.subscribe("t", lambda m: got.append((m.namespace, m.data)))
    hub.publish("t", 1)
    hub.publish("t", 2, namespace="b")  # goes to namespace b: not to this hub's subscribers
    assert got == [("a", 1)]


def test_a_raising_subscriber_does_not_stop_the_others() -> None:
    errors: List[Tuple[type, str]] = []
    hub = Hub(on_error=lambda exc, stage: errors.append((type(exc), stage)))
    got: List[Any] = []

    def bad(msg: Message) -> None:
        raise KeyError("boom")

    hub.subscribe("t", bad)
    hub.subscribe("t", lambda m: got.append(m.data))
    hub.publish("t", "x")
    assert got == ["x"]
    assert errors == [(KeyError, "delivery")]
    assert hub.stats()["errors"] == 1


def test_errors_without_on_error_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    hub.subscribe("t", lambda m: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="clustersync"):
        hub.publish("t", "x")
    assert "delivery" in caplog.text and "ZeroDivisionError" in caplog.text


def test_an_on_error_that_raises_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    def on_error(exc: BaseException, stage: str) -> None:
        raise RuntimeError("handler broke")

    hub = Hub(on_error=on_error)
    hub.subscribe("t", lambda m: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="clustersync"):
        hub.publish("t", "x")  # does not raise
    assert "on_error raised" in caplog.text


OTHER = Address(7, "other")


class FailingDriver:
    name = "failing"
    capabilities: frozenset = frozenset()

    def __init__(self, fail_publish: bool = False, fail_subscribe: bool = False) -> None:
        self.fail_publish = fail_publish
        self.fail_subscribe = fail_subscribe
        self.deliver: Any = None
        self.closed = 0

    def subscribe(self, deliver: Any, on_unreachable: Any = None) -> None:
        if self.fail_subscribe:
            raise ConnectionError("backplane down")
        self.deliver = deliver

    def publish(self, msg: Message, to: Any = None) -> None:
        if self.fail_publish:
            raise ConnectionError("lost")

    def close(self) -> None:
        self.closed += 1


def test_backplane_failures_reach_on_error_with_their_stage() -> None:
    errors: List[Tuple[str, str]] = []

    def record(exc: BaseException, stage: str) -> None:
        errors.append((str(exc), stage))

    down = Hub(sync=lambda hub_id: FailingDriver(fail_subscribe=True), on_error=record)
    assert errors == [("backplane down", "subscribe")]
    assert down.wait_ready(0) is False

    driver = FailingDriver(fail_publish=True)
    hub = Hub(sync=lambda hub_id: driver, on_error=record)
    got: List[Any] = []
    hub.subscribe("t", lambda m: got.append(m.data))
    hub.publish("t", "x")  # does not raise
    assert got == ["x"]
    assert errors[-1] == ("lost", "publish")

    # A payload that does not decode is a delivery error, and the hub goes on.
    driver.deliver(Message("", "t", b"?garbage", OTHER))
    assert errors[-1][1] == "delivery"
    driver.deliver(Message("", "t", b"sok", OTHER))
    assert got == ["x", "ok"]
    hub.close()
    assert driver.closed == 1


def test_remote_echo_and_other_namespaces_are_ignored() -> None:
    driver = FailingDriver()
    hub = Hub(sync=lambda hub_id: driver)
    got: List[Any] = []
    hub.subscribe("t", lambda m: got.append(m.data))
    driver.deliver(Message("", "t", b"sown", hub.address))
    driver.deliver(Message("other", "t", b"sns", OTHER))
    driver.deliver(Message("", "t", b"syes", OTHER))
    assert got == ["yes"]


def test_close_twice_and_publish_after_close() -> None:
    hub = Hub()
    sub = hub.subscribe("t")
    hub.close()
    hub.close()
    assert hub.closed and sub.closed
    with pytest.raises(RuntimeError, match="closed"):
        hub.publish("t", "x")
    with pytest.raises(RuntimeError, match="closed"):
        hub.subscribe("t")
    with Hub() as h2:
        pass
    assert h2.closed


def test_queue_subscription_get_iter_and_timeout() -> None:
    hub = Hub()
    sub = hub.subscribe("t")
    assert isinstance(sub, Subscription)
    with pytest.raises(TimeoutError):
        sub.get(timeout=0.01)
    hub.publish("t", 1)
    hub.publish("t", 2)
    assert sub.get(timeout=1).data == 1
    sub.unsubscribe()
    sub.unsubscribe()
    assert [m.data for m in sub] == [2]  # queued messages stay readable, then iteration ends
    with pytest.raises(SubscriptionClosed):
        sub.get(timeout=1)
    hub.publish("t", 3)
    assert sub.qsize() == 0


def test_get_wakes_up_when_another_thread_publishes() -> None:
    """A waiting get() is woken by the publish itself, not by its own timeout."""
    hub = Hub()
    sub = hub.subscribe("t")
    got: List[Any] = []
    t = threading.Thread(target=lambda: got.append(sub.get(timeout=30).data))
    t.start()
    wait_for(lambda: sub._queue.cond._waiters, timeout=5)  # type: ignore[attr-defined]
    hub.publish("t", "late")
    t.join(5)  # far less than get()'s own timeout: only a wake-up ends it this soon
    assert got == ["late"]


def test_queue_overflow_drops_the_oldest_and_counts() -> None:
    hub = Hub(queue_size=3)
    sub = hub.subscribe("t")
    for i in range(5):
        hub.publish("t", i)
    assert sub.dropped == 2 and hub.stats()["dropped"] == 2
    assert [sub.get(0).data for _ in range(3)] == [2, 3, 4]


def test_context_manager_subscription() -> None:
    hub = Hub()
    with hub.subscribe("t") as sub:
        hub.publish("t", 1)
    assert sub.closed
    hub.publish("t", 2)
    assert [m.data for m in sub] == [1]


def test_async_for_local() -> None:
    """``async for`` wakes for a publish from its own loop and from another thread, and ends on unsubscribe."""
    hub = Hub()
    sub = hub.subscribe("t")

    async def until_waiting() -> None:
        while not sub._waiters:
            await asyncio.sleep(0)

    async def produce() -> None:
        await until_waiting()
        hub.publish("t", "a")
        await until_waiting()
        threading.Thread(target=hub.publish, args=("t", "b")).start()
        await until_waiting()
        sub.unsubscribe()

    async def main() -> List[Any]:
        producer = asyncio.ensure_future(produce())
        out = [m.data async for m in sub]
        await producer
        return out

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ["a", "b"]


def test_stats_counts() -> None:
    hub = Hub()
    hub.subscribe("t", lambda m: None)
    hub.subscribe("t")
    hub.publish("t", 1)
    hub.publish("u", 1)
    stats = hub.stats()
    assert stats["published"] == 2 and stats["delivered"] == 2 and stats["subscriptions"] == 2
    assert hub.wait_ready(0) is True


def test_a_remote_batch_reaches_subscribers_message_by_message() -> None:
    hub = Hub()
    order: List[str] = []
    hub.subscribe("t", lambda m: order.append("a" + m.data))
    hub.subscribe("t", lambda m: order.append("b" + m.data))
    hub._on_remote_batch("", "t", OTHER, [b"s1", b"s2", b"?bad", b"s3"])
    assert order == ["a1", "b1", "a2", "b2", "a3", "b3"]
    assert hub.stats()["errors"] == 1 and hub.stats()["received"] == 4


@pytest.mark.parametrize(
    "value, match",
    [
        ({1: "a"}, "dict key 1"),
        ({1: "x", "1": "y"}, "dict key 1"),
        ({"a": [{"b": {2: 3}}]}, "dict key 2"),
        ((1, 2), r"tuple \(1, 2\)"),
        ({"a": (1,)}, "tuple"),
    ],
)
def test_json_refuses_what_it_would_change(value: Any, match: str) -> None:
    """Local and remote subscribers see equal values: what JSON would change is refused at once."""
    for hub in (Hub(), Hub(sync=broadcast_channel(channel="values"))):
        got: List[Any] = []
        hub.subscribe("t", lambda m: got.append(m.data))
        with pytest.raises(TypeError, match=match):
            hub.publish("t", value)
        assert got == [] and hub.stats()["published"] == 0
        hub.close()


def test_a_serializer_that_keeps_tuples_and_int_keys_is_used_as_it_is() -> None:
    import pickle

    hub = Hub(serializer=pickle.dumps, deserializer=pickle.loads)
    value = {1: (2, 3)}
    assert hub._codec.decode(hub._codec.encode(value)) == value


@pytest.mark.parametrize("bad", ["\udcff", {"k": "\ud800"}, ["\udfff"]])
def test_text_that_is_not_unicode_is_refused_alike_by_local_and_backplane_hubs(bad: Any) -> None:
    for hub in (Hub(), Hub(sync=broadcast_channel(channel="surrogates"))):
        with pytest.raises(ValueError, match="Unicode"):
            hub.publish("t", bad)
        hub.close()


def test_too_deep_a_value_is_a_value_error() -> None:
    deep: List[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        Hub().publish("t", deep)


def test_names_over_the_limit_raise_at_once() -> None:
    hub = Hub(sync=broadcast_channel(channel="names"))
    with pytest.raises(ValueError, match="65535"):
        hub.publish("x" * 65_536, "data")
    with pytest.raises(ValueError, match="65535"):
        hub.publish("t", "data", namespace="é" * 40_000)
    with pytest.raises(ValueError, match="Unicode"):
        hub.publish("\udcff", "data")
    with pytest.raises(ValueError, match="65535"):
        Hub(namespace="n" * 65_536)
    assert hub.stats()["errors"] == 0
    hub.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["unsubscribe", "close"])
def test_no_callback_starts_after_unsubscribe_returns(how: str) -> None:
    """8 threads publish (4 locally, 4 through a second hub) while the subscription is closed mid-batch."""
    hub = Hub(sync=broadcast_channel(channel=f"late-{how}"))
    other = Hub(sync=broadcast_channel(channel=f"late-{how}"))
    gate = threading.Event()
    returned = threading.Event()
    started = [0]
    late = [0]

    def callback(msg: Message) -> None:
        if returned.is_set():
            late[0] += 1
        started[0] += 1
        gate.wait(20)  # the first calls hold the delivery thread: a large remote batch piles up
        sum(range(2000))

    sub = hub.subscribe("t", callback)
    stop = threading.Event()

    def publish(h: Hub) -> None:
        while not stop.is_set():
            try:
                h.publish("t", "x")
            except RuntimeError:  # the hub closed
                return

    threads = [threading.Thread(target=publish, args=(hub if i % 2 else other,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(hub._driver._queue) >= 5000, timeout=20)  # type: ignore[union-attr]
        gate.set()
        mark = started[0]
        wait_for(lambda: started[0] > mark + 20, timeout=20)  # a large batch is being delivered
        if how == "close":
            hub.close()
        else:
            sub.unsubscribe()
        returned.set()
        published = other.stats()["published"]
        wait_for(lambda: other.stats()["published"] > published + 5000, timeout=20)
    finally:
        gate.set()
        stop.set()
        for t in threads:
            t.join(10)
        hub.close()
        other.close()
    assert late[0] == 0


def test_a_callback_may_unsubscribe_itself() -> None:
    hub = Hub()
    got: List[Any] = []

    def once(msg: Message) -> None:
        got.append(msg.data)
        sub.unsubscribe()

    sub = hub.subscribe("t", once)
    hub.publish("t", 1)
    hub.publish("t", 2)
    assert got == [1] and sub.closed


def test_expected_backplane_conditions_are_one_line_bugs_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    class Driver:
        name = "full"
        capabilities: frozenset = frozenset()

        def __init__(self) -> None:
            self.fail: BaseException = BufferError("outgoing buffer full")

        def subscribe(self, deliver: Any, on_unreachable: Any = None) -> None:
            pass

        def publish(self, msg: Message, to: Any = None) -> None:
            raise self.fail

        def close(self) -> None:
            pass

    driver = Driver()
    hub = Hub(sync=lambda address: driver)
    with caplog.at_level(logging.ERROR, logger="clustersync"):
        hub.publish("t", "x")
        driver.fail = ZeroDivisionError("a bug in the driver")
        hub.publish("t", "y")
    full, bug = [r for r in caplog.records if "publish error" in r.getMessage()]
    assert "outgoing buffer full" in full.getMessage() and full.exc_info is None
    assert bug.exc_info is not None and bug.exc_info[0] is ZeroDivisionError
    hub.close()
