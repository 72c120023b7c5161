"""Routes and bounded per-peer output: the relay's hot path.

A :class:`Peer` is one connection (a worker's pipe). The :class:`Router` reads
frames from peers, checks each one (:func:`wire.check_records` for DATA),
routes it on its header and channel, and queues it on the destinations'
output buffers, which are written with one ``sendmsg`` per turn. Each
buffer is bounded by ``max_buffer``: when a peer's is full, frames for that
peer alone are dropped and counted. A peer that sends a malformed frame is
reported to ``on_broken`` and never heard again. Payloads are never decoded.
"""

from __future__ import annotations

import functools
import logging
import mmap
import selectors
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .._log import RateLimitedLog, logger
from ..message import Matcher, compile_pattern, is_pattern
from .loop import Loop
from .wire import (
    ACK,
    ADVERT,
    BROADCAST,
    DATA,
    HEADER,
    INTEREST,
    HEADER_SIZE,
    KINDS,
    MAX_ADVERTS,
    PRESENCE,
    RUN,
    SUB,
    SYNC,
    UNREACHABLE,
    UNSUB,
    ProtocolError,
    check_records,
    max_body,
    pack_frame,
    run_spans,
)

__all__ = ["Peer", "Router"]

READ_SIZE = 1024 * 1024
IOV_MAX = 512

_ratelimited = RateLimitedLog()


#: The most topics and patterns one peer may want on one channel; past it, it gets everything there (logged).
MAX_INTERESTS = 65_536
_INTEREST_CACHE = 4096


class Interest:
    """What one peer's hubs on one channel subscribe to: exact topics and patterns (bounded)."""

    __slots__ = ("exact", "patterns", "everything", "cache")

    def __init__(self) -> None:
        self.exact: Set[bytes] = set()
        self.patterns: Dict[bytes, Matcher] = {}
        #: Too many to keep: the peer gets every message on the channel.
        self.everything = False
        self.cache: Dict[bytes, bool] = {}

    def change(self, topic: bytes, on: bool) -> bool:
        """Add or withdraw ``topic`` (or a pattern); False if the peer wants too many to keep."""
        self.cache = {}
        text = topic.decode("utf-8")
        table: Any = self.patterns if is_pattern(text) else self.exact
        if not on:
            if table is self.patterns:
                self.patterns.pop(topic, None)
            else:
                self.exact.discard(topic)
            return True
        if len(self.exact) + len(self.patterns) >= MAX_INTERESTS:
            self.everything = True
            return False
        if table is self.patterns:
            self.patterns[topic] = compile_pattern(text)
        else:
            self.exact.add(topic)
        return True

    def wants(self, topic: bytes) -> bool:
        """True if a hub of the peer subscribes to ``topic`` (cached)."""
        hit = self.cache.get(topic)
        if hit is None:
            hit = topic in self.exact
            if not hit and self.patterns:
                text = topic.decode("utf-8", "replace")
                hit = any(match(text) for match in self.patterns.values())
            if len(self.cache) >= _INTEREST_CACHE:
                self.cache.clear()
            self.cache[topic] = hit
        return hit

    def __len__(self) -> int:
        return len(self.exact) + len(self.patterns)


def _unset(mask: int) -> None:
    raise RuntimeError("a peer's socket is ready before the router added it")


class Peer:
    """One connection to the router: its socket, buffers, channels and counters."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.connected = True
        self.inbuf = bytearray()
        self.out: List[Any] = []
        self.out_bytes = 0
        self.want_write = False
        self.dirty = False
        self.channels: Dict[bytes, int] = {}
        #: ACKs not yet queued, one per channel (the latest SUB's number): bounded by the channels.
        self.acks: Dict[bytes, int] = {}
        #: The entries this peer advertises, by channel (at most MAX_ADVERTS per channel).
        self.adverts: Dict[bytes, Set[bytes]] = {}
        #: Presence changes not yet queued, the latest per (channel, worker, entry): bounded by the table.
        self.presence: Dict[Tuple[bytes, int, bytes], bool] = {}
        #: The highest SYNC number to answer once what is pending before it is queued (0: none).
        self.sync = 0
        self.frames_in = 0
        self.frames_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0
        self.dropped_frames = 0
        self.malformed = 0
        self.last_seen = time.monotonic()
        #: The loop's handler for this peer's socket (set by :meth:`Router.add`).
        self.on_ready: Callable[[int], Any] = _unset
        #: What the loop watches this socket for now (0: nothing, it is not registered).
        self.events = 0
        #: Flow control: the congested peers this peer publishes to, which keep its reads paused.
        self.paused_by: Set["Peer"] = set()
        #: Since when this peer's buffer has been over the high-water mark (None: it is not).
        self.congested_since: Optional[float] = None
        #: Declared stalled: it stopped draining; messages for it alone are dropped until it drains.
        self.stalled = False
        #: What its hubs subscribe to, by channel (interest routing).
        self.interest: Dict[bytes, Interest] = {}
        #: Messages on its channels it was not sent, since none of its hubs subscribes to their topic.
        self.filtered = 0

    @property
    def pid(self) -> int:
        """The peer's process id (0 if unknown)."""
        return 0

    def counters(self) -> Dict[str, Any]:
        """This peer's relay counters."""
        return {
            "index": self.index,
            "alive": self.connected,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "buffered": self.out_bytes,
            "dropped": self.dropped,
            "dropped_frames": self.dropped_frames,
            "malformed": self.malformed,
            "stalled": self.stalled,
            "filtered": self.filtered,
            "interests": sum(len(i) for i in self.interest.values()),
        }


class Router:
    """Reads, checks and routes frames between peers on one :class:`Loop`.

    ``on_control(peer, kind, channel, count)`` gets the control frames the
    router does not handle itself (PONG, READY); ``on_broken(peer, reason)``
    a peer that broke the protocol (the router has already disconnected it).
    """

    def __init__(
        self,
        loop: Loop,
        *,
        max_buffer: int,
        max_message: int,
        on_control: Callable[[Peer, int, bytes, int], Any],
        on_broken: Callable[[Peer, str], Any],
        stall_timeout: float = 0.5,
    ) -> None:
        self.loop = loop
        self.max_buffer = max_buffer
        #: Flow control: past this a peer is congested and the peers on its channels pause reading...
        self.high_water = max_buffer // 2
        #: ...until it is back under this.
        self.low_water = max_buffer // 4
        #: A peer congested this long is declared stalled: the others resume, its messages are dropped.
        self.stall_timeout = stall_timeout
        self.stalls = 0
        self.max_body = max_body(max_message)
        # One read buffer for every peer (the loop reads one at a time), allocated once: a recv() of
        # READ_SIZE into a new bytes object costs an mmap and its page faults on every call. An anonymous
        # map: its pages take memory only once a read reaches them.
        self._rview = memoryview(mmap.mmap(-1, READ_SIZE))
        self.on_control = on_control
        self.on_broken = on_broken
        self.peers: Dict[int, Peer] = {}
        self.routes: Dict[bytes, Dict[Peer, int]] = {}
        #: The presence table: channel -> {(worker index, entry): None}, in the order entries came.
        self.adverts: Dict[bytes, Dict[Tuple[int, bytes], None]] = {}
        self._dirty: List[Peer] = []
        self.unroutable = 0
        self.malformed = 0
        #: Called with a channel whenever a peer joins or leaves it (the uplink follows the channels).
        self.on_routes: Optional[Callable[[bytes], Any]] = None
        #: Called with a peer once it is disconnected (the primary forgets the bus's peers).
        self.on_gone: Optional[Callable[[Peer], Any]] = None
        #: Channels whose ACKs wait (the uplink is subscribing them on the backplane): see :meth:`release`.
        self.holding: Set[bytes] = set()
        loop.after_turn(self.flush_dirty)

    # -- peers ---------------------------------------------------------------

    def add(self, peer: Peer) -> None:
        """Start reading from ``peer``."""
        peer.sock.setblocking(False)
        peer.on_ready = functools.partial(self._ready, peer)
        self.peers[peer.index] = peer
        self._watch(peer)

    def _ready(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self.read(peer)
        if mask & selectors.EVENT_WRITE and peer.connected:
            self.flush(peer)

    def disconnect(self, peer: Peer) -> None:
        """Forget ``peer``'s connection: no more routing to or from it."""
        if not peer.connected:
            return
        peer.connected = False
        if peer.inbuf:
            logger.error(
                "worker %d (pid %d) closed its pipe in the middle of a frame: %d bytes discarded",
                peer.index,
                peer.pid,
                len(peer.inbuf),
            )
        left = list(peer.channels)
        for chan in left:
            subs = self.routes.get(chan)
            if subs is not None:
                subs.pop(peer, None)
                if not subs:
                    del self.routes[chan]
        peer.channels.clear()
        peer.interest.clear()
        if self.on_routes is not None:
            for chan in left:
                self.on_routes(chan)
        peer.acks.clear()
        peer.presence.clear()
        self._withdraw(peer)
        peer.out.clear()
        peer.out_bytes = 0
        peer.inbuf = bytearray()
        self._uncongest(peer)
        peer.paused_by.clear()
        self.loop.unregister(peer.sock)
        peer.events = 0
        peer.sock.close()
        if self.peers.get(peer.index) is peer:
            del self.peers[peer.index]
        if self.on_gone is not None:
            self.on_gone(peer)

    def drain(self, peer: Peer) -> None:
        """Read and route everything ``peer`` has written so far."""
        while peer.connected:
            before = peer.bytes_in
            self.read(peer)
            if peer.bytes_in == before:
                break

    # -- reading and routing -------------------------------------------------

    def read(self, w: Peer) -> None:
        """Read what ``w`` sent; route every whole frame in it."""
        rview = self._rview
        try:
            got = w.sock.recv_into(rview)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = 0
        if not got:
            self.disconnect(w)
            return
        data = bytes(rview[:got])  # what we keep (a frame read whole is forwarded as these bytes)
        w.bytes_in += len(data)
        w.last_seen = time.monotonic()
        buf: Any
        if w.inbuf:
            w.inbuf += data
            buf = w.inbuf
        else:
            buf = data
        n = len(buf)
        off = 0
        unpack = HEADER.unpack_from
        routes = self.routes
        max_body = self.max_body
        enqueue = self.enqueue
        while n - off >= HEADER_SIZE:
            body_len, kind, clen, origin, dest, count = unpack(buf, off)
            if body_len > max_body or kind not in KINDS or clen > body_len or origin != w.index:
                self._broken(w, f"a malformed frame header (kind {kind}, length {body_len}, "
                             f"channel length {clen}, origin {origin})")
                return
            end = off + HEADER_SIZE + body_len
            if end > n:
                break
            start = off + HEADER_SIZE + clen
            if kind == DATA:
                try:
                    check_records(buf, start, end, count)
                except ProtocolError as exc:
                    self._broken(w, f"a malformed DATA frame ({exc})")
                    return
                w.frames_in += 1
                w.messages_in += count
                chan = bytes(buf[off + HEADER_SIZE : start])
                subs = routes.get(chan)
                if subs:
                    frame = buf[off:end]
                    if dest == BROADCAST:
                        spans = None
                        for t, hubs in subs.items():
                            if t is w and hubs <= 1:
                                continue
                            interest = t.interest.get(chan)
                            if interest is None:  # no hub there subscribes to anything on the channel
                                t.filtered += count
                            elif interest.everything:
                                enqueue(t, frame, count)
                            else:
                                if spans is None:
                                    spans = run_spans(buf, start, end)
                                self._route_runs(t, interest, frame, spans, count, off)
                    else:
                        one = self.peers.get(dest)
                        if one is not None and one in subs:
                            enqueue(one, frame, count)
                        else:
                            self._unroutable(w, chan, dest, count, buf, start)
                else:
                    if dest != BROADCAST:
                        self._unroutable(w, chan, dest, count, buf, start)
                    else:
                        self.unroutable += count
            else:
                w.frames_in += 1
                self._control(w, kind, bytes(buf[off + HEADER_SIZE : start]), dest, count, buf[start:end])
            off = end
        if off == n:
            w.inbuf = bytearray()
        elif buf is w.inbuf:
            del buf[:off]
        else:
            w.inbuf = bytearray(memoryview(buf)[off:])

    def _route_runs(
        self, t: Peer, interest: Interest, frame: Any, spans: List[Tuple[bytes, int, int, int]],
        count: int, off: int,
    ) -> None:
        """Send ``t`` the runs of a broadcast frame that its hubs want: all of it, none, or a frame of its own."""
        wanted = [span for span in spans if interest.wants(span[0])]
        if len(wanted) == len(spans):
            self.enqueue(t, frame, count)
        elif not wanted:
            t.filtered += count
        else:
            n = sum(span[3] for span in wanted)
            t.filtered += count - n
            _len, kind, clen, origin, dest, _count = HEADER.unpack_from(frame)
            chan = bytes(frame[HEADER_SIZE : HEADER_SIZE + clen])
            # The spans are offsets in the read buffer, where the frame starts at ``off``.
            body = b"".join(bytes(frame[s - off : e - off]) for _t, s, e, _n in wanted)
            self.enqueue(t, HEADER.pack(clen + len(body), kind, clen, origin, dest, n) + chan + body, n)

    def _interest(self, w: Peer, chan: bytes, topic: bytes, on: bool, seq: int) -> None:
        """``w``'s hubs on ``chan`` want ``topic`` (a topic or a pattern), or no longer; acknowledged like a SUB."""
        if chan not in w.channels:
            return  # a channel it has left: stale
        interest = w.interest.get(chan)
        if interest is None:
            if not on:
                return
            interest = w.interest[chan] = Interest()
        try:
            kept = interest.change(topic, on)
        except (UnicodeDecodeError, ValueError) as exc:
            _ratelimited(("interest", w.index), logging.ERROR,
                         "worker %d sent an interest that is not a topic or pattern: %s", w.index, exc)
            return
        if not kept:
            _ratelimited(("interest-full", w.index), logging.WARNING,
                         "worker %d wants more than %d topics on %r: it gets every message there",
                         w.index, MAX_INTERESTS, chan)
        w.acks[chan] = max(w.acks.get(chan, 0), seq)
        self._mark(w)

    def _unroutable(self, w: Peer, chan: bytes, dest: int, count: int, buf: Any, start: int) -> None:
        """Addressed messages for a worker that is not on the channel: tell the publishing hub."""
        self.unroutable += count
        if w.out_bytes >= self.max_buffer:
            return  # the publisher does not read: the report is dropped (the count above stays)
        olen = RUN.unpack_from(buf, start)[1]  # checked: the first run names its origin
        origin = bytes(buf[start + RUN.size : start + RUN.size + olen])
        self.enqueue_control(w, pack_frame(UNREACHABLE, chan, dest, w.index, origin + b"\0", count))

    def _control(self, w: Peer, kind: int, chan: bytes, dest: int, count: int, body: Any) -> None:
        if kind == SUB:
            w.channels[chan] = w.channels.get(chan, 0) + 1
            self.routes.setdefault(chan, {})[w] = w.channels[chan]
            for (index, entry) in self.adverts.get(chan, ()):  # the table, before the ACK
                w.presence[(chan, index, entry)] = True
            w.acks[chan] = max(w.acks.get(chan, 0), count)  # coalesced: one entry per channel at most
            self._mark(w)
            if w.channels[chan] == 1 and self.on_routes is not None:
                self.on_routes(chan)
        elif kind == UNSUB:
            left = w.channels.get(chan, 0) - 1
            if left > 0:
                w.channels[chan] = left
                self.routes[chan][w] = left
            elif chan in w.channels:
                del w.channels[chan]
                w.acks.pop(chan, None)
                w.interest.pop(chan, None)
                subs = self.routes.get(chan)
                if subs is not None:
                    subs.pop(w, None)
                    if not subs:
                        del self.routes[chan]
                if self.on_routes is not None:
                    self.on_routes(chan)
        elif kind == INTEREST:
            self._interest(w, chan, bytes(body), bool(dest), count)
        elif kind == ADVERT:
            self._advert(w, chan, bytes(body), bool(count))
        elif kind == SYNC:  # answered behind everything already queued or pending for the worker
            w.sync = max(w.sync, count)
            self._mark(w)
        elif kind == UNREACHABLE:
            # A worker found no hub for an addressed message: tell the worker that published it.
            t = self.peers.get(dest)
            if t is not None and t is not w and t.out_bytes < self.max_buffer:  # a report: dropped when full
                self.enqueue_control(t, pack_frame(UNREACHABLE, chan, w.index, dest, bytes(body), count))
        else:
            self.on_control(w, kind, chan, count)

    def _advert(self, w: Peer, chan: bytes, entry: bytes, on: bool) -> None:
        """Add or withdraw ``w``'s entry on ``chan`` and tell every worker on the channel."""
        table = self.adverts.setdefault(chan, {})
        key = (w.index, entry)
        if on:
            if key in table:
                return
            mine = w.adverts.setdefault(chan, set())
            if len(mine) >= MAX_ADVERTS or not entry:
                _ratelimited(("advert", w.index), logging.WARNING,
                             "worker %d (pid %d): advert refused (empty, or over %d on one channel)",
                             w.index, w.pid, MAX_ADVERTS)
                return
            mine.add(entry)
            table[key] = None
        else:
            if key not in table:
                return
            del table[key]
            w.adverts.get(chan, set()).discard(entry)
        if not table:
            del self.adverts[chan]
        self._presence(chan, w.index, entry, on)

    def _presence(self, chan: bytes, index: int, entry: bytes, on: bool) -> None:
        for t in self.routes.get(chan, {}):
            t.presence[(chan, index, entry)] = on  # coalesced: a worker that does not read costs the table
            self._mark(t)

    def _mark(self, t: Peer) -> None:
        if not t.dirty:
            t.dirty = True
            self._dirty.append(t)

    def _withdraw(self, w: Peer) -> None:
        """``w`` is gone: its entries go, and every worker on their channels is told."""
        for chan, entries in w.adverts.items():
            table = self.adverts.get(chan, {})
            for entry in entries:
                table.pop((w.index, entry), None)
                self._presence(chan, w.index, entry, False)
            if not table:
                self.adverts.pop(chan, None)
        w.adverts.clear()

    def _broken(self, w: Peer, reason: str) -> None:
        w.malformed += 1
        self.malformed += 1
        self.on_broken(w, reason)  # first: a worker is killed before its end of the pipe closes
        self.disconnect(w)

    # -- writing -------------------------------------------------------------

    def enqueue(self, t: Peer, frame: Any, count: int) -> None:
        """Queue a DATA frame for ``t``, or drop and count it if ``t``'s buffer is full."""
        size = len(frame)
        if t.out_bytes + size > self.max_buffer and t.out and not t.want_write:
            self.flush(t)  # a large read batch: write what the socket takes before judging
            if not t.connected:
                return
        if t.out_bytes + size > self.max_buffer:
            t.dropped += count
            t.dropped_frames += 1
            _ratelimited(
                ("drop", t.index),
                logging.WARNING,
                "worker %d (pid %d) is not keeping up: its output buffer is full (%d bytes); "
                "%d messages dropped for it so far",
                t.index,
                t.pid,
                self.max_buffer,
                t.dropped,
            )
            return
        t.out.append(frame)
        t.out_bytes += size
        t.frames_out += 1
        t.messages_out += count
        if not t.dirty:
            t.dirty = True
            self._dirty.append(t)
        if t.out_bytes > self.high_water and t.congested_since is None and not t.stalled:
            self._congest(t)

    # -- flow control --------------------------------------------------------

    def _watch(self, p: Peer) -> None:
        """Make the loop watch ``p``'s socket for what it needs now: reads unless paused, writes if pending."""
        events = (0 if p.paused_by else selectors.EVENT_READ) | (selectors.EVENT_WRITE if p.want_write else 0)
        if events == p.events or not p.connected:
            return
        if not p.events:
            self.loop.register(p.sock, p.on_ready, events)
        elif not events:
            self.loop.unregister(p.sock)
        else:
            self.loop.modify(p.sock, events, p.on_ready)
        p.events = events

    def _congest(self, t: Peer) -> None:
        """``t`` falls behind: pause reading from the peers on its channels until it drains."""
        since = t.congested_since = time.monotonic()
        for chan in t.channels:
            for p in self.routes.get(chan, ()):
                if t not in p.paused_by:
                    p.paused_by.add(t)
                    self._watch(p)
        self.loop.call_later(self.stall_timeout, lambda: self._check_stall(t, since))

    def _check_stall(self, t: Peer, since: float) -> None:
        if t.congested_since != since or not t.connected:
            return  # it drained meanwhile, or is gone
        t.stalled = True
        self.stalls += 1
        logger.warning(
            "worker %d (pid %d) stopped draining for %.1f s: declared stalled; the others go on and "
            "messages for it are dropped (counted) once its buffer is full",
            t.index,
            t.pid,
            self.stall_timeout,
        )
        self._uncongest(t)

    def _uncongest(self, t: Peer) -> None:
        """``t`` drained (or stalled, or left): resume the peers it paused."""
        t.congested_since = None
        for p in self.peers.values():
            if t in p.paused_by:
                p.paused_by.discard(t)
                self._watch(p)

    def enqueue_control(self, t: Peer, frame: bytes) -> None:
        """Queue a control frame for ``t``."""
        if not t.connected:
            return
        t.out.append(frame)
        t.out_bytes += len(frame)
        if not t.dirty:
            t.dirty = True
            self._dirty.append(t)

    def flush_dirty(self) -> None:
        """Write what this turn queued (the loop calls it after every turn)."""
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for w in dirty:
                w.dirty = False
                if w.connected and not w.want_write:
                    self.flush(w)

    def release(self, chan: bytes) -> None:
        """Send the ACKs held for ``chan``: the hubs waiting on it are ready."""
        if chan in self.holding:
            self.holding.discard(chan)
            for w in self.routes.get(chan, {}):
                if chan in w.acks:
                    self._mark(w)

    def flush(self, w: Peer) -> None:
        """Write as much of ``w``'s output as its socket takes, without blocking."""
        out = w.out
        if (w.presence or w.acks or w.sync) and w.out_bytes < self.max_buffer:
            # Control state kept coalesced until there is room, in this order: the presence
            # table before the ACK that makes a hub ready, and both before the SYNC answer.
            frames = [pack_frame(PRESENCE, c, i, w.index, e, 1 if on else 0) for (c, i, e), on in w.presence.items()]
            held = {}
            for chan, seq in w.acks.items():
                if chan in self.holding:
                    held[chan] = seq
                else:
                    frames.append(pack_frame(ACK, chan, 0xFFFF, w.index, count=seq))
            if w.sync:
                frames.append(pack_frame(SYNC, b"", 0xFFFF, w.index, count=w.sync))
            w.presence.clear()
            w.acks = held
            w.sync = 0
            for frame in frames:
                out.append(frame)
                w.out_bytes += len(frame)
        while out:
            chunk = out if len(out) <= IOV_MAX else out[:IOV_MAX]
            try:
                sent = w.sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.disconnect(w)
                return
            w.bytes_out += sent
            w.out_bytes -= sent
            i = 0
            for part in chunk:
                size = len(part)
                if sent < size:
                    break
                sent -= size
                i += 1
            partial = i < len(chunk)
            if partial and sent:
                out[i] = memoryview(out[i])[sent:]
            del out[:i]
            if partial:
                break
        want = bool(out)
        if want != w.want_write:
            w.want_write = want
            self._watch(w)
        if w.out_bytes <= self.low_water:
            if w.congested_since is not None:
                self._uncongest(w)
            elif w.stalled:
                w.stalled = False
                logger.info("worker %d (pid %d) drains again: no longer stalled", w.index, w.pid)

    def channels(self) -> Dict[str, int]:
        """Channel name -> number of workers on it."""
        return {c.decode("utf-8", "replace"): len(s) for c, s in self.routes.items()}

