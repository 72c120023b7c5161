"""Instructions per message on the worker's paths, counted by valgrind: a profile that noise cannot move.

    python -m bench.instructions                 # every path, about 2 minutes
    python -m bench.instructions --paths publish,receive --messages 5120 --payload 4096

Each path runs in a fresh interpreter under ``valgrind --tool=callgrind`` twice,
with M and 2*M messages; the difference, divided by M, is what one more
message costs, start-up and imports cancelled out (and so is building the
payloads: a run of the bare loop over them is taken off). Instruction counts are
not time, but they are the same from run to run whatever else the machine
does, so they show where the CPU goes and whether a change to a path made it
cheaper. Every message carries 100 bytes (``--payload``), as the benchmark's
rows send them.

Paths:

- ``publish``: ``hub.publish(topic, bytes)`` to all, in a worker's hub (the link
  queues it; the writer's ``sendall`` is not included);
- ``link``: the worker link's own part of it, ``link.publish(route, data)``;
- ``receive``: a DATA frame from the primary, through the link's parser, the
  hub's decoding and one callback subscription, to a callback that counts;
- ``parse``: the link's parser alone (``parse_records``);
- ``get``: a thread waiting in ``sub.get()`` reads a frame of one message from the
  socket itself and returns it (the round trip's path with a queue subscription);
- ``read1``: the same frame read on the calling thread and handed to a callback
  (the round trip's path with a callback): ``get`` less ``read1`` is what waiting
  in ``get()`` costs beyond a callback;
- ``feed``: for scale, the benchmark's own receiver check (``Tracker.feed``),
  which every row of ``python -m bench`` pays per message;
- ``pipe``: for scale, the bare pipe relay row's receiver, per message;
- ``call``: for scale, one call of an empty Python function.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Callable, Dict, List

from .common import HEADER

PATHS = ("publish", "link", "receive", "parse", "get", "read1", "feed", "pipe", "call")
PAYLOAD = 100  # bytes per message, unless --payload says otherwise
RUN = 256  # messages per run, in the frames the receive paths take


def _payloads(n: int, size: int = PAYLOAD) -> List[bytes]:
    from .common import PayloadMaker

    make = PayloadMaker(1, size)  # as the benchmark's rows send them: publisher 1, numbered
    return [make(k) for k in range(n)]


def _link():  # a worker's link on a socketpair, its writer not started: the paths queue, nothing is written
    from clustersync.relay.link import WorkerLink
    from clustersync.sync import base

    a, _b = socket.socketpair()
    link = WorkerLink(a, 1, max_message=8 << 20, out_limit=1 << 40, publish_block=1.0)
    link._writing = True  # as while the writer writes: every publish queues (no direct write)
    base.install_cluster_transport(link)
    return link, (a, _b)


def _frame_body(payloads: List[bytes]) -> bytes:
    from clustersync.relay.wire import pack_run

    return pack_run(b"99.1.abcdef", b"", b"t", [b"b" + p for p in payloads[:RUN]])


def path_publish(payloads: List[bytes]) -> None:
    from clustersync import Hub
    from clustersync.sync import cluster

    link, _keep = _link()
    hub = Hub(sync=cluster(channel="bench"))
    publish = hub.publish
    for data in payloads:
        publish("t", data)


def path_link(payloads: List[bytes]) -> None:
    link, _keep = _link()
    route = link.route(b"bench", 0xFFFF, b"", b"1.1.abcdef", b"", b"t")
    publish = link.publish
    for data in payloads:
        publish(route, data)


def path_receive(payloads: List[bytes]) -> None:
    from clustersync import Hub
    from clustersync.relay.wire import BROADCAST, DATA
    from clustersync.sync import cluster

    link, _keep = _link()
    hub = Hub(sync=cluster(channel="bench"))
    count = [0]

    def on_message(msg: object) -> None:
        count[0] += 1

    hub.subscribe("t", on_message)
    body = _frame_body(payloads)
    frame = link._frame
    for _ in range(len(payloads) // RUN):
        frame(DATA, b"bench", 2, BROADCAST, RUN, body)
    assert count[0] == len(payloads) // RUN * RUN


def path_parse(payloads: List[bytes]) -> None:
    from clustersync.relay.wire import parse_records

    body = _frame_body(payloads)
    for _ in range(len(payloads) // RUN):
        parse_records(body)


def _single_frames(payloads: List[bytes]) -> List[bytes]:
    """A DATA frame of one message for each payload, as the primary sends a lone message."""
    from clustersync.relay.wire import BROADCAST, DATA, HEADER as FRAME, pack_run

    out = []
    for p in payloads:
        body = pack_run(b"99.1.abcdef", b"", b"t", [b"b" + p])
        out.append(FRAME.pack(5 + len(body), DATA, 5, 2, BROADCAST, 1) + b"bench" + body)
    return out


def path_get(payloads: List[bytes]) -> None:
    from clustersync import Hub
    from clustersync.sync import cluster

    link, (_a, b) = _link()
    hub = Hub(sync=cluster(channel="bench"))
    sub = hub.subscribe("t")
    get = sub.get
    send = b.send
    for frame in _single_frames(payloads):
        send(frame)
        get()


def path_read1(payloads: List[bytes]) -> None:
    from clustersync import Hub
    from clustersync.sync import cluster

    link, (_a, b) = _link()
    hub = Hub(sync=cluster(channel="bench"))
    count = [0]

    def on_message(msg: object) -> None:
        count[0] += 1

    hub.subscribe("t", on_message)
    read = link._read_once
    send = b.send
    for frame in _single_frames(payloads):
        send(frame)
        read()
    assert count[0] == len(payloads)


def path_feed(payloads: List[bytes]) -> None:
    from .common import Tracker

    tracker = Tracker(0, [1], len(payloads), len(payloads[0]), 2)
    feed = tracker.feed
    for data in payloads:
        feed(data)


def path_pipe(payloads: List[bytes]) -> None:
    from .row_pipe import CHUNK, LEN, parse_chunks

    chunk = b"".join(LEN.pack(len(p)) + p for p in payloads[:RUN])
    buf = bytearray(CHUNK.pack(len(chunk), 0) + chunk)
    count = [0]

    def feed(data: object) -> bool:
        count[0] += 1
        return False

    for _ in range(len(payloads) // RUN):
        parse_chunks(bytearray(buf), feed)
    assert count[0] == len(payloads) // RUN * RUN


def path_call(payloads: List[bytes]) -> None:
    def nothing(data: bytes) -> None:
        pass

    for data in payloads:
        nothing(data)


def path_none(payloads: List[bytes]) -> None:
    """The loop over the payloads alone: what every path's difference also holds, taken off."""
    for _data in payloads:
        pass


PATH_FUNCTIONS: Dict[str, Callable[[List[bytes]], None]] = {
    name: globals()[f"path_{name}"] for name in PATHS + ("none",)
}


def count_instructions(path: str, messages: int, payload: int = PAYLOAD) -> int:
    """Instructions valgrind counts for one fresh interpreter running ``path`` over ``messages`` messages."""
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "bench.instructions", "--payload", str(payload), "--child", path, str(messages),
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONHASHSEED="0")  # the same dict layouts in every run
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    found = re.search(r"Collected : ([0-9,]+)", out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{path}: valgrind failed (status {out.returncode}): {out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_message(path: str, messages: int, payload: int = PAYLOAD) -> float:
    """What one more message costs on ``path``, in instructions."""
    return (count_instructions(path, 2 * messages, payload) - count_instructions(path, messages, payload)) / messages


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--messages", type=int, default=10_240, help="M: the runs use M and 2*M messages")
    parser.add_argument("--payload", type=int, default=PAYLOAD, help=f"bytes per message (default {PAYLOAD})")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, n = args.child
        PATH_FUNCTIONS[path](_payloads(int(n), args.payload))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    if args.messages < RUN or args.messages % RUN:
        parser.error(f"--messages must be a positive multiple of {RUN}")
    if args.payload < HEADER.size:
        parser.error(f"--payload must be at least {HEADER.size} bytes (the benchmark's header)")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    print(f"instructions per message ({args.payload} B), Python {sys.version.split()[0]}; "
          f"valgrind runs of {args.messages} and {2 * args.messages} messages per path", file=sys.stderr)
    loop = per_message("none", args.messages, args.payload)
    for path in paths:
        print(f"  {path:8s} {per_message(path, args.messages, args.payload) - loop:8,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
