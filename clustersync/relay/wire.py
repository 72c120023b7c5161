"""The relay's frame format and its one parser, shared by the primary and the workers.

A frame is a fixed 14-byte header, the channel name, then an opaque body::

    <I body_len> <B kind> <B channel_len> <H origin> <H dest> <I count>
    channel (channel_len bytes)  body (body_len - channel_len bytes)

``body_len`` counts everything after the header. ``origin`` is the sending
worker's index (the primary refuses a frame whose origin is not its sender,
so a worker cannot speak for another), ``dest`` a worker index or
``BROADCAST``, ``count`` the number of messages in a DATA frame.

A DATA frame's body is one or more message records. A record starts with
``<I size>``. If its top bit (``SAME_META``) is set, the record is
``size & ~SAME_META`` bytes of data with the same metadata as the record
before it in this frame. Otherwise its metadata comes first::

    <I size> <B origin_len> <B to_len> <H namespace_len> <H topic_len> origin to namespace topic data

``origin`` is the publishing hub's id within its worker; ``to`` is empty, or
the id of the one hub (in worker ``dest``) the record is for. Names are UTF-8.

:func:`check_records` (the primary, before it relays a frame) and
:func:`parse_records` (a worker, before it delivers one) are the only record
parsers. Both check every bound and raise nothing but :class:`ProtocolError`.
An UNREACHABLE frame tells a publishing hub that ``count`` of its addressed
messages found nobody: its body is ``publisher hub id NUL [to hub id]``, its
``dest`` the publisher's worker and its ``origin`` the worker they were for.
"""

from __future__ import annotations

import struct
from typing import Any, List, Optional, Tuple

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "SIZE",
    "META",
    "SAME_META",
    "BROADCAST",
    "MAX_WORKERS",
    "DATA",
    "SUB",
    "UNSUB",
    "ACK",
    "PING",
    "PONG",
    "READY",
    "STOP",
    "UNREACHABLE",
    "KINDS",
    "ProtocolError",
    "pack_frame",
    "pack_record",
    "check_records",
    "parse_records",
    "record_overhead",
    "max_body",
    "FRAME_TARGET",
    "MAX_RECORD_OVERHEAD",
    "Run",
]

HEADER = struct.Struct("<IBBHHI")
SIZE = struct.Struct("<I")
META = struct.Struct("<BBHH")
SAME_META = 0x80000000
SIZE_MASK = SAME_META - 1
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
UNREACHABLE = 9  # primary or worker -> worker: addressed messages of a hub there found nobody
KINDS = frozenset({DATA, SUB, UNSUB, ACK, PING, PONG, READY, STOP, UNREACHABLE})

#: One run of records: (origin hub id, to hub id, namespace, topic, datas), names decoded.
Run = Tuple[str, str, str, str, List[bytes]]


class ProtocolError(ValueError):
    """A frame or record that breaks the wire format."""


def record_overhead(origin: bytes, to: bytes, namespace: bytes, topic: bytes) -> int:
    """Bytes a record with this metadata adds to its data."""
    return SIZE.size + META.size + len(origin) + len(to) + len(namespace) + len(topic)


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


def pack_record(
    origin: bytes, namespace: bytes, topic: bytes, data: bytes, same: bool = False, to: bytes = b""
) -> bytes:
    """Return one message record; ``same``: reuse the previous record's metadata."""
    if same:
        return SIZE.pack(len(data) | SAME_META) + data
    return (
        SIZE.pack(len(data))
        + META.pack(len(origin), len(to), len(namespace), len(topic))
        + origin
        + to
        + namespace
        + topic
        + data
    )


def check_records(buf: Any, pos: int, end: int, count: int) -> None:
    """Check the records in ``buf[pos:end]`` without copying any data (the primary's check).

    Raises :class:`ProtocolError` unless they are exactly ``count`` well-formed
    records that fill the range, with non-empty UTF-8 origins and UTF-8 names.
    """
    unpack_size = SIZE.unpack_from
    unpack_meta = META.unpack_from
    n = 0
    meta = False
    if count < 1:
        raise ProtocolError("a DATA frame must carry at least one message")
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("truncated record size")
        (size,) = unpack_size(buf, pos)
        pos += 4
        if size & SAME_META:
            if not meta:
                raise ProtocolError("the first record of a frame has no metadata")
            pos += size & SIZE_MASK
        else:
            if end - pos < 6:
                raise ProtocolError("truncated record metadata")
            olen, tolen, nlen, tlen = unpack_meta(buf, pos)
            pos += 6
            names_end = pos + olen + tolen + nlen + tlen
            if names_end > end:
                raise ProtocolError("record metadata runs past the end of its frame")
            if not olen:
                raise ProtocolError("a record without an origin")
            try:
                str(buf[pos:names_end], "utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("record metadata is not UTF-8") from None
            pos = names_end + size
            meta = True
        n += 1
    if pos != end:
        raise ProtocolError("a record runs past the end of its frame")
    if n != count:
        raise ProtocolError(f"the header says {count} messages, the body holds {n}")


def parse_records(body: bytes) -> List[Run]:
    """Return the runs of records in a DATA frame's body (a worker's parser).

    Consecutive records that share metadata form one run. Raises
    :class:`ProtocolError`, and nothing else, on any malformed input.
    """
    unpack_size = SIZE.unpack_from
    unpack_meta = META.unpack_from
    end = len(body)
    pos = 0
    runs: List[Run] = []
    datas: Optional[List[bytes]] = None
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("truncated record size")
        (size,) = unpack_size(body, pos)
        pos += 4
        if size & SAME_META:
            if datas is None:
                raise ProtocolError("the first record of a frame has no metadata")
            size &= SIZE_MASK
        else:
            if end - pos < 6:
                raise ProtocolError("truncated record metadata")
            olen, tolen, nlen, tlen = unpack_meta(body, pos)
            pos += 6
            o_end = pos + olen
            to_end = o_end + tolen
            n_end = to_end + nlen
            t_end = n_end + tlen
            if t_end > end:
                raise ProtocolError("record metadata runs past the end of its frame")
            if not olen:
                raise ProtocolError("a record without an origin")
            try:
                origin = body[pos:o_end].decode()
                to = body[o_end:to_end].decode()
                ns = body[to_end:n_end].decode()
                topic = body[n_end:t_end].decode()
            except UnicodeDecodeError:
                raise ProtocolError("record metadata is not UTF-8") from None
            datas = []
            runs.append((origin, to, ns, topic, datas))
            pos = t_end
        stop = pos + size
        if stop > end:
            raise ProtocolError("record runs past the end of its frame")
        datas.append(body[pos:stop])
        pos = stop
    return runs


#: Bytes a record may add to its data at most: size, metadata and four names at their longest.
MAX_RECORD_OVERHEAD = SIZE.size + META.size + 255 + 255 + 65_535 + 65_535
#: A worker closes a DATA frame before its body would pass this size (a lone larger message gets a frame of its own).
FRAME_TARGET = 256 * 1024


def max_body(max_message: int) -> int:
    """The largest body a frame may have when no message is over ``max_message`` bytes."""
    return max(FRAME_TARGET, max_message + MAX_RECORD_OVERHEAD) + 255
