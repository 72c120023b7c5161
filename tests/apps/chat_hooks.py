"""examples.chat with ways to break a worker from outside.

SIGUSR1 raises, SIGUSR2 calls os._exit(1), SIGPWR writes a malformed frame
(a valid header, a record size far past its frame) to the pipe to the primary,
SIGWINCH forks a child that sleeps holding every descriptor the worker had
(its pid goes to the file named by CHAT_HOOKS_CHILD_FILE), then crashes.
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


def main() -> None:
    signal.signal(signal.SIGUSR1, _raise)
    signal.signal(signal.SIGUSR2, _exit)
    signal.signal(signal.SIGPWR, _garble)
    signal.signal(signal.SIGWINCH, _fork_then_crash)
    chat.main()
