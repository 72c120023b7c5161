"""The relay's frame format and its one parser, shared by the primary and the workers.

A frame is a fixed 14-byte header, the channel name, then an opaque body::

    <I body_len> <B kind> <B channel_len> <H origin> <H dest> <I count>
    channel (channel_len bytes)  body (body_len - channel_len bytes)

``body_len`` counts everything after the header. ``origin`` is the sending
worker's index (the primary refuses a frame whose origin is not its sender,
so a worker cannot speak for another), ``dest`` a worker index or
``BROADCAST``, ``count`` the number of messages in a DATA frame.

A DATA frame's body is one or more runs. A run is messages that share their
metadata (origin, destination hub, namespace, topic)::

    <I n> <B origin_len> <B to_len> <H namespace_len> <H topic_len>
    origin to namespace topic  <n x I size>  data (the n messages, back to back)

``origin`` is the publishing hub's id within its worker; ``to`` is empty, or
the id of the one hub (in worker ``dest``) the run is for. Names are UTF-8.
The sizes sit together so that a whole run is checked, and split, without a
Python-level step per message.

:func:`check_records` (the primary, before it relays a frame) and
:func:`parse_records` (a worker, before it delivers one) are the only record
parsers. Both check every bound and raise nothing but :class:`ProtocolError`.
Adverts are the relay's presence table: a hub advertises an entry on its
channel (ADVERT, body ``hub id NUL entry``); the primary keeps the table,
sends every worker on the channel a PRESENCE frame when an entry comes or
goes, sends a worker that subscribes the whole table before its ACK, and
withdraws a worker's entries the moment it is gone.

A process the primary did not start joins its bus (a Unix socket) and is
answered with HELLO, which gives it its index; from then on it is a worker
like any other on the wire. STATS asks the primary for its counters.

INTEREST tells the primary which topics (or patterns) a worker's hubs on a
channel subscribe to: the primary sends a worker only the runs of a DATA
frame that it wants (interest routing).

An UNREACHABLE frame tells a publishing hub that ``count`` of its addressed
messages found nobody: its body is ``publisher hub id NUL [to hub id]``, its
``dest`` the publisher's worker and its ``origin`` the worker they were for.
"""

from __future__ import annotations

import struct
from itertools import accumulate, islice
from typing import Any, Iterator, List, Sequence, Tuple

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "SIZE",
    "RUN",
    "BROADCAST",
    "MAX_WORKERS",
    "FIRST_PEER",
    "DATA",
    "SUB",
    "UNSUB",
    "ACK",
    "PING",
    "PONG",
    "READY",
    "STOP",
    "UNREACHABLE",
    "ADVERT",
    "PRESENCE",
    "SYNC",
    "HELLO",
    "STATS",
    "INTEREST",
    "run_spans",
    "BUS_VERSION",
    "MAX_ADVERTS",
    "KINDS",
    "ProtocolError",
    "pack_frame",
    "pack_run",
    "run_head",
    "pack_sizes",
    "check_records",
    "parse_records",
    "parse_tagged",
    "max_body",
    "FRAME_TARGET",
    "MAX_RECORD_OVERHEAD",
    "Run",
    "TaggedRun",
]

HEADER = struct.Struct("<IBBHHI")
RUN = struct.Struct("<IBBHH")
SIZE = struct.Struct("<I")
HEADER_SIZE = HEADER.size
BROADCAST = 0xFFFF
MAX_WORKERS = 0xFFFE
#: Worker indexes are below this; the processes that join a primary's bus get indexes from it up.
FIRST_PEER = 0xC000

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
ADVERT = 10  # worker -> primary: a hub here offers an entry (body: hub id NUL entry); count 1 on, 0 off
PRESENCE = 11  # primary -> worker: an entry of worker ``origin`` came (count 1) or went (count 0)
SYNC = 12  # worker -> primary -> the same worker: everything the primary queued for it before is delivered
HELLO = 13  # primary -> a peer that joined the bus: your index is ``dest``; ``count`` the version; body JSON settings
STATS = 14  # peer -> primary: send your counters (``count`` numbers the request); primary -> peer: body JSON
INTEREST = 15  # worker -> primary: its hubs on the channel want (``dest`` 1) or no longer want (0) a topic or
#               pattern (the body); ``count`` numbers it like a SUB, and the ACK that answers covers it
KINDS = frozenset({DATA, SUB, UNSUB, ACK, PING, PONG, READY, STOP, UNREACHABLE, ADVERT, PRESENCE, SYNC, HELLO, STATS,
                   INTEREST})
#: The bus protocol's version, in HELLO: a peer refuses a relay that speaks another.
BUS_VERSION = 1

#: The most entries one worker may advertise on one channel (more are refused and logged).
MAX_ADVERTS = 4096

#: One run of records: (origin hub id, to hub id, namespace, topic, datas), names decoded.
Run = Tuple[str, str, str, str, List[bytes]]
#: One run with each message's first byte split off: (origin, to, namespace, topic, tags, values).
TaggedRun = Tuple[str, str, str, str, bytes, List[bytes]]


class ProtocolError(ValueError):
    """A frame or record that breaks the wire format."""


def run_head(n: int, origin: bytes, to: bytes, namespace: bytes, topic: bytes) -> bytes:
    """The head of a run of ``n`` messages: counts and names (the sizes and data follow)."""
    return RUN.pack(n, len(origin), len(to), len(namespace), len(topic)) + origin + to + namespace + topic


def pack_sizes(sizes: Sequence[int]) -> bytes:
    """The sizes of a run's messages, as the wire carries them."""
    return struct.pack(f"<{len(sizes)}I", *sizes)


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


def pack_run(origin: bytes, namespace: bytes, topic: bytes, datas: Sequence[bytes], to: bytes = b"") -> bytes:
    """Return one whole run of messages."""
    return run_head(len(datas), origin, to, namespace, topic) + pack_sizes([len(d) for d in datas]) + b"".join(datas)


def check_records(buf: Any, pos: int, end: int, count: int) -> None:
    """Check the runs in ``buf[pos:end]`` without copying any data (the primary's check).

    Raises :class:`ProtocolError` unless they hold exactly ``count`` messages
    and fill the range, every run with at least one message, a non-empty
    origin and UTF-8 names.
    """
    unpack = struct.unpack_from
    total = 0
    if count < 1:
        raise ProtocolError("a DATA frame must carry at least one message")
    while pos < end:
        n, sizes_at, data_at = _run_head(buf, pos, end)[4:]
        pos = data_at + sum(unpack(f"<{n}I", buf, sizes_at))
        total += n
    if pos != end:
        raise ProtocolError("a run's data runs past the end of its frame")
    if total != count:
        raise ProtocolError(f"the header says {count} messages, the body holds {total}")


def run_spans(buf: Any, pos: int, end: int) -> List[Tuple[bytes, int, int, int]]:
    """``(topic, start, stop, messages)`` of each run in ``buf[pos:end]``, already checked by :func:`check_records`."""
    unpack_run = RUN.unpack_from
    unpack = struct.unpack_from
    spans = []
    while pos < end:
        n, olen, tolen, nlen, tlen = unpack_run(buf, pos)
        topic_at = pos + 10 + olen + tolen + nlen
        names_end = topic_at + tlen
        stop = names_end + 4 * n + sum(unpack(f"<{n}I", buf, names_end))
        spans.append((bytes(buf[topic_at:names_end]), pos, stop, n))
        pos = stop
    return spans


def _run_head(body: Any, pos: int, end: int) -> Tuple[str, str, str, str, int, int, int]:
    """The run at ``pos``: ``(origin, to, ns, topic, n, sizes_at, data_at)``, its header and names checked."""
    if end - pos < 10:
        raise ProtocolError("truncated run header")
    n, olen, tolen, nlen, tlen = RUN.unpack_from(body, pos)
    pos += 10
    o_end = pos + olen
    to_end = o_end + tolen
    n_end = to_end + nlen
    t_end = n_end + tlen
    sizes_end = t_end + 4 * n
    if not n or not olen:
        raise ProtocolError("a run without messages or without an origin")
    if sizes_end > end:
        raise ProtocolError("a run's names or sizes run past the end of its frame")
    try:
        return (
            body[pos:o_end].decode(), body[o_end:to_end].decode(), body[to_end:n_end].decode(),
            body[n_end:t_end].decode(), n, t_end, sizes_end,
        )
    except UnicodeDecodeError:
        raise ProtocolError("names that are not UTF-8") from None


def _spans(body: bytes) -> Iterator[Tuple[str, str, str, str, Tuple[int, ...], List[int]]]:
    """Each run of a body, checked: its names, its messages' sizes, and where each message starts and ends."""
    end = len(body)
    pos = 0
    while pos < end:
        origin, to, ns, topic, n, sizes_at, data_at = _run_head(body, pos, end)
        sizes = struct.unpack_from(f"<{n}I", body, sizes_at)
        offsets = list(accumulate(sizes, initial=data_at))
        pos = offsets[-1]
        if pos > end:
            raise ProtocolError("a run's data runs past the end of its frame")
        yield origin, to, ns, topic, sizes, offsets


def parse_records(body: bytes) -> List[Run]:
    """Return the runs in a DATA frame's body (a worker's parser).

    Raises :class:`ProtocolError`, and nothing else, on any malformed input.
    """
    return [
        (origin, to, ns, topic, [body[a:b] for a, b in zip(offsets, islice(offsets, 1, None))])
        for origin, to, ns, topic, _sizes, offsets in _spans(body)
    ]


def parse_tagged(body: bytes) -> List[TaggedRun]:
    """Like :func:`parse_records`, with each message's first byte (the hub's codec tag) split off.

    A run comes back as ``(origin, to, ns, topic, tags, values)``: ``tags[i]`` is
    the first byte of message ``i`` (0, which no codec uses, for an empty
    message) and ``values[i]`` the rest, each cut from the body once. Accepts
    and refuses exactly what :func:`parse_records` does.
    """
    end = len(body)
    if end >= 10:  # one message alone in its frame (a round trip's): the same checks, without the loops
        origin, to, ns, topic, n, sizes_at, data_at = _run_head(body, 0, end)
        if n == 1:
            stop = data_at + SIZE.unpack_from(body, sizes_at)[0]
            if stop == end:
                if stop > data_at:
                    return [(origin, to, ns, topic, body[data_at : data_at + 1], [body[data_at + 1 : stop]])]
                return [(origin, to, ns, topic, b"\0", [b""])]
    runs: List[TaggedRun] = []
    for origin, to, ns, topic, sizes, offsets in _spans(body):
        pairs = zip(offsets, islice(offsets, 1, None))
        if 0 in sizes:
            tags = bytes(body[a] if b > a else 0 for a, b in pairs)
        else:
            tags = bytes(map(body.__getitem__, islice(offsets, len(sizes))))
        runs.append((origin, to, ns, topic, tags, [body[a + 1 : b] for a, b in zip(offsets, islice(offsets, 1, None))]))
    return runs


#: Bytes a message may add to its data at most: a run of its own, four names at their longest.
MAX_RECORD_OVERHEAD = RUN.size + SIZE.size + 255 + 255 + 65_535 + 65_535
#: A worker closes a DATA frame before its body would pass this size (a lone larger message gets a frame of its own).
FRAME_TARGET = 256 * 1024


def max_body(max_message: int) -> int:
    """The largest body a frame may have when no message is over ``max_message`` bytes."""
    return max(FRAME_TARGET, max_message + MAX_RECORD_OVERHEAD) + 255
