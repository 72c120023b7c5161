"""The `clustersync` command line: options, environment variables, usage errors; and the runner's small parts."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import clustersync

from clustersync.runner.cli import ENV, build_parser, config_from_args
from clustersync.runner.sockets import UNIX_MODE, bind, parse_address
from clustersync.runner.supervisor import Backoff, describe_exit, exit_status

from .runner_harness import ROOT, Run


def cli(*args: str, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clustersync", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSYNC_")}, **(env or {})},
    )


def config(argv: List[str], environ: Dict[str, str]) -> object:
    parser = build_parser()
    args = parser.parse_args(argv)
    return config_from_args(args, args.command_parser, environ)


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"clustersync {clustersync.__version__}"


def test_help_explains_options_environment_signals_and_statuses() -> None:
    out = cli("run", "--help")
    assert out.returncode == 0
    for word in ["--workers", "--bind", "--reuse-port", "--restart", "--graceful-timeout", "--start-method",
                 "--log-level", "--app-dir", "listen_sockets", "notify_ready", "TTIN", "TTOU", "HUP",
                 "exit status", *ENV.values()]:
        assert word in out.stdout, word


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["run"], {}, "the following arguments are required: MODULE:CALLABLE"),
        (["run", "nocolon"], {}, "'nocolon' is not MODULE:CALLABLE"),
        (["run", "a:b", "-w", "0"], {}, "must be from 1 to"),
        (["run", "a:b", "--bind", "localhost"], {}, "'localhost' is not HOST:PORT or unix:PATH"),
        (["run", "a:b", "--restart", "sometimes"], {}, "'sometimes' is not one of on-failure, always, never"),
        (["run", "a:b"], {"CLUSTERSYNC_NUM_WORKERS": "many"}, "CLUSTERSYNC_NUM_WORKERS='many': 'many' is not a number"),
        (["run", "a:b"], {"CLUSTERSYNC_GRACEFUL_TIMEOUT": "-1"}, "CLUSTERSYNC_GRACEFUL_TIMEOUT='-1'"),
    ],
)
def test_usage_errors_exit_2(argv: List[str], env: Dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        config(argv, env)
    assert exc.value.code == 2
    out = cli(*argv, env=env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_options_come_from_the_environment_and_the_command_line_wins() -> None:
    environ = {
        "CLUSTERSYNC_NUM_WORKERS": "3",
        "CLUSTERSYNC_BIND": "127.0.0.1:8000, unix:/tmp/x.sock",
        "CLUSTERSYNC_REUSE_PORT": "yes",
        "CLUSTERSYNC_RESTART": "never",
        "CLUSTERSYNC_GRACEFUL_TIMEOUT": "2.5",
        "CLUSTERSYNC_START_METHOD": "spawn",
        "CLUSTERSYNC_LOG_LEVEL": "DEBUG",
        "CLUSTERSYNC_APP_DIR": "/srv/app",
    }
    c = config(["run", "m:f"], environ)
    assert (c.workers, c.binds, c.reuse_port, c.restart, c.graceful_timeout, c.start_method, c.log_level, c.app_dir) == (
        3, ("127.0.0.1:8000", "unix:/tmp/x.sock"), True, "never", 2.5, "spawn", "debug", "/srv/app"
    )
    c = config(["run", "m:f", "-w", "1", "--bind", ":9000", "--restart", "always"], environ)
    assert (c.workers, c.binds, c.restart) == (1, (":9000",), "always")
    c = config(["run", "m:f"], {})
    assert c.workers >= 1 and c.binds == () and not c.reuse_port and c.restart == "on-failure"
    assert c.graceful_timeout == 30.0 and c.start_method is None and c.log_level == "info"


@pytest.mark.timeout(20)
def test_app_dir_worker_environment_and_num_workers_variable(tmp_path: Path) -> None:
    (tmp_path / "elsewhere_app.py").write_text(
        "import os\n"
        "from clustersync import current_worker, listen_sockets\n"
        "def main():\n"
        "    me = current_worker()\n"
        "    env = os.environ['CLUSTERSYNC_WORKER_ID'], os.environ['CLUSTERSYNC_WORKERS']\n"
        "    print(f'<app {me.index} {me.count} {env} {len(listen_sockets())}>', flush=True)\n"
    )
    with Run("elsewhere_app:main", "--app-dir", str(tmp_path), env={"CLUSTERSYNC_NUM_WORKERS": "2"}) as run:
        assert run.wait() == 0, run.log
    found = sorted(re.findall(r"<app [^>]*>", run.log))
    assert found == ["<app 0 2 ('0', '2') 0>", "<app 1 2 ('1', '2') 0>"], run.log


@pytest.mark.timeout(20)
def test_an_address_in_use_is_reported_and_exits_1() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with Run("tests.apps.boot:forever", "-w", "1", "--bind", f"127.0.0.1:{port}") as run:
            assert run.wait() == 1, run.log
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in run.lines[-1], run.log
    finally:
        taken.close()


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:80")[1:3] == ("127.0.0.1", 80)
    assert parse_address(":8000")[1:3] == ("0.0.0.0", 8000)
    assert parse_address("[::1]:8000")[1:3] == ("::1", 8000)
    assert parse_address("localhost:0")[1:3] == ("localhost", 0)
    assert parse_address("unix:/tmp/a.sock").path == "/tmp/a.sock"
    assert parse_address("unix:rel.sock").path == str(Path("rel.sock").resolve())
    for bad in ["8000", "::1:8000", "host:http", "host:70000", "unix:"]:
        with pytest.raises(ValueError):
            parse_address(bad)


def test_backoff_doubles_and_resets_after_a_stable_run() -> None:
    b = Backoff(first=0.1, maximum=1.0, stable=10.0)
    assert [b.next(1.0) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.next(10.0) == 0.1
    assert b.next(0.5) == 0.2


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert [exit_status(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]


def test_a_unix_socket_has_an_explicit_mode_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    old = os.umask(0)
    try:
        sock = bind(parse_address(f"unix:{path}"))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == UNIX_MODE == 0o660
    finally:
        sock.close()


def test_a_unix_socket_path_too_long_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    with Run("tests.apps.boot:forever", "-w", "1", "--bind", f"unix:{path}") as run:
        assert run.wait() == 1, run.log
    assert "a unix socket path is at most 107" in run.lines[-1], run.log
    assert "None" not in run.log


def test_too_many_workers_is_refused_at_once() -> None:
    out = cli("run", "tests.apps.boot:forever", "-w", "10000")
    assert out.returncode == 2 and "must be from 1 to 1024" in out.stderr, out.stderr


@pytest.mark.timeout(60)
def test_sigterm_during_a_slow_start_stops_at_once() -> None:
    with Run("tests.apps.boot:forever", "-w", "400", "--log-level", "debug") as run:
        run.wait_line(r"worker 5 started \(pid")  # the start loop is under way
        run.signal(signal.SIGTERM)
        assert run.wait(45) == 0, run.log
        started = len(run.matches(r"worker \d+ started \(pid"))
    assert 5 < started < 400, started  # the start loop heard the signal and stopped starting workers
