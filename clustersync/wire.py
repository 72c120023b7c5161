"""The relay's frame format, shared by the primary and the workers.

A frame is a fixed 14-byte header, the channel name, then an opaque body::

    <I body_len> <B kind> <B channel_len> <H origin> <H dest> <I count>
    channel (channel_len bytes)  body (body_len - channel_len bytes)

``body_len`` counts everything after the header. ``origin`` is the sending
worker's index, ``dest`` a worker index or ``BROADCAST``, ``count`` the number
of messages in a DATA frame (so the primary can count drops without decoding
anything). The primary routes on the header and the channel alone.

A DATA frame's body is one or more message records. A record starts with
``<I size>``. If its top bit (``SAME_META``) is set, the record is
``size & ~SAME_META`` bytes of data with the same origin, namespace and topic
as the record before it in this frame. Otherwise the data (``size`` bytes)
follows its metadata::

    <I size> <B origin_len> <H namespace_len> <H topic_len> origin namespace topic data

Only the workers read records.
"""

from __future__ import annotations

import struct
from typing import Iterator, Tuple

__all__ = [
    "HEADER",
    "SIZE",
    "META",
    "SAME_META",
    "BROADCAST",
    "DATA",
    "SUB",
    "UNSUB",
    "ACK",
    "PING",
    "PONG",
    "READY",
    "STOP",
    "ProtocolError",
    "pack_frame",
    "pack_record",
    "iter_records",
]

HEADER = struct.Struct("<IBBHHI")
SIZE = struct.Struct("<I")
META = struct.Struct("<BHH")
SAME_META = 0x80000000
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
STOP = 8  # primary -> worker: everything before this frame is delivered; stop now
KINDS = frozenset({DATA, SUB, UNSUB, ACK, PING, PONG, READY, STOP})


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


def pack_record(origin: bytes, namespace: bytes, topic: bytes, data: bytes, same: bool = False) -> bytes:
    """Return one message record; ``same``: reuse the previous record's metadata."""
    if same:
        return SIZE.pack(len(data) | SAME_META) + data
    return (
        SIZE.pack(len(data))
        + META.pack(len(origin), len(namespace), len(topic))
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
    meta = None
    while pos < end:
        if end - pos < SIZE.size:
            raise ProtocolError("truncated record size")
        (size,) = SIZE.unpack_from(body, pos)
        pos += SIZE.size
        if size & SAME_META:
            if meta is None:
                raise ProtocolError("the first record of a frame has no metadata")
            size &= ~SAME_META
        else:
            if end - pos < META.size:
                raise ProtocolError("truncated record metadata")
            olen, nlen, tlen = META.unpack_from(body, pos)
            pos += META.size
            if pos + olen + nlen + tlen > end:
                raise ProtocolError("record metadata runs past the end of its frame")
            origin = body[pos : pos + olen]
            pos += olen
            ns = body[pos : pos + nlen]
            pos += nlen
            topic = body[pos : pos + tlen]
            pos += tlen
            meta = (origin, ns, topic)
        stop = pos + size
        if stop > end:
            raise ProtocolError("record runs past the end of its frame")
        yield meta[0], meta[1], meta[2], body[pos:stop]
        pos = stop
