"""``--timeout``: a worker that stops answering is killed and replaced; without it, nothing is killed."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .runner_harness import Run, alive


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_killed_and_replaced_within_the_timeout() -> None:
    with Run("tests.apps.boot:forever", "-w", "2", "--timeout", "1") as run:
        pids = run.ready(2)
        os.kill(pids[0], signal.SIGSTOP)
        stopped_at = time.monotonic()
        run.wait_line(r"worker 0 \(pid %d\) did not answer" % pids[0], timeout=5)
        later = run.ready(1, after=len(run.lines) - 1, timeout=10)
        assert time.monotonic() - stopped_at < 1 + 1 + 1.5  # the timeout, one second, the replacement's boot
        assert later.get(0, pids[0]) != pids[0]
        assert alive(pids[1]), run.log
        run.signal(signal.SIGTERM)
        assert run.wait(15) == 0


@pytest.mark.timeout(60)
def test_a_worker_holding_the_gil_is_killed_and_replaced() -> None:
    with Run("tests.apps.boot:hangs_holding_the_gil", "-w", "2", "--timeout", "1", env={"TEST_HANG": "1"}) as run:
        _, m = run.wait_line(r"worker 0 \(pid (\d+)\) did not answer", timeout=10)
        hung = int(m.group(1))
        run.wait_line(r"worker 0 \(pid (?!%d\))\d+\) ready" % hung, timeout=10)
        run.signal(signal.SIGTERM)
        run.wait(15)


@pytest.mark.timeout(60)
def test_without_timeout_a_stopped_worker_is_left_alone() -> None:
    with Run("tests.apps.boot:forever", "-w", "1") as run:
        pids = run.ready(1)
        os.kill(pids[0], signal.SIGSTOP)
        try:
            with pytest.raises(AssertionError):
                run.wait_line(r"did not answer|killed", timeout=2.5)  # an observation window
            assert alive(pids[0])
        finally:
            os.kill(pids[0], signal.SIGCONT)
        run.signal(signal.SIGTERM)
        assert run.wait(15) == 0
