"""Workers that do their job and return: what each does is in $TEST_PLAN, by worker index.

$TEST_PLAN is a comma-separated list of INDEX=ACTION; a worker without one returns at once.
ACTION: ``exit:N`` (sys.exit(N)), ``kill`` (SIGKILL itself), ``fail-once`` (the first run
becomes ready, then fails; later runs return; state in $TEST_STATE_DIR).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Dict

from clustersync import current_worker, notify_ready


def _plan() -> Dict[int, str]:
    plan = {}
    for item in os.environ.get("TEST_PLAN", "").split(","):
        if item:
            index, _, action = item.partition("=")
            plan[int(index)] = action
    return plan


def main() -> None:
    me = current_worker()
    assert me is not None
    action = _plan().get(me.index, "")
    if action.startswith("exit:"):
        sys.exit(int(action[5:]))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "fail-once":
        marker = Path(os.environ["TEST_STATE_DIR"]) / f"ran-{me.index}"
        if not marker.exists():
            marker.touch()
            notify_ready()
            raise RuntimeError("first run fails")


async def amain() -> None:
    """A coroutine function: the runner runs what it returns with asyncio.run."""
    await asyncio.sleep(0)
    print(f"<async worker {current_worker().index} done>", flush=True)  # type: ignore[union-attr]
