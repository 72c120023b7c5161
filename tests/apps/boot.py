"""Apps that boot, fail to boot, or refuse to stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from clustersync import current_worker, notify_ready

not_callable = 42


def forever() -> None:
    """Ready at once; runs until SIGTERM."""
    notify_ready()
    threading.Event().wait()


def fail_fast() -> None:
    """Fails before it is ready."""
    raise RuntimeError("boot failed on purpose")


def stubborn() -> None:
    """Ready at once; ignores SIGTERM, so only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    notify_ready()
    threading.Event().wait()


def ready_once() -> None:
    """Worker 0 boots once, becomes ready and crashes; every later start fails before ready.

    Worker 1 runs until stopped. The state lives in $TEST_STATE_DIR.
    """
    me = current_worker()
    assert me is not None
    if me.index != 0:
        forever()
        return
    marker = Path(os.environ["TEST_STATE_DIR"]) / "booted"
    if marker.exists():
        raise RuntimeError("cannot boot again")
    marker.touch()
    notify_ready()
    raise RuntimeError("crash after ready")


def hangs_holding_the_gil() -> None:
    """Worker 0: ready, then after a while a single C call that never gives the GIL back.

    Others run until stopped. (A replacement hangs the same way; the test needs only the first.)
    """
    me = current_worker()
    assert me is not None
    notify_ready()
    if me.index == 0 and os.environ.get("TEST_HANG") == "1":
        time.sleep(1.5)  # the app runs a while (and is ready by the one-second rule), then hangs
        sum(range(10**13))
    threading.Event().wait()
