"""clustersync: pub/sub across the worker processes of one host, with the standard library alone.

Importing this package loads no relay module: ``setup_primary_cluster``,
``current_worker``, ``notify_ready``, ``WorkerContext`` and
``listen_sockets`` are imported on first use.
"""

from typing import TYPE_CHECKING, Any

from .hub import Hub
from .message import Address, DestinationUnreachable, Message
from .sync.base import BusTransport, install_bus_connector
from .topics import Subscription, SubscriptionClosed

if TYPE_CHECKING:  # pragma: no cover
    from .relay.primary import Primary, setup_primary_cluster
    from .relay.worker import WorkerContext, current_worker, notify_ready
    from .runner.sockets import listen_sockets

__version__ = "0.2.0"

__all__ = [
    "Address",
    "DestinationUnreachable",
    "Hub",
    "Message",
    "Primary",
    "Subscription",
    "SubscriptionClosed",
    "WorkerContext",
    "current_worker",
    "listen_sockets",
    "notify_ready",
    "setup_primary_cluster",
    "__version__",
]

_LAZY = {
    "Primary": "relay.primary",
    "setup_primary_cluster": "relay.primary",
    "WorkerContext": "relay.worker",
    "current_worker": "relay.worker",
    "notify_ready": "relay.worker",
    "listen_sockets": "runner.sockets",
}


def _connect_bus(path: str) -> BusTransport:
    """``cluster(address=...)`` joins a bus through the relay's peer side, loaded on first use."""
    from .relay.bus import connect

    return connect(path)


install_bus_connector(_connect_bus)  # the drivers know the relay only through this protocol


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
