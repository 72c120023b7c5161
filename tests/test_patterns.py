"""Pattern subscriptions on one hub: the matching rules, bad patterns, unsubscribe and churn."""

from __future__ import annotations

from typing import Any, List

import pytest

from clustersync import Hub
from clustersync.topics import compile_pattern, is_pattern

TABLE = [
    ("orders.*", "orders.new", True),
    ("orders.*", "orders", False),
    ("orders.*", "orders.new.eu", False),
    ("orders.>", "orders.new", True),
    ("orders.>", "orders.new.eu", True),
    ("orders.>", "orders", False),
    ("*.new", "orders.new", True),
    ("*.new", "orders.old", False),
    ("*.*.eu", "orders.new.eu", True),
    ("*", "orders", True),
    ("*", "orders.new", False),
    (">", "orders", True),
    (">", "a.b.c.d", True),
    ("orders.*.>", "orders.new", False),
    ("orders.*.>", "orders.new.eu", True),
    ("a.*", "a.", True),  # an empty token is a token
    ("a.*b", "a.xb", False),  # not a wildcard: only a whole token is
]


@pytest.mark.parametrize("pattern,topic,expected", TABLE)
def test_matching_follows_nats_rules(pattern: str, topic: str, expected: bool) -> None:
    assert compile_pattern(pattern)(topic) is expected


def test_what_is_a_pattern() -> None:
    assert is_pattern("orders.*") and is_pattern(">") and is_pattern("a.>")
    assert not is_pattern("orders.new") and not is_pattern("a*.b") and not is_pattern("a.b>") and not is_pattern("")


def test_bad_patterns_and_publishing_to_a_pattern_raise_at_once() -> None:
    with Hub() as hub:
        with pytest.raises(ValueError, match="may only be the last token"):
            hub.subscribe("orders.>.eu")
        for topic in ("orders.*", "orders.>", "*"):
            with pytest.raises(ValueError, match="wildcards are for subscribe"):
                hub.publish(topic, 1)
        hub.publish("orders.*x", 1)  # "*x" is a token like any other


def test_local_delivery_unsubscribe_and_the_concrete_topic() -> None:
    with Hub() as hub:
        got: List[Any] = []
        sub = hub.subscribe("orders.*", lambda m: got.append((m.topic, m.data)))
        exact: List[Any] = []
        hub.subscribe("orders.new", lambda m: exact.append(m.data))
        hub.publish("orders.new", 1)
        hub.publish("orders.paid", 2)
        hub.publish("invoices.new", 3)
        assert got == [("orders.new", 1), ("orders.paid", 2)] and exact == [1]
        assert hub.stats()["subscriptions"] == 2
        sub.unsubscribe()
        hub.publish("orders.new", 4)
        assert got == [("orders.new", 1), ("orders.paid", 2)] and exact == [1, 4]
        assert hub.stats()["subscriptions"] == 1


def test_a_queue_subscription_to_a_pattern() -> None:
    with Hub() as hub:
        sub = hub.subscribe("sensors.>")
        hub.publish("sensors.a.temp", 21.5)
        hub.publish("other", 0)
        msg = sub.get(timeout=1)
        assert (msg.topic, msg.data) == ("sensors.a.temp", 21.5)
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.05)


def test_churn_keeps_the_tables_bounded_and_right() -> None:
    """Thousands of topics and subscribe/unsubscribe cycles: the match cache stays bounded, nothing leaks."""
    with Hub() as hub:
        got: List[str] = []
        keep = hub.subscribe("t.*", lambda m: got.append(m.topic))
        for i in range(5000):
            sub = hub.subscribe(f"x{i}.>", lambda m: None)
            hub.publish(f"t.{i}", i)
            hub.publish(f"x{i}.y", i)
            sub.unsubscribe()
        assert len(got) == 5000 and got[-1] == "t.4999"
        assert len(hub._patterns) == 1 and len(hub._matchers) == 1 and len(hub._matched) <= 4096
        for i in range(5000):
            hub.publish(f"t.{i}", i)
        assert len(hub._matched) <= 4096
        keep.unsubscribe()
        assert not hub._patterns and not hub._matchers
