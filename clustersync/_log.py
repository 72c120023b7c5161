"""The package logger and a rate limiter for repeated warnings."""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Tuple

logger = logging.getLogger("clustersync")


class RateLimitedLog:
    """Log at most one line per ``interval`` seconds per key, counting what it held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._state: Dict[object, Tuple[float, int]] = {}

    def __call__(self, key: object, level: int, msg: str, *args: object, exc_info: object = None) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._state.get(key, (0.0, 0))
            if now - last < self.interval:
                self._state[key] = (last, held + 1)
                return
            self._state[key] = (now, 0)
        if held:
            msg += " (%d similar lines held back)"
            args = args + (held,)
        logger.log(level, msg, *args, exc_info=exc_info)
