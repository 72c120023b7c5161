"""clustersync: pub/sub across the worker processes of one host, with the standard library alone."""

from .hub import Hub, Message, Subscription, SubscriptionClosed
from .sockets import listen_sockets
from .worker import WorkerContext, current_worker, notify_ready

__version__ = "0.1.0"

__all__ = [
    "Hub",
    "Message",
    "Subscription",
    "SubscriptionClosed",
    "WorkerContext",
    "current_worker",
    "listen_sockets",
    "notify_ready",
    "__version__",
]
