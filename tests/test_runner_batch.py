"""`clustersync run` with workers that return: exit statuses by restart policy."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from .runner_harness import Run


@pytest.mark.timeout(20)
def test_workers_that_return_are_done_and_the_command_exits_0() -> None:
    with Run("tests.apps.batch:main", "-w", "3") as run:
        assert run.wait() == 0, run.log
    assert len(run.matches(r"worker \d \(pid \d+\) finished \(exit status 0\)")) == 3, run.log
    assert not run.matches("restarting it in"), run.log


@pytest.mark.timeout(20)
@pytest.mark.parametrize("plan, status", [("1=exit:3", 3), ("2=kill", 137)])
def test_restart_never_exits_with_the_first_failing_workers_status(plan: str, status: int) -> None:
    with Run("tests.apps.batch:main", "-w", "3", "--restart", "never", env={"TEST_PLAN": plan}) as run:
        assert run.wait() == status, run.log
    assert not run.matches("restarting it in"), run.log
    assert run.matches("not restarting it \\(--restart never\\)"), run.log


@pytest.mark.timeout(20)
def test_on_failure_restarts_a_failed_worker_until_it_returns(tmp_path: Path) -> None:
    env = {"TEST_PLAN": "1=fail-once", "TEST_STATE_DIR": str(tmp_path)}
    with Run("tests.apps.batch:main", "-w", "2", env=env) as run:
        assert run.wait() == 0, run.log
    assert run.matches(r"worker 1 \(pid \d+\) exited with status 1 after RuntimeError: first run fails; restarting it in 0\.1 s"), run.log
    assert len(run.matches(r"worker 1 \(pid \d+\) finished")) == 1, run.log


@pytest.mark.timeout(20)
def test_restart_always_restarts_workers_that_return_until_stopped() -> None:
    with Run("tests.apps.batch:main", "-w", "1", "--restart", "always") as run:
        first, _ = run.wait_line(r"worker 0 \(pid \d+\) returned; restarting it in 0\.1 s")
        run.wait_line(r"worker 0 \(pid \d+\) returned; restarting it in 0\.2 s", after=first + 1)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.log


@pytest.mark.timeout(20)
def test_a_coroutine_function_is_run_with_asyncio() -> None:
    with Run("tests.apps.batch:amain", "-w", "2") as run:
        assert run.wait() == 0, run.log
    assert sorted(re.findall(r"async worker (\d) done", run.log)) == ["0", "1"], run.log
