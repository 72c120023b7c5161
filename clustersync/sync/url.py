"""``from_url``: the network driver named by a URL's scheme."""

from __future__ import annotations

from typing import Any

from .base import DriverFactory

__all__ = ["from_url", "backplane_of", "SCHEMES"]

#: The schemes :func:`from_url` knows, and the driver each one picks.
SCHEMES = {
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "postgres": "postgres",
    "postgresql": "postgres",
    "nats": "nats",
    "tls": "nats",
}


def backplane_of(url: object, what: str = "url") -> str:
    """The backplane (``"redis"``, ``"postgres"``, ``"nats"``) that ``url``'s scheme names; else raise."""
    if not isinstance(url, str):
        raise TypeError(f"{what} must be a str, not {type(url).__name__}")
    scheme, sep, _rest = url.partition("://")
    kind = SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"no backplane for {url!r}: the URL must start with one of {known}")
    return kind


def from_url(url: str, *, channel: str, **options: Any) -> DriverFactory:
    """A driver factory for ``url``, chosen by its scheme: ``redis://``, ``rediss://``, ``unix://`` (Redis),
    ``postgres://``, ``postgresql://`` (PostgreSQL), ``nats://``, ``tls://`` (NATS).

    ``options`` go to the driver (see :func:`~clustersync.sync.redis.redis`).
    An unknown scheme raises ``ValueError`` naming the known ones.
    """
    kind = backplane_of(url)
    if kind == "redis":
        from .redis import redis

        return redis(url=url, channel=channel, **options)
    if kind == "postgres":
        from .postgres import postgres

        return postgres(conninfo=url, channel=channel, **options)
    from .nats import nats

    return nats(servers=url, channel=channel, **options)
