"""Values <-> wire bytes.

Every value a hub publishes travels as ``bytes``: one tag byte, then the
payload. ``str`` stays ``str``, ``bytes`` stays ``bytes``, anything else goes
through the hub's serializer (JSON by default) and back through its
deserializer. Drivers only ever move these opaque bytes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

__all__ = ["Codec", "TAG_STR", "TAG_BYTES", "TAG_VALUE"]

TAG_STR = 0x73  # b"s"
TAG_BYTES = 0x62  # b"b"
TAG_VALUE = 0x76  # b"v"

_S = b"s"
_B = b"b"
_V = b"v"

Serializer = Callable[[Any], "bytes | str"]
Deserializer = Callable[[bytes], Any]


def _json_dumps(value: Any) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot encode a value of type {type(value).__name__}: publish str, bytes "
            f"or a JSON value, or give the Hub a serializer ({exc})"
        ) from None
    return text.encode("utf-8")


def _json_loads(payload: bytes) -> Any:
    return json.loads(payload)


class Codec:
    """Turns published values into tagged wire bytes and back.

    ``serializer(value) -> bytes | str`` and ``deserializer(bytes) -> value``
    replace the JSON step for values that are neither ``str`` nor ``bytes``.
    """

    __slots__ = ("serializer", "deserializer")

    def __init__(
        self,
        serializer: Optional[Serializer] = None,
        deserializer: Optional[Deserializer] = None,
    ) -> None:
        if (serializer is None) != (deserializer is None):
            raise ValueError("serializer and deserializer go together: pass both or neither")
        self.serializer: Serializer = serializer or _json_dumps
        self.deserializer: Deserializer = deserializer or _json_loads

    def encode(self, value: Any) -> bytes:
        """Return the tagged wire bytes for ``value``; ``TypeError`` if it cannot be encoded."""
        kind = type(value)
        if kind is str:
            try:
                return _S + str.encode(value, "utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"str data is not valid Unicode text: {exc}") from None
        if kind is bytes:
            return _B + bytes(value)
        if isinstance(value, (bytearray, memoryview)):
            return _B + bytes(value)
        out = self.serializer(value)
        if isinstance(out, str):
            out = out.encode("utf-8")
        elif not isinstance(out, bytes):
            raise TypeError(
                f"serializer returned {type(out).__name__}, expected bytes or str"
            )
        return _V + out

    def decode(self, wire: bytes) -> Any:
        """Return the value carried by tagged wire bytes; ``ValueError`` if malformed."""
        if not wire:
            raise ValueError("empty payload")
        tag = wire[0]
        if tag == TAG_STR:
            return wire[1:].decode("utf-8")
        if tag == TAG_BYTES:
            return wire[1:]
        if tag == TAG_VALUE:
            return self.deserializer(wire[1:])
        raise ValueError(f"unknown payload tag {tag!r}")
