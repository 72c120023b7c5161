"""examples.chat with ways to break a worker from outside.

SIGUSR1 raises, SIGUSR2 calls os._exit(1), SIGPWR writes a malformed frame
(a valid header, a record size far past its frame) to the pipe to the primary,
SIGWINCH forks a child that sleeps holding every descriptor the worker had
(its pid goes to the file named by CHAT_HOOKS_CHILD_FILE), then crashes.
SIGPROF sends a forged report ("FORGED", about a sibling worker's pid) on
every datagram socket the worker holds, then crashes.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Any

from examples import chat


class Crash(BaseException):
    """Raised in the main thread on SIGUSR1 (a BaseException, so socketserver does not swallow it)."""


def _raise(signum: int, frame: Any) -> None:
    raise Crash("crashed on purpose")


def _exit(signum: int, frame: Any) -> None:
    os._exit(1)


def _garble(signum: int, frame: Any) -> None:
    from clustersync.relay.link import current_link
    from clustersync.relay.wire import DATA, HEADER

    link = current_link()
    assert link is not None
    body = b"c" + struct.pack("<IBBHH", 1, 1, 0, 0, 1) + b"ot" + struct.pack("<I", 0x7FFFFFF0) + b"data"
    link._sock.sendall(HEADER.pack(len(body), DATA, 1, link.index, 0xFFFF, 1) + body)


def _fork_then_crash(signum: int, frame: Any) -> None:
    pid = os.fork()
    if pid == 0:
        while True:
            signal.pause()
    with open(os.environ["CHAT_HOOKS_CHILD_FILE"], "w") as f:
        f.write(str(pid))
    os._exit(1)


def _forge(signum: int, frame: Any) -> None:
    import json
    import socket

    siblings = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == os.getppid():
                siblings.append(int(entry))
    victim = min(siblings)
    forged = json.dumps({"pid": victim, "index": 0, "kind": "raised", "error": "FORGED"}).encode()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_DGRAM:
                try:
                    sock.send(forged)
                except OSError:
                    pass
    os._exit(1)


def main() -> None:
    signal.signal(signal.SIGUSR1, _raise)
    signal.signal(signal.SIGUSR2, _exit)
    signal.signal(signal.SIGPWR, _garble)
    signal.signal(signal.SIGWINCH, _fork_then_crash)
    signal.signal(signal.SIGPROF, _forge)
    chat.main()
