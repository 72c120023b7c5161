"""The worker's end of its pipe to the primary.

One link per worker process, shared by every hub in it. Publishing appends a
record to a pending run and returns; a writer thread turns the pending runs
into frames and writes them in one call, so messages published back to back
leave in one batch while a lone message leaves at once. A reader thread
parses frames from the primary and hands each record to the hubs subscribed
to its channel. When the primary's end closes, the worker exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._log import RateLimitedLog, logger
from .wire import (
    ACK,
    BROADCAST,
    DATA,
    HEADER,
    HEADER_SIZE,
    META,
    PING,
    PONG,
    READY,
    SAME_META,
    SIZE,
    STOP,
    SUB,
    UNSUB,
    ProtocolError,
)

__all__ = ["WorkerLink", "current_link"]

#: A DATA frame is closed once its body passes this size; a new one starts.
FRAME_TARGET = 256 * 1024
#: A publish this long after the previous one, with nothing pending, is written at once by the
#: publishing thread (no hand-off to the writer thread: a lone message leaves without delay).
#: Publishes closer together are batched by the writer thread.
DIRECT_GAP = 0.0002
#: A pending entry holding bytes already framed (the rest of a partial direct write).
_RAW = 0
READ_SIZE = 1024 * 1024
#: Seconds between a lost primary and a hard exit, for SIGTERM handlers to run.
ORPHAN_GRACE = 1.0

_current: Optional["WorkerLink"] = None
_ratelimited = RateLimitedLog()

#: ``deliver_batch(namespace, topic, origin, datas)``: many messages of one origin and topic at once.
DeliverBatch = Callable[[str, str, str, List[bytes]], Any]
_pack_size = SIZE.pack
_pack_meta = META.pack
_monotonic = time.monotonic


def current_link() -> Optional["WorkerLink"]:
    """The link of this worker process, or None outside a worker."""
    return _current


def _set_current(link: Optional["WorkerLink"]) -> None:
    global _current
    _current = link


class WorkerLink:
    """Batched, thread-safe framing over the worker's socket to the primary."""

    def __init__(
        self,
        sock: socket.socket,
        index: int,
        *,
        max_message: int,
        out_limit: int,
        publish_block: float,
    ) -> None:
        sock.setblocking(True)
        self._sock = sock
        self.index = index
        self.max_message = max_message
        self.out_limit = out_limit
        self.publish_block = publish_block
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Pending runs, in publish order: [kind, channel, dest, body, count].
        self._runs: List[List[Any]] = []
        self._pending = 0  # bytes in _runs
        self._inflight = 0  # bytes taken by the writer and not yet written
        self._writer_waiting = False
        self._closing = False
        self._closed = False
        self._members: Dict[bytes, Tuple[Tuple[bytes, DeliverBatch], ...]] = {}
        self._subs_sent: Dict[bytes, int] = {}
        self._acks: Dict[bytes, int] = {}
        self._last_publish = 0.0
        self._writing = False
        self.frames_out = 0
        self.messages_out = 0
        self.messages_in = 0
        self.dropped = 0
        self._reader = threading.Thread(target=self._read_loop, name="clustersync-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="clustersync-writer", daemon=True)

    def start(self) -> None:
        """Start the reader and writer threads, and say hello (the primary's liveness clock starts)."""
        self._reader.start()
        self._writer.start()
        self._control(PONG)

    # -- membership --------------------------------------------------------

    def add_member(self, channel: bytes, hub_id: bytes, deliver: DeliverBatch) -> int:
        """Route ``channel`` to ``deliver`` (skipping ``hub_id``'s own messages).

        Returns the sequence number :meth:`wait_acked` waits for.
        """
        with self._cond:
            self._members[channel] = self._members.get(channel, ()) + ((hub_id, deliver),)
            seq = self._subs_sent.get(channel, 0) + 1
            self._subs_sent[channel] = seq
        self._control(SUB, channel)
        return seq

    def remove_member(self, channel: bytes, hub_id: bytes) -> None:
        """Stop routing ``channel`` to ``hub_id``."""
        with self._cond:
            members = tuple(m for m in self._members.get(channel, ()) if m[0] != hub_id)
            if members:
                self._members[channel] = members
            else:
                self._members.pop(channel, None)
        if not self._closed:
            self._control(UNSUB, channel)

    def wait_acked(self, channel: bytes, seq: int, timeout: Optional[float]) -> bool:
        """Wait until the primary has seen subscription number ``seq`` on ``channel``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._acks.get(channel, 0) >= seq or self._closed, timeout
            ) and not self._closed

    # -- writing -----------------------------------------------------------

    def publish(self, channel: bytes, dest: int, origin: bytes, ns: bytes, topic: bytes, data: bytes) -> None:
        """Queue one message for ``dest`` (a worker index or BROADCAST).

        Consecutive messages to the same channel and destination share a
        frame; consecutive ones with the same (identical) origin, namespace
        and topic objects share their metadata. Waits up to
        ``publish_block`` seconds when the outgoing buffer is full, then
        raises ``BufferError`` (the message is dropped and counted).
        """
        size = len(data)
        with self._lock:  # the Condition's own lock: entered without a Python-level call
            if self._closed:
                raise RuntimeError("the connection to the primary is closed")
            if self._pending + self._inflight + size > self.out_limit and self._pending:
                self._wait_for_room(size)
            runs = self._runs
            now = _monotonic()
            if not runs and not self._writing and now - self._last_publish > DIRECT_GAP:
                self._last_publish = now
                self._write_now(channel, dest, origin, ns, topic, data)
                return
            self._last_publish = now
            if runs:
                last = runs[-1]
                body = last[3]
                if last[1] == channel and last[2] == dest and last[0] == DATA and len(body) < FRAME_TARGET:
                    if last[5] is origin and last[6] is ns and last[7] is topic:
                        body += _pack_size(size | SAME_META)
                    else:
                        body += _pack_size(size) + _pack_meta(len(origin), len(ns), len(topic)) + origin + ns + topic
                        last[5] = origin
                        last[6] = ns
                        last[7] = topic
                    body += data
                    last[4] += 1
                    self._pending += size
                    return
            body = bytearray(_pack_size(size) + _pack_meta(len(origin), len(ns), len(topic)))
            body += origin + ns + topic
            body += data
            runs.append([DATA, channel, dest, body, 1, origin, ns, topic])
            self._pending += size
            if self._writer_waiting:
                self._cond.notify_all()

    def _write_now(self, channel: bytes, dest: int, origin: bytes, ns: bytes, topic: bytes, data: bytes) -> None:
        """With the lock held and nothing pending: write one message's frame without blocking.

        What the socket does not take at once goes to the writer thread, first in line.
        """
        body = _pack_size(len(data)) + _pack_meta(len(origin), len(ns), len(topic)) + origin + ns + topic + data
        frame = HEADER.pack(len(channel) + len(body), DATA, len(channel), self.index, dest, 1) + channel + body
        try:
            sent = self._sock.send(frame, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # the writer thread meets the same error and reports it
        self.frames_out += 1
        self.messages_out += 1
        if sent < len(frame):
            self._runs.append([_RAW, b"", 0, frame[sent:], 0, None, None, None])
            self._pending += len(frame) - sent
            if self._writer_waiting:
                self._cond.notify_all()

    def _wait_for_room(self, size: int) -> None:
        """With the lock held: wait for room in the outgoing buffer, or raise ``BufferError``."""
        ok = self._cond.wait_for(
            lambda: self._pending + self._inflight + size <= self.out_limit
            or not self._pending
            or self._closed,
            self.publish_block,
        )
        if not ok:
            self.dropped += 1
            raise BufferError(
                f"outgoing buffer to the primary is full ({self.out_limit} bytes): message dropped"
            )
        if self._closed:
            raise RuntimeError("the connection to the primary is closed")

    def _control(self, kind: int, channel: bytes = b"", count: int = 0) -> None:
        with self._cond:
            if self._closed:
                return
            self._runs.append([kind, channel, BROADCAST, b"", count, None, None, None])
            if self._writer_waiting:
                self._cond.notify_all()

    def notify_ready(self) -> None:
        """Tell the primary this worker is ready."""
        self._control(READY)

    def _write_loop(self) -> None:
        cond = self._cond
        pack = HEADER.pack
        index = self.index
        sock = self._sock
        while True:
            with cond:
                while not self._runs:
                    if self._closing or self._closed:
                        self._closed = True
                        cond.notify_all()
                        return
                    self._writer_waiting = True
                    cond.wait()
                    self._writer_waiting = False
                runs, self._runs = self._runs, []
                self._inflight = self._pending
                self._pending = 0
                self._writing = True  # no direct write may interleave with ours
            parts: List[Any] = []
            messages = 0
            for kind, channel, dest, body, count, _o, _n, _t in runs:
                if kind != _RAW:
                    parts.append(pack(len(channel) + len(body), kind, len(channel), index, dest, count))
                    parts.append(channel)
                parts.append(body)
                if kind == DATA:
                    messages += count
            try:
                sock.sendall(b"".join(parts))
            except OSError as exc:
                logger.error("worker %d: writing to the primary failed: %s", index, exc)
                with cond:
                    self._closed = True
                    cond.notify_all()
                return
            with cond:
                self.frames_out += len(runs)
                self.messages_out += messages
                self._inflight = 0
                self._writing = False
                cond.notify_all()  # room for blocked publishers; flush() waits for this too

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything published so far is written; True if it was."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (not self._runs and not self._writing) or self._closed, timeout
            ) and not self._runs

    # -- reading -----------------------------------------------------------

    def _read_loop(self) -> None:
        sock = self._sock
        unpack = HEADER.unpack_from
        buf = bytearray()
        try:
            while True:
                try:
                    data = sock.recv(READ_SIZE)
                except OSError:
                    data = b""
                if not data:
                    break
                buf += data
                n = len(buf)
                off = 0
                while n - off >= HEADER_SIZE:
                    body_len, kind, clen, _origin, _dest, count = unpack(buf, off)
                    end = off + HEADER_SIZE + body_len
                    if end > n:
                        break
                    start = off + HEADER_SIZE
                    if kind == DATA:
                        self._dispatch(bytes(buf[start : start + clen]), bytes(buf[start + clen : end]))
                    elif kind == ACK:
                        channel = bytes(buf[start : start + clen])
                        with self._cond:
                            self._acks[channel] = self._acks.get(channel, 0) + 1
                            self._cond.notify_all()
                    elif kind == PING:
                        self._control(PONG, b"", count)
                    elif kind == STOP:
                        self._on_stop()
                    off = end
                del buf[:off]
        except ProtocolError as exc:
            logger.error("worker %d: bad frame from the primary: %s", self.index, exc)
        self._on_eof()

    def _dispatch(self, channel: bytes, body: bytes) -> None:
        """Hand the records of one DATA frame to the channel's hubs, a run of one topic at a time."""
        members = self._members.get(channel)
        if not members:
            return
        unpack_size = SIZE.unpack_from
        unpack_meta = META.unpack_from
        end = len(body)
        pos = 0
        meta = None
        batch: List[bytes] = []
        while pos < end:
            (size,) = unpack_size(body, pos)
            pos += 4
            if size & SAME_META:
                if meta is None:
                    raise ProtocolError("the first record of a frame has no metadata")
                size &= ~SAME_META
            else:
                if batch:
                    self._deliver(members, meta, batch)
                    batch = []
                olen, nlen, tlen = unpack_meta(body, pos)
                pos += 5
                o_end = pos + olen
                n_end = o_end + nlen
                t_end = n_end + tlen
                if t_end > end:
                    raise ProtocolError("record metadata runs past the end of its frame")
                meta = (body[pos:o_end], body[o_end:n_end], body[n_end:t_end])
                pos = t_end
            stop = pos + size
            if stop > end:
                raise ProtocolError("record runs past the end of its frame")
            batch.append(body[pos:stop])
            pos = stop
        if batch:
            self._deliver(members, meta, batch)

    def _deliver(self, members: Tuple[Tuple[bytes, DeliverBatch], ...], meta: Any, batch: List[bytes]) -> None:
        origin, ns, topic = meta
        self.messages_in += len(batch)
        origin_s = origin.decode()
        ns_s = ns.decode()
        topic_s = topic.decode()
        for hub_id, deliver in members:
            if hub_id != origin:
                try:
                    deliver(ns_s, topic_s, origin_s, batch)
                except Exception:  # the hub contains its own errors; this is a last guard
                    _ratelimited("deliver", logging.ERROR, "delivery failed", exc_info=True)

    def _on_stop(self) -> None:
        """The primary asks this worker to stop; all it sent before is delivered. SIGTERM ourselves."""
        logger.info("worker %d (pid %d): stop requested by the primary", self.index, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_eof(self) -> None:
        with self._cond:
            closing = self._closing
            self._closed = True
            self._cond.notify_all()
        if closing:
            return
        logger.error(
            "worker %d (pid %d): the connection to the primary closed; exiting", self.index, os.getpid()
        )
        timer = threading.Timer(ORPHAN_GRACE, os._exit, args=(1,))
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)

    # -- state -------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """Counters of this worker's link."""
        return {
            "driver": "cluster",
            "worker": self.index,
            "frames_out": self.frames_out,
            "messages_out": self.messages_out,
            "messages_in": self.messages_in,
            "dropped": self.dropped,
            "pending_bytes": self._pending + self._inflight,
        }

    def close(self, timeout: Optional[float] = 5.0) -> None:
        """Write what is pending (waiting up to ``timeout``), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._writer.is_alive() and self._writer is not threading.current_thread():
            self._writer.join(timeout)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
