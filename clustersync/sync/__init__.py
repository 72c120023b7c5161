"""Sync drivers: how hubs in different threads, processes or hosts reach each other."""

from ..primary import setup_primary_cluster
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
