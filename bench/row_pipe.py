"""Row ``pipe``: a bare relay over socketpairs, hand-tuned, no API -- the ceiling.

The conducting process is the primary: it forks the workers, keeps one AF_UNIX
socketpair per worker and relays.  Publishers batch messages into chunks of up to
64 KiB (``[u32 body length][u8 topic][u32 len, payload]*``); the relay never looks
inside a chunk: it forwards each whole chunk to the subscribers of its topic (a static
routing table), queueing the same bytes object for every destination and writing
with ``sendmsg`` scatter/gather.  Relay and workers use non-blocking sockets and a
poll loop, so nobody deadlocks when everybody both sends and receives; the relay stops
reading while a destination has more than 16 MiB queued (backpressure, no loss).
"""

from __future__ import annotations

import multiprocessing as mp
import select
import socket
import struct
import time
import traceback
from collections import deque

from .common import (
    Control,
    ControlClient,
    PayloadMaker,
    Spec,
    Tracker,
    base_result,
    check_deadline,
    finish,
    kill_processes,
    latency_summary,
)

NAME = "pipe"
TUNING = "pipe: batched frames up to 64 KiB, relay forwards whole chunks with sendmsg, reads into a buffer allocated once, 1 MiB socket buffers"

CHUNK = struct.Struct("<IB")
LEN = struct.Struct("<I")
BATCH_BYTES = 64 * 1024
OUT_HIGH = 256 * 1024  # worker: build more chunks while less than this is pending
RELAY_HIGH = 16 * 1024 * 1024  # relay: stop reading while a destination has this much queued
SOCKBUF = 1 << 20
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
POLLERRS = select.POLLHUP | select.POLLERR | select.POLLNVAL


def available() -> tuple[bool, str]:
    return True, ""


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass


def parse_chunks(buf: bytearray, feed) -> int:
    """Feed every message of the complete chunks in ``buf``; returns bytes consumed."""
    off = 0
    n = len(buf)
    unpack_chunk = CHUNK.unpack_from
    unpack_len = LEN.unpack_from
    while n - off >= 5:
        blen, _topic = unpack_chunk(buf, off)
        end = off + 5 + blen
        if end > n:
            break
        p = off + 5
        while p < end:
            (mlen,) = unpack_len(buf, p)
            p += 4
            feed(buf[p:p + mlen])
            p += mlen
        off = end
    return off


def make_chunk(topic: int, payloads) -> bytes:
    body = bytearray()
    pack_len = LEN.pack
    for p in payloads:
        body += pack_len(len(p))
        body += p
    return CHUNK.pack(len(body), topic) + body


# ------------------------------------------------------------------------ worker


def _worker(sock: socket.socket, inherited: list, wid: int, spec_d: dict, ctl_args: tuple) -> None:
    for s in inherited:  # the relay's ends of every socketpair, inherited by fork
        s.close()
    spec = Spec.from_dict(spec_d)
    ctl = ControlClient(*ctl_args, wid)
    res = base_result(wid)
    sources = spec.sources(wid)
    tracker = Tracker(wid, sources, spec.messages, spec.payload, spec.workers) if sources else None
    try:
        ctl.ready_and_wait(spec.deadline)  # routing is static: ready at once
        if spec.scenario == "latency":
            if wid in (0, 1):
                _latency(sock, wid, spec, tracker, res)
        else:
            _throughput(sock, wid, spec, tracker, res)
    except BaseException:
        res["error"] = traceback.format_exc()
    ctl.finish(res, tracker, wid in spec.active, spec.deadline)
    sock.close()


def _throughput(sock, wid, spec, tracker, res) -> None:
    sock.setblocking(False)
    fd = sock.fileno()
    to_pub = spec.messages if wid in spec.publishers else 0
    make = PayloadMaker(wid, spec.payload)
    per_chunk = max(1, BATCH_BYTES // (spec.payload + 4))
    seq = 0
    out = bytearray()
    inbuf = bytearray()
    rview = memoryview(bytearray(1 << 18))  # read into one buffer: a fresh 256 KiB bytes per recv() costs an mmap
    feed = tracker.feed if tracker is not None else None
    recv_done = tracker is None
    poller = select.poll()
    poller.register(fd, 0)
    mask = -1
    deadline = spec.deadline
    if to_pub:
        res["t_first_pub"] = time.monotonic()
    while True:
        while seq < to_pub and len(out) < OUT_HIGH:
            n = min(to_pub - seq, per_chunk)
            out += make_chunk(wid, [make(i) for i in range(seq, seq + n)])
            seq += n
            res["published"] = seq
        if to_pub and seq >= to_pub and not out and not res["t_pub_done"]:
            res["t_pub_done"] = time.monotonic()
        if recv_done and not out and seq >= to_pub:
            return
        want = (0 if recv_done else POLLIN) | (POLLOUT if out else 0)
        if want != mask:
            poller.modify(fd, want)
            mask = want
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        for _fd, ev in poller.poll(min(left, 1.0) * 1000):
            if ev & POLLOUT:
                try:
                    sent = sock.send(out)
                except BlockingIOError:
                    sent = 0
                del out[:sent]
            if ev & (POLLIN | POLLERRS) and not recv_done:
                try:
                    data = rview[:sock.recv_into(rview)]
                except BlockingIOError:
                    continue
                if not data:
                    raise EOFError("relay closed the connection")
                inbuf += data
                used = parse_chunks(inbuf, feed)
                if used:
                    del inbuf[:used]
                recv_done = tracker.done
            elif ev & POLLERRS:
                raise EOFError("relay connection error")


class _Reader:
    """Blocking reader of chunks for the ping-pong."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.buf = bytearray()
        self.deadline = deadline
        sock.settimeout(0.5)

    def messages(self) -> list:
        out: list = []
        while not out:
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                if time.monotonic() > self.deadline:
                    raise TimeoutError("deadline reached")
                continue
            if not data:
                raise EOFError("relay closed the connection")
            self.buf += data
            used = parse_chunks(self.buf, out.append)
            if used:
                del self.buf[:used]
        return out


def _latency(sock, wid, spec, tracker, res) -> None:
    reader = _Reader(sock, spec.deadline)
    make = PayloadMaker(wid, spec.payload)
    rounds = spec.messages
    if wid == 0:  # pinger
        rtts = []
        perf = time.perf_counter_ns
        res["t_first_pub"] = time.monotonic()
        for k in range(rounds):
            check_deadline(spec.deadline)
            frame = make_chunk(0, (make(k),))
            t0 = perf()
            sock.sendall(frame)
            res["published"] = k + 1
            msgs = reader.messages()  # blocks until the pong (at least one message) is in
            t1 = perf()
            for m in msgs:
                tracker.feed(m)
            if k >= spec.warmup:
                rtts.append(t1 - t0)
        res["latency"] = latency_summary(rtts)
    else:  # ponger
        k = 0
        while k < rounds:
            check_deadline(spec.deadline)
            for m in reader.messages():
                tracker.feed(m)
                sock.sendall(make_chunk(1, (make(k),)))
                k += 1
                res["published"] = k


# ------------------------------------------------------------------------- relay


def _relay(socks: list, spec: Spec, ctl: Control) -> list[str]:
    n = len(socks)
    routes = {p: spec.subscribers(p) for p in range(n)}
    fds = {s.fileno(): i for i, s in enumerate(socks)}
    inbufs = [bytearray() for _ in range(n)]
    outq: list[deque] = [deque() for _ in range(n)]
    outoff = [0] * n
    outbytes = [0] * n
    open_in = [True] * n
    open_out = [True] * n
    masks = [-1] * n
    rview = memoryview(bytearray(1 << 18))  # read into one buffer: a fresh 256 KiB bytes per recv() costs an mmap
    poller = select.poll()
    for s in socks:
        s.setblocking(False)
        poller.register(s.fileno(), 0)
    errors: list[str] = []
    hard_end = spec.deadline + 5.0
    unpack_chunk = CHUNK.unpack_from
    while any(open_in):
        paused = max(outbytes) > RELAY_HIGH
        for i, s in enumerate(socks):
            want = 0
            if open_in[i] and not paused:
                want |= POLLIN
            if outq[i]:
                want |= POLLOUT
            if want != masks[i]:
                poller.modify(s.fileno(), want)
                masks[i] = want
        if time.monotonic() > hard_end:
            errors.append("relay: deadline reached")
            break
        for fd, ev in poller.poll(500):
            i = fds[fd]
            s = socks[i]
            if ev & POLLOUT and outq[i]:
                q = outq[i]
                bufs = []
                for k, b in enumerate(q):
                    bufs.append(memoryview(b)[outoff[i]:] if k == 0 else b)
                    if k >= 255:
                        break
                try:
                    sent = s.sendmsg(bufs)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    open_out[i] = False
                    q.clear()
                    outbytes[i] = 0
                    sent = 0
                outbytes[i] -= sent
                while sent:
                    head = len(q[0]) - outoff[i]
                    if sent >= head:
                        sent -= head
                        q.popleft()
                        outoff[i] = 0
                    else:
                        outoff[i] += sent
                        sent = 0
            if ev & (POLLIN | POLLERRS) and open_in[i]:
                try:
                    data = bytes(rview[:s.recv_into(rview)])
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    open_in[i] = False
                    continue
                buf = inbufs[i]
                buf += data
                off = 0
                blen_all = len(buf)
                while blen_all - off >= 5:
                    blen, topic = unpack_chunk(buf, off)
                    end = off + 5 + blen
                    if end > blen_all:
                        break
                    chunk = bytes(buf[off:end])
                    for d in routes.get(topic, ()):
                        if open_out[d]:
                            outq[d].append(chunk)
                            outbytes[d] += len(chunk)
                    off = end
                if off:
                    del buf[:off]
    return errors


# ---------------------------------------------------------------------- conductor


def conduct(spec_d: dict) -> dict:
    spec = Spec.from_dict(spec_d)
    ctx = mp.get_context("fork")
    ctl = Control(spec.workers, spec.active)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(spec.workers)]
    for a, b in pairs:
        _tune(a)
        _tune(b)
    relay_ends = [a for a, _ in pairs]
    procs = []
    try:
        for wid, (_a, b) in enumerate(pairs):
            p = ctx.Process(target=_worker, args=(b, relay_ends, wid, spec.to_dict(), ctl.client_args), daemon=True)
            p.start()
            procs.append(p)
            b.close()
        ctl.start()
        ctl.watch({wid: p.pid for wid, p in enumerate(procs)})
        errors = _relay(relay_ends, spec, ctl)
        results = ctl.wait_results(spec.deadline + 5.0)
        return finish(spec, results, ctl, errors)
    finally:
        for a in relay_ends:
            a.close()
        kill_processes(procs)
        ctl.close()
