"""The worker's end of its pipe to the primary.

One link per worker process, shared by every hub in it. Publishing appends a
record to a pending run and returns; a writer thread turns the pending runs
into frames and writes them in one call, so messages published back to back
leave in one batch while a lone message leaves at once. A reader thread
parses frames from the primary and hands each record to the hubs subscribed
to its channel. When the primary's end closes, the worker exits.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import select
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._log import RateLimitedLog, logger
from ..message import Address, delivering, delivering_on
from ..sync.base import OnUnreachable, tell_watcher
from .loop import start_thread
from .wire import (
    ACK,
    ADVERT,
    BROADCAST,
    DATA,
    FRAME_TARGET,
    INTEREST,
    HEADER,
    HEADER_SIZE,
    PING,
    PONG,
    PRESENCE,
    READY,
    RUN,
    SIZE,
    STOP,
    SUB,
    SYNC,
    UNREACHABLE,
    UNSUB,
    ProtocolError,
    pack_sizes,
    parse_records,
    parse_tagged,
    Run,
    TaggedRun,
)

__all__ = ["WorkerLink", "current_link", "Route"]
#: A publish this long after the previous one, with nothing pending, is written at once by the
#: publishing thread (no hand-off to the writer thread: a lone message leaves without delay).
#: Publishes closer together are batched by the writer thread.
DIRECT_GAP = 0.0002
#: A pending entry holding bytes already framed (the rest of a partial direct write).
_RAW = 0
READ_SIZE = 1024 * 1024
#: While a thread reads the pipe in ``get()`` or an event loop reads it, the reader thread stands by and
#: looks every TICK seconds (up to TICK_MAX when nothing arrives) for data nobody has read for a whole tick
#: (a loop that is blocked, a thread busy elsewhere): it reads that itself. It takes the pipe back LINGER
#: seconds after the last thread left ``get()``.
TICK = 0.002
TICK_MAX = 0.05
LINGER = 0.002
#: read_on_loop() waits at most this long for the thread reading before to let go.
HANDOVER = 1.0
_POLLIN = select.POLLIN
#: Seconds between a lost primary and a hard exit, for SIGTERM handlers to run.
ORPHAN_GRACE = 1.0

_current: Optional["WorkerLink"] = None
_ratelimited = RateLimitedLog()

#: Where a message goes: (channel, dest, to hub, origin hub, namespace, topic); see WorkerLink.route.
Route = Tuple[bytes, int, bytes, bytes, bytes, bytes]
#: Routes a link interns at most (then it starts again: consecutive messages merely share less).
MAX_ROUTES = 4096
#: One hub on a channel: (hub id, deliver_batch, on_unreachable).
#: One hub on a channel: (hub id, deliver, on_unreachable, whether deliver takes runs with their tags split off).
Member = Tuple[str, Callable[..., Any], Optional[OnUnreachable], bool]
_pack_size = SIZE.pack
_pack_run = RUN.pack


_monotonic = time.monotonic


def _wake_pipe() -> Tuple[int, int]:
    """A non-blocking pipe that wakes a thread out of its poll: (read end, write end)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _poke(fd: int) -> None:
    """Write one byte to a wake-up pipe (a full pipe already has bytes to wake on)."""
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass


def _drain(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty."""
    try:
        while os.read(fd, 64):
            pass
    except OSError:  # BlockingIOError: empty
        pass


def _remove_reader(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Stop ``loop`` watching ``fd``, from its own thread or any other."""
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.remove_reader(fd)
    else:
        try:
            loop.call_soon_threadsafe(loop.remove_reader, fd)
        except RuntimeError:  # closed meanwhile
            pass


def current_link() -> Optional["WorkerLink"]:
    """The link of this worker process, or None outside a worker."""
    return _current


def _set_current(link: Optional["WorkerLink"]) -> None:
    global _current
    _current = link


class WorkerLink:
    """Batched, thread-safe framing over the worker's socket to the primary (a ``ClusterTransport``)."""

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
        self.pid = os.getpid()
        self.max_message = max_message
        self.out_limit = out_limit
        self.publish_block = publish_block
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Where the reader thread stands by while a thread or a loop reads (its own waiters: the writer's
        # wake-ups on _cond do not reach it).
        self._park = threading.Condition(self._lock)
        # Pending frames, in publish order: [kind, channel, dest, body, count] for control frames and
        # raw bytes; a DATA frame's body is its runs, [(route, [data, ...]), ...], and its count 0.
        self._runs: List[List[Any]] = []
        # The run being filled (the last of the last pending frame, a DATA frame), its messages, and
        # the bytes its frame may still take before FRAME_TARGET.
        self._open: Optional[Route] = None
        self._datas: List[bytes] = []
        self._room = 0
        self._routes: Dict[Route, Route] = {}
        self._pending = 0  # bytes in _runs
        self._inflight = 0  # bytes taken by the writer and not yet written
        self._writer_waiting = False
        self._closing = False
        self._closed = False
        self._members: Dict[bytes, Tuple[Member, ...]] = {}
        # channel -> (its members, whether one takes plain runs, whether one takes tagged runs): the reading
        # thread's cache, keyed by the members tuple it was computed from.
        self._forms: Dict[bytes, Tuple[Tuple[Member, ...], bool, bool]] = {}
        self._sub_seq = 0  # numbers every SUB this link sends; the primary's ACK carries it back
        self._acks: Dict[bytes, int] = {}  # channel -> the highest SUB number acknowledged, while it has members
        # channel -> topic or pattern -> how many hubs here want it (the primary hears of the first and the last)
        self._interest: Dict[bytes, Dict[bytes, int]] = {}
        # The presence table of each channel with members, as the primary sends it: {(worker, body): None}.
        self._presence: Dict[bytes, Dict[Tuple[int, bytes], None]] = {}
        self._watchers: Dict[bytes, Tuple[Callable[[Address, str, bool], Any], ...]] = {}
        self._sync_sent = 0
        self._synced = 0
        self._last_publish = 0.0
        self._writing = False
        self.frames_out = 0
        self.messages_out = 0
        self.messages_in = 0
        self.dropped = 0
        #: Frames from the primary that did not parse (dropped; the primary checks them first, so 0).
        self.malformed = 0
        #: Addressed messages that arrived for a hub no longer here (the publisher is told).
        self.unreachable = 0
        self._reader: Optional[threading.Thread] = None
        self._writer: Optional[threading.Thread] = None
        # The reading role (see _read_loop): its lock, the start of a frame not all arrived yet, whether the
        # primary has closed, and how many readings were done.
        self._role = threading.Lock()
        # The read buffer, allocated once: a recv() of READ_SIZE into a new bytes object costs an mmap and
        # its page faults on every call (about 20 µs here, for a frame of one message). An anonymous map:
        # its pages take memory only once a read reaches them (a bytearray would hold 1 MiB from the start).
        self._rview = memoryview(mmap.mmap(-1, READ_SIZE))
        self._rest = bytearray()
        self._eof = False
        self._reads = 0
        # What wakes each thread reading in get() (read_until; one entry per thread), and when the reader thread
        # may take over.
        self._fg_conds: List[threading.Condition] = []
        self._fg_until = 0.0
        self._tick = TICK  # the reader thread's current check interval while it stands by
        # The thread holding the role in get() polls the socket and its own wake pipe: what it waits for may
        # come another way (a publish in this process, a close), and interrupt_reading() tells it.
        self._fg_polling = False
        self._fg_wake_r, self._fg_wake_w = _wake_pipe()
        self._fg_poll = select.poll()
        self._fg_poll.register(sock.fileno(), _POLLIN)
        self._fg_poll.register(self._fg_wake_r, _POLLIN)
        # The event loop reading the pipe (read_on_loop), and how many hubs asked for it.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_users = 0
        # What gets the reader thread out of its poll when a thread or a loop starts reading.
        self._selecting = False
        self._wake_r, self._wake_w = _wake_pipe()

    def start(self) -> None:
        """Start the reader and writer threads, and say hello (the primary's liveness clock starts)."""
        self._reader = start_thread(self._read_loop, name="clustersync-reader")
        self._writer = start_thread(self._write_loop, name="clustersync-writer")
        self._control(PONG)

    # -- membership --------------------------------------------------------

    def add_member(
        self,
        channel: bytes,
        hub_id: bytes,
        deliver: Callable[..., Any],
        on_unreachable: Optional[OnUnreachable],
        tagged: bool = False,
    ) -> int:
        """Route ``channel`` to ``deliver`` (skipping ``hub_id``'s own messages).

        ``deliver(namespace, topic, origin, datas)`` takes a run of messages;
        with ``tagged``, ``deliver(namespace, topic, origin, tags, values)``
        takes them with each one's first byte split off (see
        :func:`~clustersync.relay.wire.parse_tagged`). Returns the sequence
        number :meth:`wait_acked` waits for.
        """
        member = (hub_id.decode(), deliver, on_unreachable, tagged)
        with self._cond:
            self._members[channel] = self._members.get(channel, ()) + (member,)
            self._sub_seq += 1
            seq = self._sub_seq
            if not self._closed:  # queued under the same lock: SUBs leave in the order of their numbers
                self._append([SUB, channel, BROADCAST, b"", seq])
        return seq

    def remove_member(self, channel: bytes, hub_id: bytes) -> None:
        """Stop routing ``channel`` to ``hub_id``."""
        hid = hub_id.decode()
        with self._cond:
            members = tuple(m for m in self._members.get(channel, ()) if m[0] != hid)
            if members:
                self._members[channel] = members
            else:
                self._members.pop(channel, None)
                self._forms.pop(channel, None)
                self._acks.pop(channel, None)
                self._presence.pop(channel, None)
                self._interest.pop(channel, None)  # the primary forgets it with the last UNSUB
        if not self._closed:
            self._control(UNSUB, channel)

    def interest(self, channel: bytes, topic: bytes, on: bool) -> int:
        """A hub here wants ``topic`` (or a pattern) on ``channel``, or no longer; return the number
        :meth:`wait_acked` waits for (the primary routes by it once acknowledged)."""
        with self._cond:
            table = self._interest.setdefault(channel, {})
            held = table.get(topic, 0) + (1 if on else -1)
            if held > 0:
                table[topic] = held
            else:
                table.pop(topic, None)
            if (on and held != 1) or (not on and held != 0) or self._closed:
                return self._sub_seq  # another hub here already wants it (or still does)
            self._sub_seq += 1
            seq = self._sub_seq
            self._append([INTEREST, channel, 1 if on else 0, topic, seq])
            return seq

    def advertise(self, channel: bytes, hub_id: bytes, entry: bytes, on: bool) -> None:
        """Add (``on``) or withdraw this hub's ``entry`` in the channel's presence table."""
        self._control(ADVERT, channel, 1 if on else 0, BROADCAST, hub_id + b"\0" + entry)

    def sync(self, timeout: Optional[float]) -> bool:
        """Wait until everything the primary had queued for this worker when it saw our request has arrived.

        After it, every presence change the primary had processed is in this worker's tables.
        """
        with self._cond:
            self._sync_sent += 1
            seq = self._sync_sent
            if self._closed:
                return False
            self._append([SYNC, b"", BROADCAST, b"", seq])
            return self._cond.wait_for(lambda: self._synced >= seq or self._closed, timeout) and not self._closed

    def watch_presence(self, channel: bytes, fn: Callable[[Address, str, bool], Any]) -> Callable[[], None]:
        """Call ``fn(address, entry, present)`` for every entry now in the table, then for every change.

        Returns the function that stops it. ``fn`` runs on the reader thread.
        """
        with self._cond:
            self._watchers[channel] = self._watchers.get(channel, ()) + (fn,)
            current = list(self._presence.get(channel, {}))
        for worker, body in current:
            self._tell(fn, worker, body, True)

        def unwatch() -> None:
            with self._cond:
                kept = tuple(f for f in self._watchers.get(channel, ()) if f is not fn)
                if kept:
                    self._watchers[channel] = kept
                else:
                    self._watchers.pop(channel, None)

        return unwatch

    @staticmethod
    def _tell(fn: Callable[[Address, str, bool], Any], worker: int, body: bytes, present: bool) -> None:
        hub_id, _, entry = body.partition(b"\0")
        address = Address(worker, hub_id.decode("utf-8", "replace"))
        tell_watcher(fn, address, entry.decode("utf-8", "replace"), present)

    def _on_presence(self, channel: bytes, worker: int, body: bytes, present: bool) -> None:
        with self._cond:
            if channel not in self._members:
                return  # a channel we have left
            table = self._presence.setdefault(channel, {})
            key = (worker, body)
            if present == (key in table):
                return
            if present:
                table[key] = None
            else:
                del table[key]
            watchers = self._watchers.get(channel, ())
        for fn in watchers:
            self._tell(fn, worker, body, present)

    def wait_acked(self, channel: bytes, seq: int, timeout: Optional[float]) -> bool:
        """Wait until the primary has seen subscription number ``seq`` on ``channel``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._acks.get(channel, 0) >= seq or self._closed, timeout
            ) and not self._closed

    # -- writing -----------------------------------------------------------

    def route(self, channel: bytes, dest: int, to: bytes, origin: bytes, ns: bytes, topic: bytes) -> Route:
        """Where a message goes, as :meth:`publish` takes it: ``dest`` a worker index or BROADCAST, ``to`` the
        one hub there (or empty), ``origin`` the publishing hub's id. Equal routes come back as one object
        (interned, at most :data:`MAX_ROUTES`), and consecutive messages on one route share their metadata.
        """
        key = (channel, dest, to, origin, ns, topic)
        routes = self._routes
        found = routes.get(key)
        if found is None:
            if len(routes) >= MAX_ROUTES:
                routes.clear()
            found = routes[key] = key
        return found

    def publish(self, route: Route, data: bytes) -> None:
        """Queue one message on ``route`` (see :meth:`route`).

        Consecutive messages to the same channel and destination share a
        frame (up to :data:`FRAME_TARGET` bytes); consecutive ones on the
        same route object share a run. Waits up to ``publish_block`` seconds
        when the outgoing buffer is full, then raises ``BufferError`` (the
        message is dropped and counted).
        """
        size = len(data)
        if size > self.max_message:  # the hub never sends one (its limit is ours): a last guard
            raise ValueError(f"message of {size} bytes is over the relay's max_message ({self.max_message} bytes)")
        lock = self._lock  # the Condition's own lock: taken without a Python-level call (cheaper than ``with``)
        lock.acquire()
        try:
            # The fast path: one more message on the run being filled, with room in its frame and the buffer.
            if self._open is route and self._room >= size + 4 and not self._closed:
                if self._pending + self._inflight + size <= self.out_limit:
                    self._room -= size + 4
                    self._datas.append(data)
                    self._pending += size
                    return
            self._publish_slow(route, data, size)
        finally:
            lock.release()

    def _publish_slow(self, route: Route, data: bytes, size: int) -> None:
        """With the lock held: write at once, start a run or a frame, or wait for room."""
        if self._closed:
            raise ConnectionError("the connection to the relay is closed")
        if self._pending + self._inflight + size > self.out_limit and self._pending:
            self._wait_for_room(size)  # the writer may take the pending frames meanwhile
        runs = self._runs
        now = _monotonic()
        if not runs and not self._writing and now - self._last_publish > DIRECT_GAP:
            self._last_publish = now
            self._write_now(route, data)
            return
        self._last_publish = now
        channel, dest, to, origin, ns, topic = route
        self._pending += size
        open_route = self._open
        if open_route is not None and open_route[0] == channel and open_route[1] == dest:
            # The last pending frame is on this channel and destination: a new run in it, if it fits
            # (an addressed frame holds one publisher's runs).
            if open_route is route and self._room >= size + 4:
                self._room -= size + 4
                self._datas.append(data)
                return
            head = 10 + len(to) + len(origin) + len(ns) + len(topic)
            if self._room >= head + size + 4 and (dest == BROADCAST or open_route[3] == origin):
                datas = [data]
                runs[-1][3].append((route, datas))
                self._open, self._datas = route, datas
                self._room -= head + size + 4
                return
        datas = [data]
        self._append([DATA, channel, dest, [(route, datas)], 0])
        self._open, self._datas = route, datas
        # The frame's header (14), its run's head (10) and names, this message's size field (4) and data.
        self._room = FRAME_TARGET - 28 - len(channel) - len(to) - len(origin) - len(ns) - len(topic) - size

    def _append(self, entry: List[Any]) -> None:
        """With the lock held: queue a frame after the pending ones, and wake the writer if it waits."""
        self._runs.append(entry)
        self._open = None
        if self._writer_waiting:
            self._writer_waiting = False  # once: it takes everything pending when it runs
            self._cond.notify_all()

    def _write_now(self, route: Route, data: bytes) -> None:
        """With the lock held and nothing pending: write one message's frame without blocking.

        What the socket does not take at once goes to the writer thread, first in line.
        """
        channel, dest, to, origin, ns, topic = route
        body = (
            _pack_run(1, len(origin), len(to), len(ns), len(topic)) + origin + to + ns + topic
            + _pack_size(len(data)) + data
        )
        frame = HEADER.pack(len(channel) + len(body), DATA, len(channel), self.index, dest, 1) + channel + body
        try:
            sent = self._sock.send(frame, socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError, or a broken pipe the writer thread meets and reports
            sent = 0
        self.frames_out += 1
        self.messages_out += 1
        if sent < len(frame):
            self._pending += len(frame) - sent
            self._append([_RAW, b"", 0, frame[sent:], 0])

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
            raise ConnectionError("the connection to the relay is closed")

    def _control(self, kind: int, channel: bytes = b"", count: int = 0, dest: int = BROADCAST, body: bytes = b"") -> None:
        with self._cond:
            if self._closed:
                return
            self._append([kind, channel, dest, body, count])

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
                self._open = None  # what publish() fills from now on is a frame of the next batch
                self._inflight = self._pending
                self._pending = 0
                self._writing = True  # no direct write may interleave with ours
            parts: List[Any] = []
            messages = 0
            for entry in runs:
                kind, channel, dest, body, count = entry
                if kind == _RAW:
                    parts.append(body)
                elif kind == DATA:
                    at = len(parts)
                    parts.append(b"")  # the header, once the size is known
                    parts.append(channel)
                    size = len(channel)
                    count = 0
                    for route, datas in body:
                        _c, _d, to, origin, ns, topic = route
                        lens = list(map(len, datas))
                        head = _pack_run(len(lens), len(origin), len(to), len(ns), len(topic)) + origin + to + ns + topic
                        sizes = pack_sizes(lens)
                        parts.append(head)
                        parts.append(sizes)
                        parts.extend(datas)  # one copy, by the join below
                        size += len(head) + len(sizes) + sum(lens)
                        count += len(lens)
                    parts[at] = pack(size, kind, len(channel), index, dest, count)
                    messages += count
                else:
                    parts.append(pack(len(channel) + len(body), kind, len(channel), index, dest, count))
                    parts.append(channel)
                    parts.append(body)
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

    # The reading role. Whoever holds ``_role`` reads the socket and hands frames out: the reader thread by
    # default; a thread waiting in get() (read_until), for no hand-off between threads; or an event loop
    # (read_on_loop). ``_rest`` (a frame not yet whole) is theirs in turn. While a thread or a loop reads,
    # the reader thread stands by (waiting on ``_park``) and only reads what nobody has read for a tick.

    def _parked(self) -> bool:
        """Should the reader thread stand by? (Read without the lock: see _read_loop.)"""
        if self._eof:
            return False
        if self._fg_conds or self._loop is not None:
            return True
        until = self._fg_until
        return bool(until) and _monotonic() < until

    def _read_loop(self) -> None:
        """The reader thread: read until EOF, or stand by while another thread or a loop reads."""
        cond = self._cond
        role = self._role
        sock = self._sock
        poller = select.poll()
        poller.register(sock.fileno(), _POLLIN)
        poller.register(self._wake_r, _POLLIN)
        fd = sock.fileno()
        watch = select.poll()  # the socket alone: has it something to read now?
        watch.register(fd, _POLLIN)
        tick = TICK
        seen = -1  # the count of readings at the previous tick
        stale = False  # data waited unread at the previous tick
        delivering_on(True)  # this thread does nothing else
        try:
            while not self._eof:
                if self._parked():
                    with cond:
                        wait = tick
                        if not self._fg_conds and self._loop is None:  # only the linger: wake when it ends
                            wait = min(tick, max(0.0, self._fg_until - _monotonic()))
                        self._tick = tick
                        self._park.wait(wait)
                        loop = self._loop
                        if loop is not None and loop.is_closed():  # its reader went with it
                            self._loop, self._loop_users = None, 0
                        if not self._parked():
                            self._fg_until = 0.0
                            continue
                    # The watchdog: read what has waited a whole tick with nobody reading (a loop blocked in
                    # a long call, a thread gone from get() for longer than it said); nothing otherwise.
                    quiet = self._reads == seen
                    waiting = quiet and bool(watch.poll(0))
                    if waiting and stale and role.acquire(False):
                        try:
                            for _ in range(64):
                                if not self._read_once(False) or not watch.poll(0):
                                    break
                        finally:
                            role.release()
                            self._freed(None)
                        waiting = False
                    stale = waiting
                    tick = min(tick * 2, TICK_MAX) if quiet and not waiting else TICK
                    seen = self._reads
                    continue
                tick, stale = TICK, False
                if not role.acquire(timeout=TICK):  # a thread in get() or a loop reads it now
                    continue
                try:
                    # Hold the role while polling; a thread or a loop that starts reading wakes this one out
                    # of its poll through the pipe, and it lets go. The order of the two steps below (say it
                    # polls, then look) and theirs (register, then look) means one of the two always sees
                    # the other, without a lock.
                    while True:
                        self._selecting = True
                        if self._parked():
                            break
                        events = poller.poll()
                        self._selecting = False
                        for efd, _mask in events:
                            if efd != fd:
                                _drain(self._wake_r)
                            elif not self._read_once(False):
                                break
                        if self._eof:
                            break
                finally:
                    self._selecting = False
                    role.release()
                    self._freed(None)
        finally:
            with cond:
                self._selecting = False
                wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
                self._close_fg_pipe()  # or the last thread to leave get() does
            os.close(wake_r)
            os.close(wake_w)

    def _wake_reader(self) -> None:
        """With ``_cond`` held: get the reader thread out of its poll, so it stands by."""
        if self._selecting and self._wake_w >= 0:
            _poke(self._wake_w)

    def _freed(self, mine: Optional[threading.Condition]) -> None:
        """The role was just released: threads waiting in get() for it may take it."""
        conds = tuple(self._fg_conds)  # a copy (atomic): threads come and go meanwhile
        if not conds or (len(conds) == 1 and conds[0] is mine):
            return
        for wake in conds:
            if wake is not mine:
                with wake:
                    wake.notify_all()

    def _read_once(self, mark: bool = True) -> bool:
        """With the role held: read what the socket has (without waiting) and hand out every whole frame.

        ``mark``: flag this thread as delivering meanwhile (the reader thread is flagged for good).
        Returns False at EOF (handled here, once).
        """
        if self._eof:
            return False
        rview = self._rview
        try:
            got = self._sock.recv_into(rview, READ_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            got = 0
        if not got:
            self._eof = True
            with self._cond:
                self._park.notify_all()  # the reader thread ends
            self._on_eof()
            return False
        self._reads += 1
        chunk = rview[:got]
        rest = self._rest
        if rest:
            rest += chunk
            view: Any = memoryview(rest)
        else:
            view = chunk
        # Frames are cut from the view with bytes(): each byte kept is copied once from the read buffer.
        n = len(view)
        off = 0
        unpack = HEADER.unpack_from
        if mark:
            delivering_on(True)
        try:
            while n - off >= HEADER_SIZE:
                body_len, kind, clen, origin, dest, count = unpack(view, off)
                end = off + HEADER_SIZE + body_len
                if end > n:
                    break
                start = off + HEADER_SIZE
                try:
                    self._frame(kind, bytes(view[start : start + clen]), origin, dest, count, bytes(view[start + clen : end]))
                except ProtocolError as exc:
                    self.malformed += 1
                    _ratelimited(
                        "malformed",
                        logging.ERROR,
                        "worker %d: dropped a malformed frame sent by worker %d: %s (%d so far)",
                        self.index,
                        origin,
                        exc,
                        self.malformed,
                    )
                except Exception:  # a bug of ours: never let it silence this worker
                    self.malformed += 1
                    _ratelimited("frame", logging.ERROR, "worker %d: handling a frame failed", self.index, exc_info=True)
                off = end
        finally:
            if mark:
                delivering_on(False)
            if view is chunk:
                self._rest = bytearray(chunk[off:]) if off < n else bytearray()
            else:
                view.release()
                del rest[:off]
            chunk.release()
        return True

    def read_until(self, ready: Callable[[], bool], timeout: Optional[float], wake: threading.Condition) -> None:
        """Read and hand out frames on this thread until ``ready()`` (or ``timeout``, or EOF).

        For a thread waiting in ``Subscription.get()``: its message reaches it
        with no hand-off from the reader thread. Callbacks of the frames read
        meanwhile run here too. While another thread holds the reading role,
        this one waits on ``wake`` (its queue's condition: a delivery or a
        release of the role notifies it). Returns at once when an event loop
        reads the pipe, or on a thread already delivering (a callback).
        """
        if self._loop is not None or self._eof or delivering():
            return
        deadline = None if timeout is None else _monotonic() + timeout
        role = self._role
        lock = self._lock  # _cond's, taken without a Python-level call (cheaper than ``with``)
        lock.acquire()
        try:
            if self._eof:
                return
            self._fg_conds.append(wake)
            if self._selecting:
                self._wake_reader()
        finally:
            lock.release()
        try:
            while not ready() and not self._eof and self._loop is None:
                remaining = None if deadline is None else deadline - _monotonic()
                if remaining is not None and remaining <= 0:
                    return
                if role.acquire(False):
                    try:
                        poller = self._fg_poll
                        fd = self._sock.fileno()
                        while True:
                            self._fg_polling = True  # before the check: a delivery after it writes to the pipe
                            if ready():
                                return
                            if remaining is not None:
                                remaining = deadline - _monotonic()  # type: ignore[operator]
                                if remaining <= 0:
                                    return
                            events = poller.poll(None if remaining is None else int(remaining * 1000.0) + 1)
                            self._fg_polling = False
                            for efd, _mask in events:
                                if efd != fd:
                                    _drain(self._fg_wake_r)
                                elif not self._read_once():
                                    return
                            if self._loop is not None:
                                return  # an event loop reads it from now on
                    finally:
                        self._fg_polling = False
                        role.release()
                        self._freed(wake)
                else:
                    with wake:
                        wake.wait_for(lambda: ready() or not role.locked() or self._eof, remaining)
        finally:
            lock.acquire()
            try:
                self._fg_conds.remove(wake)
                self._fg_until = _monotonic() + LINGER
                if self._eof:
                    self._close_fg_pipe()
                elif not self._fg_conds and self._tick > LINGER:
                    self._park.notify()  # it waits long: make it take the pipe back when the linger ends
            finally:
                lock.release()

    def interrupt_reading(self) -> None:
        """What a thread in :meth:`read_until` waits for may have come another way (a message published in
        this process, a closed subscription): the thread holding the role in its poll looks again."""
        if self._fg_polling:
            with self._cond:  # the pipe is closed under the same lock, once nobody reads (see _close_fg_pipe)
                if self._fg_polling and self._fg_wake_w >= 0:
                    _poke(self._fg_wake_w)

    def _close_fg_pipe(self) -> None:
        """With ``_cond`` held, after EOF and once no thread reads in get(): close the pipe that wakes them."""
        if not self._fg_conds and self._fg_wake_w >= 0:
            os.close(self._fg_wake_r)
            os.close(self._fg_wake_w)
            self._fg_wake_r = self._fg_wake_w = -1

    def read_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read and hand out frames on ``loop`` from now on (call on that loop's thread).

        Calls add up; :meth:`stop_reading_on_loop` undoes one. Raises
        ``RuntimeError`` while another open loop reads this pipe, and
        ``ConnectionError`` once the primary is gone.
        """
        with self._cond:
            if self._eof or self._closed:
                raise ConnectionError("the connection to the relay is closed")
            current = self._loop
            if current is loop:
                self._loop_users += 1
                return
            if current is not None and not current.is_closed():
                raise RuntimeError("this worker's pipe is already read on another event loop")
            self._loop, self._loop_users = loop, 1
            self._wake_reader()
            if self._fg_polling and self._fg_wake_w >= 0:  # a thread polling in get() lets go too
                _poke(self._fg_wake_w)
        # From the return on, this loop reads: wait (bounded: a callback may be running on the thread that
        # holds the role) until whoever read before has let go.
        if self._role.acquire(timeout=HANDOVER):
            self._role.release()
        loop.add_reader(self._sock.fileno(), self._loop_readable, loop)

    def stop_reading_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Undo one :meth:`read_on_loop`; the reader thread reads again after the last (from any thread)."""
        with self._cond:
            if self._loop is not loop:
                return
            self._loop_users -= 1
            if self._loop_users > 0:
                return
            self._loop, self._loop_users = None, 0
            self._park.notify_all()  # the reader thread takes over
        _remove_reader(loop, self._sock.fileno())

    def _resume_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and not self._eof:
            loop.add_reader(self._sock.fileno(), self._loop_readable, loop)

    def _loop_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop's reader callback."""
        role = self._role
        if self._loop is not loop:
            _remove_reader(loop, self._sock.fileno())  # stopped meanwhile
            return
        if not role.acquire(False):
            # Another thread reads it this moment (the reader thread letting go, its watchdog): look again
            # in a tick, not at once (the socket stays readable: the loop would spin meanwhile).
            fd = self._sock.fileno()
            loop.remove_reader(fd)
            loop.call_later(TICK, self._resume_on_loop, loop)
            return
        try:
            alive = self._read_once()
        finally:
            role.release()
            self._freed(None)
        if not alive:
            with self._cond:
                if self._loop is loop:
                    self._loop, self._loop_users = None, 0
            _remove_reader(loop, self._sock.fileno())

    def _frame(self, kind: int, channel: bytes, origin: int, dest: int, count: int, body: bytes) -> None:
        if kind == DATA:
            members = self._members.get(channel)
            if members:
                forms = self._forms.get(channel)
                if forms is None or forms[0] is not members:  # the members changed: which forms they take
                    forms = self._forms[channel] = (
                        members, any(not m[3] for m in members), any(m[3] for m in members)
                    )
                plain = parse_records(body) if forms[1] else None  # plain runs, tagged ones, or (rarely) both
                tagged = parse_tagged(body) if forms[2] else None
                self._dispatch(channel, members, origin, plain, tagged)
        elif kind == ACK:
            with self._cond:
                if channel in self._members:  # an ACK for a channel we have left is stale
                    self._acks[channel] = max(self._acks.get(channel, 0), count)
                    self._cond.notify_all()
        elif kind == PING:
            self._control(PONG, b"", count)
        elif kind == STOP:
            self._on_stop()
        elif kind == UNREACHABLE:
            self._unreachable(channel, origin, count, body)
        elif kind == PRESENCE:
            self._on_presence(channel, origin, body, bool(count))
        elif kind == SYNC:
            with self._cond:
                self._synced = max(self._synced, count)
                self._cond.notify_all()

    def _dispatch(
        self,
        channel: bytes,
        members: Tuple[Member, ...],
        worker: int,
        plain: Optional[List[Run]],
        tagged: Optional[List[TaggedRun]],
    ) -> None:
        """Hand each run of records to the channel's hubs (all but the publisher; only ``to`` if set),
        each in the form it asked for: ``plain`` runs, or ``tagged`` ones (the same runs, tags split off)."""
        mine = worker == self.index
        runs: List[Any] = plain if plain is not None else tagged  # type: ignore[assignment]
        for i, run in enumerate(runs):
            origin, to, ns, topic = run[0], run[1], run[2], run[3]
            count = len(run[-1])
            self.messages_in += count
            address = Address(worker, origin)
            found = False
            for hub_id, deliver, _u, wants_tags in members:
                if (to and hub_id != to) or (mine and hub_id == origin):
                    continue
                found = True
                try:
                    if wants_tags:
                        t = tagged[i]  # type: ignore[index]
                        deliver(ns, topic, address, t[4], t[5])
                    else:
                        deliver(ns, topic, address, plain[i][4])  # type: ignore[index]
                except Exception:  # the hub contains its own errors; this is a last guard
                    _ratelimited("deliver", logging.ERROR, "delivery failed", exc_info=True)
            if to and not found:
                self.unreachable += count
                body = origin.encode() + b"\0" + to.encode()
                self._control(UNREACHABLE, channel, count, worker, body)

    def _unreachable(self, channel: bytes, worker: int, count: int, body: bytes) -> None:
        """Addressed messages of one of our hubs found nobody: tell that hub."""
        publisher, _, to = body.partition(b"\0")
        hub_id = publisher.decode("utf-8", "replace")
        destination: Any = Address(worker, to.decode("utf-8", "replace")) if to else worker
        for member_id, _d, on_unreachable, _t in self._members.get(channel, ()):
            if member_id == hub_id and on_unreachable is not None:
                on_unreachable(destination, count)

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
            "malformed": self.malformed,
            "unreachable": self.unreachable,
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
        writer = self._writer
        if writer is not None and writer.is_alive() and writer is not threading.current_thread():
            writer.join(timeout)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
