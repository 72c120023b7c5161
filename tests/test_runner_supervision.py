"""`clustersync run` supervision with real processes: crashes, boot failures, signals, parent death."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import List

import pytest

from .runner_harness import SSE, Run, alive, free_to_bind, open_streams, post_via, wait_gone


@pytest.mark.timeout(40)
def test_a_crashed_worker_is_replaced_under_its_index_and_the_others_keep_talking() -> None:
    with Run("tests.apps.chat_hooks:main", "-w", "2", "--bind", "127.0.0.1:0") as run:
        port = run.port()
        pids = run.ready(2)
        streams: List[SSE] = []
        try:
            streams = open_streams(port, 2)
            survivor = next(s for s in streams if s.worker == 0)

            delays = []
            for sig, cause in [
                (signal.SIGUSR1, r"exited with status 1 after Crash: crashed on purpose"),
                (signal.SIGUSR2, r"exited with status 1;"),
                (signal.SIGKILL, r"was killed by SIGKILL \(clustersync did not send it: .*out-of-memory"),
            ]:
                old = pids[1]
                mark = len(run.lines)
                os.kill(old, sig)
                _, m = run.wait_line(rf"worker 1 \(pid {old}\) {cause}.*restarting it in ([\d.]+) s", after=mark)
                delays.append(float(m.group(1)))
                pids = run.ready(1, after=mark) | {0: pids[0]}
                assert pids[1] != old
            assert delays == [0.1, 0.2, 0.4], "the delay doubles while crashes come in a row"
            assert "Traceback" in run.log and "crashed on purpose" in run.log

            # Worker 0 never noticed; the new worker 1 and worker 0 still reach each other.
            assert alive(pids[0])
            newcomer = open_streams(port, 2)
            streams += newcomer
            from_1 = post_via(port, 1, "from the new worker 1")
            for sse in [survivor] + newcomer:
                sse.read_until([from_1["id"]])
            from_0 = post_via(port, 0, "from worker 0")
            for sse in [survivor] + newcomer:
                sse.read_until([from_0["id"]])
        finally:
            for sse in streams:
                sse.close()
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.log


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "app, error",
    [
        ("tests.apps.nowhere:main", r"cannot load tests\.apps\.nowhere:main: cannot import module 'tests\.apps\.nowhere': no module named 'tests\.apps\.nowhere'"),
        ("tests.apps.boot:missing", r"cannot load tests\.apps\.boot:missing: module 'tests\.apps\.boot' has no attribute 'missing'"),
        ("tests.apps.boot:not_callable", r"cannot load tests\.apps\.boot:not_callable: tests\.apps\.boot:not_callable is not callable \(it is int\)"),
        ("tests.apps.broken_import:main", r"cannot load tests\.apps\.broken_import:main: importing 'tests\.apps\.broken_import' failed: RuntimeError: this module is broken on purpose"),
        ("tests.apps.boot:fail_fast", r"worker \d \(pid \d+\) exited with status 1 after RuntimeError: boot failed on purpose before it was ready"),
    ],
)
def test_an_app_that_cannot_boot_stops_the_command_with_one_line(app: str, error: str) -> None:
    with Run(app, "-w", "2") as run:
        assert run.wait() == 3, run.log
    last = run.lines[-1]
    assert re.search(r"\] ERROR clustersync: " + error, last), run.log
    assert not run.matches("restarting"), run.log
    assert len(run.matches(error)) == 1, "said once, not once per worker"
    tracebacks = len(run.matches("Traceback"))
    assert tracebacks == (1 if app.endswith(("broken_import:main", "fail_fast")) else 0), run.log


@pytest.mark.timeout(30)
def test_a_worker_failing_before_ready_five_times_in_a_row_stops_the_command(tmp_path: Path) -> None:
    with Run("tests.apps.boot:ready_once", "-w", "2", env={"TEST_STATE_DIR": str(tmp_path)}) as run:
        assert run.wait(20) == 3, run.log
    failures = run.matches(r"worker 0 \(pid \d+\) exited with status 1 after RuntimeError: cannot boot again before it was ready \((\d) of 5")
    assert [m.group(1) for m in failures] == ["1", "2", "3", "4"], run.log
    assert re.search(
        r"ERROR clustersync: worker 0 failed 5 times in a row before it was ready \(last: .*cannot boot again", run.lines[-1]
    ), run.log
    assert run.matches(r"the app failed to boot: stopping 1 worker"), "the healthy worker is stopped too"


@pytest.mark.timeout(20)
def test_sigterm_kills_workers_that_outstay_the_graceful_timeout() -> None:
    with Run("tests.apps.boot:stubborn", "-w", "2", "--graceful-timeout", "0.5") as run:
        pids = run.ready(2)
        started = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait() == 1, run.log
        assert time.monotonic() - started < 5
    assert len(run.matches(r"did not stop within 0\.5 s: killing it")) == 2, run.log
    wait_gone(list(pids.values()), 2)


@pytest.mark.timeout(20)
def test_sigint_stops_gracefully_and_a_second_sigint_at_once() -> None:
    with Run("tests.apps.boot:forever", "-w", "2") as run:
        run.ready(2)
        run.signal(signal.SIGINT)
        assert run.wait() == 0, run.log
    assert run.matches("SIGINT .*: stopping 2 workers"), run.log

    with Run("tests.apps.boot:stubborn", "-w", "2", "--graceful-timeout", "60") as run:
        pids = run.ready(2)
        run.signal(signal.SIGINT)
        run.wait_line("SIGINT .*: stopping 2 workers")
        run.signal(signal.SIGINT)
        assert run.wait(5) == 1, run.log
    assert run.matches("second SIGINT: killing 2 workers now"), run.log
    wait_gone(list(pids.values()), 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("workers", [2, 1])
def test_sighup_replaces_workers_one_at_a_time_never_leaving_none(workers: int) -> None:
    with Run("tests.apps.boot:forever", "-w", str(workers)) as run:
        old = run.ready(workers)
        mark = len(run.lines)
        run.signal(signal.SIGHUP)
        run.wait_line("rolling restart done", after=mark)
        new = run.ready(workers, after=mark)
        assert all(new[i] != old[i] for i in old), (old, new)

        # Replay the log: the number of ready workers never drops to zero.
        up = set(old.values())
        for line in run.lines[mark:]:
            if m := re.search(r"\(pid (\d+)\) ready", line):
                up.add(int(m.group(1)))
            elif m := re.search(r"\(pid (\d+)\) stopped", line):
                up.discard(int(m.group(1)))
                assert up, f"no worker left at: {line}\n{run.log}"
        if workers == 1:
            assert run.matches(r"worker 1 \(pid \d+\) stands in"), run.log
        wait_gone(list(old.values()), 2)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.log


@pytest.mark.timeout(30)
def test_sigttin_adds_a_worker_and_sigttou_removes_the_highest() -> None:
    with Run("tests.apps.boot:forever", "-w", "2") as run:
        pids = run.ready(2)
        mark = len(run.lines)
        run.signal(signal.SIGTTIN)
        pids |= run.ready(1, after=mark)
        assert set(pids) == {0, 1, 2}

        for gone in (2, 1):
            mark = len(run.lines)
            run.signal(signal.SIGTTOU)
            run.wait_line(rf"worker {gone} \(pid {pids[gone]}\) stopped", after=mark)
            wait_gone([pids[gone]], 2)
        mark = len(run.lines)
        run.signal(signal.SIGTTOU)
        run.wait_line("SIGTTOU: already down to one worker", after=mark)
        assert alive(pids[0])

        mark = len(run.lines)
        run.signal(signal.SIGTTIN)
        assert list(run.ready(1, after=mark)) == [1], "the next worker takes the lowest free index"
        assert not run.matches(r"worker [12] .*restarting"), run.log
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.log


@pytest.mark.timeout(30)
def test_when_the_primary_is_killed_every_worker_exits_and_the_port_is_freed() -> None:
    with Run("examples.chat:main", "-w", "3", "--bind", "127.0.0.1:0") as run:
        port = run.port()
        pids = list(run.ready(3).values())
        streams = open_streams(port, 2)
        try:
            run.signal(signal.SIGKILL)
            run.wait()
            started = time.monotonic()
            wait_gone(pids, 2)
            assert time.monotonic() - started < 2
            for sse in streams:
                assert sse.closed_by_server(1)
        finally:
            for sse in streams:
                sse.close()
        assert free_to_bind(port)


@pytest.mark.timeout(20)
def test_when_the_primary_is_killed_a_worker_ignoring_sigterm_exits_all_the_same() -> None:
    with Run("tests.apps.boot:stubborn", "-w", "2") as run:
        pids = list(run.ready(2).values())
        run.signal(signal.SIGKILL)
        run.wait()
        wait_gone(pids, 2)  # the worker's link hard-exits a second after it lost the primary


@pytest.mark.timeout(60)
def test_a_worker_that_sends_a_malformed_frame_is_replaced_and_nobody_else_notices() -> None:
    """One log line names the sender; it is killed and replaced; the others keep talking and still die with the primary."""
    with Run("tests.apps.chat_hooks:main", "-w", "3", "--bind", "127.0.0.1:0") as run:
        port = run.port()
        pids = run.ready(3)
        streams: List[SSE] = []
        try:
            streams = open_streams(port, 3)
            mark = len(run.lines)
            os.kill(pids[1], signal.SIGPWR)
            run.wait_line(rf"worker 1 \(pid {pids[1]}\) sent a malformed DATA frame", after=mark)
            run.wait_line(
                rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL \(by the primary: malformed frame\); restarting it",
                after=mark,
            )
            pids = pids | run.ready(1, after=mark)
            assert len(run.matches(r"sent a malformed")) == 1, run.log
            by_worker = {s.worker: s for s in streams}
            for sender, reader in ((0, 2), (2, 0)):
                sent = post_via(port, sender, f"from {sender} after the garbage")
                by_worker[reader].read_until([sent["id"]])
            newcomer = open_streams(port, 3)
            streams += newcomer
            sent = post_via(port, 0, "to the replacement too")
            for sse in newcomer:
                sse.read_until([sent["id"]])
        finally:
            for sse in streams:
                sse.close()
        os.kill(run.pid, signal.SIGKILL)
        wait_gone(list(pids.values()), 2.5)


@pytest.mark.timeout(60)
def test_a_crashed_worker_whose_child_holds_its_pipes_is_replaced_and_the_child_stopped(tmp_path: Path) -> None:
    """The child of a worker keeps copies of its pipes and listening socket: the crash is seen anyway."""
    child_file = tmp_path / "child"
    try:
        with Run("tests.apps.chat_hooks:main", "-w", "2", "--bind", "127.0.0.1:0",
                 env={"CHAT_HOOKS_CHILD_FILE": str(child_file)}) as run:
            port = run.port()
            pids = run.ready(2)
            mark = len(run.lines)
            os.kill(pids[1], signal.SIGWINCH)
            run.wait_line(rf"worker 1 \(pid {pids[1]}\) exited with status 1; restarting it", after=mark, timeout=5)
            wait_gone([int(child_file.read_text())], 5)  # stopped with its worker's process group
            pids = pids | run.ready(1, after=mark)
            run.signal(signal.SIGTERM)
            assert run.wait() == 0, run.log
            assert "did not die" not in run.log
        assert free_to_bind(port)
    finally:
        if child_file.exists():  # even when the test fails, the child does not outlive it
            try:
                os.kill(int(child_file.read_text()), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.timeout(60)
def test_a_forged_report_is_refused_and_logged() -> None:
    """A worker can write only to its own report socket, and a report about another pid is refused."""
    with Run("tests.apps.chat_hooks:main", "-w", "2", "--bind", "127.0.0.1:0") as run:
        pids = run.ready(2)
        mark = len(run.lines)
        os.kill(pids[1], signal.SIGPROF)
        run.wait_line(rf"worker 1 \(pid {pids[1]}\) sent a report about pid {pids[0]}: ignored", after=mark)
        run.wait_line(rf"worker 1 \(pid {pids[1]}\) exited with status 1; restarting it", after=mark)
        run.ready(1, after=mark)
        os.kill(pids[0], signal.SIGUSR2)  # worker 0 exits 1 without a report of its own
        _, line = run.wait_line(rf"worker 0 \(pid {pids[0]}\) exited with status 1", after=mark)
        assert "FORGED" not in run.log
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.log
