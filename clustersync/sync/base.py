"""The driver interface every sync backplane implements."""

from __future__ import annotations

from typing import Any, Callable, List, Protocol, runtime_checkable

from ..hub import Message
from ..link import DeliverBatch

__all__ = ["SyncDriver", "DriverFactory", "Deliver", "DeliverBatch", "check_channel", "one_by_one"]

Deliver = Callable[[Message], Any]


def one_by_one(deliver: Deliver) -> DeliverBatch:
    """Adapt a per-message ``deliver(msg)`` to a batch-aware driver's ``deliver_batch``."""

    def deliver_batch(namespace: str, topic: str, origin: str, datas: List[bytes]) -> None:
        for data in datas:
            deliver(Message(namespace, topic, data, origin))

    return deliver_batch


@runtime_checkable
class SyncDriver(Protocol):
    """What a driver factory returns, once per hub.

    ``publish(msg)`` relays ``msg`` (its ``data`` is encoded ``bytes``) to the
    other hubs on the channel; ``subscribe(deliver)`` is called once, and from
    then on every message from another hub is passed to ``deliver``;
    ``close()`` releases what the driver opened. A driver never hands a hub
    its own messages back and never re-publishes what it delivers.

    Optional: ``wait_ready(timeout) -> bool`` (the subscription is live) and
    ``stats() -> dict`` (shown in ``Hub.stats()["driver"]``).
    """

    def publish(self, msg: Message) -> None:
        """Relay ``msg`` to the other hubs on the channel. May raise; the hub reports it."""

    def subscribe(self, deliver: Deliver) -> None:
        """Start passing messages from other hubs to ``deliver``."""

    def close(self) -> None:
        """Stop and release resources. Called once, by ``Hub.close()``."""


#: A driver factory: called once per hub with the hub's id, returns a driver.
DriverFactory = Callable[[str], SyncDriver]


def check_channel(channel: object) -> str:
    """Return ``channel`` if it is a non-empty str of at most 255 UTF-8 bytes, else raise."""
    if not isinstance(channel, str):
        raise ValueError(
            f"channel must be a non-empty str naming the cluster, not {type(channel).__name__}"
        )
    if not channel:
        raise ValueError("channel must be a non-empty str naming the cluster")
    if len(channel.encode("utf-8")) > 255:
        raise ValueError("channel must be at most 255 bytes in UTF-8")
    return channel
