"""Values <-> wire bytes.

Every value a hub publishes travels as ``bytes``: one tag byte, then the
payload. ``str`` stays ``str``, ``bytes`` stays ``bytes``, anything else goes
through the hub's serializer (JSON by default) and back through its
deserializer. Drivers only ever move these opaque bytes.

The default JSON step refuses, with a ``TypeError`` naming the value, what
it would not give back equal (a tuple would come back a list, a dict key
``1`` the str ``"1"``), so that local and remote subscribers see equal values.
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


_SCALARS = (str, int, float, bool, type(None))


def _json_dumps(value: Any) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot encode a value of type {type(value).__name__}: publish str, bytes "
            f"or a JSON value, or give the Hub a serializer ({exc})"
        ) from None
    except RecursionError:
        raise ValueError("the value is nested too deeply to encode as JSON") from None
    if type(value) not in _SCALARS:
        _refuse_what_json_changes(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the value holds a str that is not valid Unicode text: {exc}") from None


def _refuse_what_json_changes(value: Any) -> None:
    """Raise ``TypeError`` for what JSON would not give back equal: tuples, and dict keys that are not str.

    Runs after ``json.dumps`` succeeded, so the value has no cycle and its
    size is bounded by the encoded text.
    """
    stack = [value]
    pop = stack.pop
    push = stack.extend
    while stack:
        v = pop()
        kind = type(v)
        if kind is dict or isinstance(v, dict):
            for key in v:
                if type(key) is not str:
                    raise TypeError(
                        f"dict key {key!r} ({type(key).__name__}) would arrive as a str: JSON keys are "
                        "str; use str keys or give the Hub a serializer that keeps them"
                    )
            push(v.values())
        elif kind is list:
            push(v)
        elif kind is tuple or isinstance(v, (tuple, list)):
            raise TypeError(
                f"{kind.__name__} {_short(v)} would arrive as a list: publish a list, or give the "
                "Hub a serializer that keeps it"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
