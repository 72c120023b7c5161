"""Sync drivers: how hubs in different threads, processes or hosts reach each other.

``cluster`` (workers of one primary), ``broadcast_channel`` (threads of one
process), and the network drivers ``redis``, ``postgres`` and ``nats`` (any
host; their client libraries are optional extras, imported when a factory is
made), with ``from_url`` to pick one by a URL's scheme.

``setup_primary_cluster`` is also here, for the primary's side of ``cluster``;
it is imported on first use, so drivers that do not need the relay never load it.
"""

from typing import Any

from .base import DriverFactory, SyncDriver, check_channel
from .broadcast import broadcast_channel
from .cluster import cluster
from .backplane import BackplaneDown
from .envelope import decode_envelope, encode_envelope, is_for, pack, unpack
from .nats import nats
from .postgres import postgres
from .redis import redis
from .url import from_url

__all__ = [
    "BackplaneDown",
    "SyncDriver",
    "DriverFactory",
    "broadcast_channel",
    "check_channel",
    "cluster",
    "decode_envelope",
    "encode_envelope",
    "from_url",
    "is_for",
    "nats",
    "pack",
    "postgres",
    "redis",
    "unpack",
    "setup_primary_cluster",
]


def __getattr__(name: str) -> Any:
    if name == "setup_primary_cluster":
        from ..relay.primary import setup_primary_cluster

        return setup_primary_cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
