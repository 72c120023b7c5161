"""examples.chat with ways to crash a worker from outside: SIGUSR1 raises, SIGUSR2 calls os._exit(1)."""

from __future__ import annotations

import os
import signal
from typing import Any

from examples import chat


class Crash(BaseException):
    """Raised in the main thread on SIGUSR1 (a BaseException, so socketserver does not swallow it)."""


def _raise(signum: int, frame: Any) -> None:
    raise Crash("crashed on purpose")


def _exit(signum: int, frame: Any) -> None:
    os._exit(1)


def main() -> None:
    signal.signal(signal.SIGUSR1, _raise)
    signal.signal(signal.SIGUSR2, _exit)
    chat.main()
