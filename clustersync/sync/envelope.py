"""Envelopes: a message as one text or bytes payload, for drivers that move payloads over a server.

:func:`encode_envelope`/:func:`decode_envelope` are the text (JSON) form,
for a backplane that carries text; :func:`pack`/:func:`unpack` the compact
binary form the Redis, Postgres and NATS drivers use. A driver that cannot
route ``to=`` itself broadcasts the envelope and lets each receiver keep
only what :func:`is_for` it.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, Dict, Optional, Tuple, Union

from ..message import Address, Destination, Message

__all__ = ["encode_envelope", "decode_envelope", "is_for", "pack", "unpack"]

_VERSION = 2


def encode_envelope(origin: Address, msg: Message, to: Optional[Destination] = None) -> str:
    """Return ``msg`` as JSON text stamped with the sender's ``origin`` (for echo suppression) and ``to``.

    ``bytes`` data is base64-encoded; ``str`` data is carried as text.
    """
    data = msg.data
    env: Dict[str, Any] = {"v": _VERSION, "w": origin.worker, "id": origin.hub, "ns": msg.namespace, "topic": msg.topic}
    if isinstance(data, (bytes, bytearray, memoryview)):
        env["b64"] = base64.b64encode(data).decode("ascii")
    elif isinstance(data, str):
        env["text"] = data
    else:
        raise TypeError(f"envelope data must be bytes or str, not {type(data).__name__}")
    if isinstance(to, Address):
        env["to"] = [to.worker, to.hub]
    elif to is not None:
        env["to"] = int(to)
    return json.dumps(env, ensure_ascii=False, separators=(",", ":"))


def decode_envelope(raw: Union[str, bytes, bytearray]) -> Optional[Tuple[Address, Message, Optional[Destination]]]:
    """Return ``(origin, Message, to)`` from envelope text, or None for anything malformed.

    Never raises.
    """
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).decode("utf-8")
        if not isinstance(raw, str):
            return None
        env = json.loads(raw)
        if not isinstance(env, dict) or env.get("v") != _VERSION:
            return None
        worker, hub_id, ns, topic = env.get("w"), env.get("id"), env.get("ns"), env.get("topic")
        if not (type(worker) is int and isinstance(hub_id, str) and hub_id and isinstance(ns, str) and isinstance(topic, str)):
            return None
        if "b64" in env and "text" not in env:
            b64 = env["b64"]
            if not isinstance(b64, str):
                return None
            data: Union[str, bytes] = base64.b64decode(b64.encode("ascii"), validate=True)
        elif "text" in env and "b64" not in env:
            data = env["text"]
            if not isinstance(data, str):
                return None
        else:
            return None
        to: Optional[Destination] = None
        if "to" in env:
            raw_to = env["to"]
            if type(raw_to) is int:
                to = raw_to
            elif (
                isinstance(raw_to, list) and len(raw_to) == 2
                and type(raw_to[0]) is int and isinstance(raw_to[1], str)
            ):
                to = Address(raw_to[0], raw_to[1])
            else:
                return None
        origin = Address(worker, hub_id)
        return origin, Message(ns, topic, data, origin), to
    except Exception:  # malformed input of any kind: the promise is "never raises"
        return None


def is_for(to: Optional[Destination], address: Address) -> bool:
    """True if a message sent ``to`` this destination is for the hub at ``address``."""
    if to is None:
        return True
    if isinstance(to, Address):
        return to == address
    return to == address.worker


# -- the binary envelope of the network drivers (Redis, Postgres, NATS) ---------------

_MAGIC = b"CS\x01"
# magic, node (8 bytes), origin worker, destination kind, destination worker, then four name lengths
_HEAD = struct.Struct("!3s8siBiHHHH")
_TO_NONE, _TO_WORKER, _TO_HUB = 0, 1, 2

#: What :func:`unpack` returns: ``(node, origin, namespace, topic, data, to)``.
Unpacked = Tuple[bytes, Address, str, str, bytes, Optional[Destination]]


def pack(node: bytes, origin: Address, namespace: str, topic: str, data: bytes, to: Optional[Destination] = None) -> bytes:
    """Return one message as bytes: the sending ``node`` (8 bytes, for echo suppression), the origin, ``to`` and the data.

    ``data`` is the hub's encoded payload, carried as it is.
    """
    hub = origin.hub.encode()
    ns = namespace.encode()
    tp = topic.encode()
    if to is None:
        kind, to_worker, to_hub = _TO_NONE, 0, b""
    elif isinstance(to, Address):
        kind, to_worker, to_hub = _TO_HUB, to.worker, to.hub.encode()
    else:
        kind, to_worker, to_hub = _TO_WORKER, int(to), b""
    head = _HEAD.pack(_MAGIC, node, origin.worker, kind, to_worker, len(hub), len(ns), len(tp), len(to_hub))
    return b"".join((head, hub, ns, tp, to_hub, data))


def unpack(raw: bytes) -> Optional[Unpacked]:
    """Return ``(node, origin, namespace, topic, data, to)`` from :func:`pack`'s bytes, or None if malformed. Never raises."""
    try:
        size = _HEAD.size
        if len(raw) < size or raw[:3] != _MAGIC:
            return None
        _m, node, worker, kind, to_worker, lh, ln, lt, lto = _HEAD.unpack_from(raw)
        end = size + lh + ln + lt + lto
        if end > len(raw) or kind > _TO_HUB or lh == 0:
            return None
        view = raw
        hub = view[size : size + lh].decode()
        ns = view[size + lh : size + lh + ln].decode()
        tp = view[size + lh + ln : size + lh + ln + lt].decode()
        to: Optional[Destination] = None
        if kind == _TO_WORKER:
            to = to_worker
        elif kind == _TO_HUB:
            to = Address(to_worker, view[end - lto : end].decode())
        return node, Address(worker, hub), ns, tp, bytes(view[end:]), to
    except (UnicodeDecodeError, struct.error):
        return None
