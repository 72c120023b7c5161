"""The package logger and a rate limiter for repeated warnings."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Tuple

logger = logging.getLogger("clustersync")


class RateLimitedLog:
    """Log at most one line per ``interval`` seconds per key, counting what it held back.

    It remembers at most ``max_keys`` keys: past that, keys whose interval
    has passed are forgotten (and, if all are recent, the oldest half), so
    short-lived keys cannot grow it without bound.
    """

    def __init__(self, interval: float = 1.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._state: Dict[object, Tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._state)

    def __call__(self, key: object, level: int, msg: str, *args: object, exc_info: Any = None) -> None:
        now = time.monotonic()
        with self._lock:
            state = self._state
            last, held = state.get(key, (0.0, 0))
            if now - last < self.interval:
                state[key] = (last, held + 1)
                return
            if key not in state and len(state) >= self.max_keys:
                self._forget(now)
            state[key] = (now, 0)
        if held:
            msg += " (%d similar lines held back)"
            args = args + (held,)
        logger.log(level, msg, *args, exc_info=exc_info)

    def _forget(self, now: float) -> None:
        """With the lock held: drop the keys whose interval has passed, or else the oldest half."""
        state = self._state
        stale = [k for k, (last, _) in state.items() if now - last >= self.interval]
        if not stale:
            stale = list(state)[: len(state) // 2]
        for k in stale:
            del state[k]


class _Tag(logging.Filter):
    """Adds ``%(who)s`` to every record: ``primary`` or ``worker N``."""

    def __init__(self, who: str) -> None:
        super().__init__()
        self.who = who

    def filter(self, record: logging.LogRecord) -> bool:
        record.who = self.who
        return True


LOG_FORMAT = "%(asctime)s [%(who)s pid %(process)d] %(levelname)s %(name)s: %(message)s"


def configure(level: str, who: str) -> None:
    """Log to stderr at ``level`` through the root logger, each line naming ``who`` and the pid.

    Called by ``clustersync run`` in the primary (``who="primary"``) and in
    each worker (``who="worker N"``); calling it again replaces the handler.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_clustersync", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._clustersync = True  # type: ignore[attr-defined]
    handler.addFilter(_Tag(who))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
