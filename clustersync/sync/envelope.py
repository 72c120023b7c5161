"""The text envelope for drivers whose backplane carries text (JSON)."""

from __future__ import annotations

import base64
import json
from typing import Optional, Tuple, Union

from ..hub import Message

__all__ = ["encode_envelope", "decode_envelope"]

_VERSION = 1


def encode_envelope(hub_id: str, msg: Message) -> str:
    """Return ``msg`` as JSON text stamped with ``hub_id`` (for echo suppression).

    ``bytes`` data is base64-encoded; ``str`` data is carried as text.
    """
    data = msg.data
    env = {"v": _VERSION, "id": hub_id, "ns": msg.namespace, "topic": msg.topic}
    if isinstance(data, (bytes, bytearray, memoryview)):
        env["b64"] = base64.b64encode(data).decode("ascii")
    elif isinstance(data, str):
        env["text"] = data
    else:
        raise TypeError(f"envelope data must be bytes or str, not {type(data).__name__}")
    return json.dumps(env, ensure_ascii=False, separators=(",", ":"))


def decode_envelope(raw: Union[str, bytes, bytearray]) -> Optional[Tuple[str, Message]]:
    """Return ``(hub_id, Message)`` from envelope text, or None for anything malformed.

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
        hub_id, ns, topic = env.get("id"), env.get("ns"), env.get("topic")
        if not (isinstance(hub_id, str) and hub_id and isinstance(ns, str) and isinstance(topic, str)):
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
        return hub_id, Message(ns, topic, data, hub_id)
    except Exception:  # malformed input of any kind: the promise is "never raises"
        return None
