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

import base64
import datetime
import decimal
import json
import uuid
from typing import Any, Callable, Dict, Optional

__all__ = ["Codec", "TAG_STR", "TAG_BYTES", "TAG_VALUE", "tagged_dumps", "tagged_loads"]

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


# -- the tagged codec: Python types through JSON, without pickle ------------------

_TAG = "__cs__"


def tagged_dumps(value: Any) -> bytes:
    """Encode ``value`` as JSON that keeps Python types: a serializer for ``Hub`` and ``SyncedEmitter``.

    Besides what JSON carries, it round-trips ``datetime`` (naive or aware,
    microseconds kept; a zone becomes its fixed UTC offset), ``date``,
    ``time``, ``timedelta``, ``Decimal``, ``UUID``, ``bytes``, ``tuple``,
    ``set``, ``frozenset`` and dicts whose keys are any of these, nested
    anywhere. A special value is a one-key object ``{"__cs__": [type, value]}``;
    a dict that has that key itself is escaped the same way. Decoding builds
    only these types: unlike pickle, bytes from a peer can never run code.
    Raises ``TypeError`` naming a value it cannot encode.
    """
    try:
        text = json.dumps(_tag(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise ValueError("the value is nested too deeply to encode") from None
    except ValueError as exc:
        raise TypeError(f"cannot encode the value: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the value holds a str that is not valid Unicode text: {exc}") from None


def tagged_loads(payload: bytes) -> Any:
    """Decode what :func:`tagged_dumps` made; ``ValueError`` for anything else."""
    try:
        return json.loads(payload, object_hook=_untag)
    except (TypeError, KeyError, IndexError, ArithmeticError) as exc:
        raise ValueError(f"a malformed tagged value: {exc}") from None


def _tag(v: Any) -> Any:
    kind = type(v)
    if kind is str or kind is int or kind is float or kind is bool or v is None:
        return v
    if kind is list:
        return [_tag(x) for x in v]
    if kind is dict:
        if _TAG not in v and all(type(k) is str for k in v):
            return {k: _tag(x) for k, x in v.items()}
        return {_TAG: ["dict", [[_tag(k), _tag(x)] for k, x in v.items()]]}
    if kind is tuple:
        return {_TAG: ["tuple", [_tag(x) for x in v]]}
    if kind is set or kind is frozenset:
        return {_TAG: [kind.__name__, [_tag(x) for x in v]]}
    if kind is bytes or kind is bytearray:
        return {_TAG: ["bytes", base64.b64encode(v).decode("ascii")]}
    if kind is datetime.datetime:
        return {_TAG: ["datetime", v.isoformat()]}
    if kind is datetime.date:
        return {_TAG: ["date", v.isoformat()]}
    if kind is datetime.time:
        return {_TAG: ["time", v.isoformat()]}
    if kind is datetime.timedelta:
        return {_TAG: ["timedelta", [v.days, v.seconds, v.microseconds]]}
    if kind is decimal.Decimal:
        return {_TAG: ["decimal", str(v)]}
    if kind is uuid.UUID:
        return {_TAG: ["uuid", str(v)]}
    raise TypeError(
        f"cannot encode a value of type {kind.__name__} ({v!r:.60}): tagged_dumps takes JSON values, "
        "datetime, date, time, timedelta, Decimal, UUID, bytes, tuple, set and frozenset"
    )


def _untag(obj: Dict[str, Any]) -> Any:
    if _TAG not in obj:
        return obj
    if len(obj) != 1:
        raise ValueError(f"a tagged value with other keys: {sorted(obj)!r:.60}")
    kind, v = obj[_TAG]
    if kind == "dict":
        return {_hashable(k): x for k, x in v}
    if kind == "tuple":
        return tuple(v)
    if kind == "set":
        return {_hashable(x) for x in v}
    if kind == "frozenset":
        return frozenset(_hashable(x) for x in v)
    if kind == "bytes":
        return base64.b64decode(v.encode("ascii"), validate=True)
    if kind == "datetime":
        return datetime.datetime.fromisoformat(v)
    if kind == "date":
        return datetime.date.fromisoformat(v)
    if kind == "time":
        return datetime.time.fromisoformat(v)
    if kind == "timedelta":
        days, seconds, micros = v
        return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
    if kind == "decimal":
        return decimal.Decimal(v)
    if kind == "uuid":
        return uuid.UUID(v)
    raise ValueError(f"an unknown tagged type {kind!r:.40}")


def _hashable(x: Any) -> Any:
    try:
        hash(x)
    except TypeError:
        raise ValueError(f"a dict key or set item that is not hashable: {x!r:.60}") from None
    return x
