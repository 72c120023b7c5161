"""The relay's frame format, shared by the primary and the workers.

A frame is a fixed 14-byte header, the channel name, then an opaque body::

    <I body_len> <B kind> <B channel_len> <H origin> <H dest> <I count>
    channel (channel_len bytes)  body (body_len - channel_len bytes)

``body_len`` counts everything after the header. ``origin`` is the sending
worker's index, ``dest`` a worker index or ``BROADCAST``, ``count`` the number
of messages in a DATA frame (so the primary can count drops without decoding
anything). The primary routes on the header and the channel alone.

A DATA frame's body is one or more message records::

    <I data_len> <B origin_len> <H namespace_len> <H topic_len>
    origin namespace topic data

Only the workers read records.
"""

from __future__ import annotations

import struct
from typing import Iterator, Tuple

__all__ = [
    "HEADER",
    "RECORD",
    "BROADCAST",
    "DATA",
    "SUB",
    "UNSUB",
    "ACK",
    "PING",
    "PONG",
    "READY",
    "ProtocolError",
    "pack_frame",
    "pack_record",
    "iter_records",
]

HEADER = struct.Struct("<IBBHHI")
RECORD = struct.Struct("<IBHH")
HEADER_SIZE = HEADER.size
BROADCAST = 0xFFFF
MAX_WORKERS = 0xFFFE

# Frame kinds.
DATA = 1  # worker -> primary -> workers: message records
SUB = 2  # worker -> primary: one more hub on this channel in this worker
UNSUB = 3  # worker -> primary: one hub fewer
ACK = 4  # primary -> worker: SUB seen; the channel is live for this worker
PING = 5  # primary -> worker: are you alive?
PONG = 6  # worker -> primary: yes
READY = 7  # worker -> primary: the application says it is ready
KINDS = frozenset({DATA, SUB, UNSUB, ACK, PING, PONG, READY})


class ProtocolError(ValueError):
    """A frame or record that breaks the wire format."""


def pack_frame(
    kind: int, channel: bytes, origin: int, dest: int = BROADCAST, body: bytes = b"", count: int = 0
) -> bytes:
    """Return one whole frame."""
    if len(channel) > 255:
        raise ValueError("channel name is longer than 255 bytes")
    return (
        HEADER.pack(len(channel) + len(body), kind, len(channel), origin, dest, count)
        + channel
        + body
    )


def pack_record(origin: bytes, namespace: bytes, topic: bytes, data: bytes) -> bytes:
    """Return one message record for a DATA frame's body."""
    return (
        RECORD.pack(len(data), len(origin), len(namespace), len(topic))
        + origin
        + namespace
        + topic
        + data
    )


def iter_records(body: bytes, start: int = 0) -> Iterator[Tuple[bytes, bytes, bytes, bytes]]:
    """Yield ``(origin, namespace, topic, data)`` for each record in ``body[start:]``.

    Raises ``ProtocolError`` on a truncated or inconsistent record.
    """
    end = len(body)
    pos = start
    unpack = RECORD.unpack_from
    rsize = RECORD.size
    while pos < end:
        if end - pos < rsize:
            raise ProtocolError("truncated record header")
        data_len, olen, nlen, tlen = unpack(body, pos)
        pos += rsize
        stop = pos + olen + nlen + tlen + data_len
        if stop > end:
            raise ProtocolError("record runs past the end of its frame")
        o = body[pos : pos + olen]
        pos += olen
        n = body[pos : pos + nlen]
        pos += nlen
        t = body[pos : pos + tlen]
        pos += tlen
        yield o, n, t, body[pos:stop]
        pos = stop
