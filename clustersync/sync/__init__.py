"""Sync drivers: how hubs in different threads, processes or hosts reach each other.

``setup_primary_cluster`` is also here, for the primary's side of ``cluster``;
it is imported on first use, so drivers that do not need the relay never load it.
"""

from typing import Any

from .base import DriverFactory, SyncDriver, check_channel
from .broadcast import broadcast_channel
from .cluster import cluster
from .envelope import decode_envelope, encode_envelope

__all__ = [
    "SyncDriver",
    "DriverFactory",
    "broadcast_channel",
    "check_channel",
    "cluster",
    "decode_envelope",
    "encode_envelope",
    "setup_primary_cluster",
]


def __getattr__(name: str) -> Any:
    if name == "setup_primary_cluster":
        from ..relay.primary import setup_primary_cluster

        return setup_primary_cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
