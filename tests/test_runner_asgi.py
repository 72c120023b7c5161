"""`clustersync run` with ASGI apps under uvicorn (--interface), and --reload."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from clustersync.runner.cli import ENV, build_parser, config_from_args
from clustersync.runner.interface import MISSING_UVICORN, is_asgi, shutdown_timeout, uses_asgi
from clustersync.runner.reload import Watcher

from .runner_harness import Run, alive, free_to_bind, request, spread, wait_gone

websockets_sync = pytest.importorskip("websockets.sync.client")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

PIP_LINE = 'pip install "clustersync[asgi]"'


# -- the rule of --interface auto ----------------------------------------------------


async def asgi_function(scope: Any, receive: Any, send: Any) -> None:
    pass


async def asgi_with_default(scope: Any, receive: Any, send: Any, extra: int = 0) -> None:
    pass


async def async_main() -> None:
    pass


def sync_main() -> None:
    pass


def sync_three(scope: Any, receive: Any, send: Any) -> None:
    pass


class AsgiClass:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


class AsyncNoArgs:
    async def __call__(self) -> None:
        pass


def test_interface_auto_detects_asgi_apps() -> None:
    from starlette.applications import Starlette

    asgi = [asgi_function, asgi_with_default, AsgiClass(), Starlette(), functools.partial(asgi_with_default)]
    called = [async_main, sync_main, sync_three, AsgiClass, AsyncNoArgs(), lambda: None, print, object()]
    for app in asgi:
        assert is_asgi(app), app
        assert uses_asgi(app, "auto") and uses_asgi(app, "asgi") and not uses_asgi(app, "call")
    for app in called:
        assert not is_asgi(app), app
        assert not uses_asgi(app, "auto") and uses_asgi(app, "asgi") and not uses_asgi(app, "call")
    with pytest.raises(ValueError):
        uses_asgi(asgi_function, "wsgi")
    assert shutdown_timeout(30) == 29 and shutdown_timeout(1) == 0.5 and shutdown_timeout(0) == 0


def test_interface_and_reload_options() -> None:
    def config(argv: List[str], environ: Dict[str, str]) -> Any:
        parser = build_parser()
        args = parser.parse_args(["run", "a:b", *argv])
        return config_from_args(args, args.command_parser, environ)

    assert ENV["interface"] == "CLUSTERSYNC_INTERFACE" and ENV["reload"] == "CLUSTERSYNC_RELOAD"
    default = config([], {})
    assert default.interface == "auto" and default.reload is False
    from_env = config([], {"CLUSTERSYNC_INTERFACE": "CALL", "CLUSTERSYNC_RELOAD": "yes"})
    assert from_env.interface == "call" and from_env.reload is True
    wins = config(["--interface", "asgi", "--bind", ":0", "--reload"], {"CLUSTERSYNC_INTERFACE": "call"})
    assert wins.interface == "asgi" and wins.reload is True
    with_env_bind = config(["--interface", "asgi"], {"CLUSTERSYNC_BIND": "127.0.0.1:0"})
    assert with_env_bind.interface == "asgi"
    for argv, environ in [
        (["--interface", "wsgi"], {}),
        ([], {"CLUSTERSYNC_INTERFACE": "asgi3"}),
        ([], {"CLUSTERSYNC_RELOAD": "maybe"}),
        (["--interface", "asgi"], {}),  # nothing to serve on
    ]:
        with pytest.raises(SystemExit) as exc:
            config(argv, environ)
        assert exc.value.code == 2


# -- the example, in one process (clustersync.asgi.hub falls back to broadcast_channel) --


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_chat_asgi_alone_under_a_test_client() -> None:
    from starlette.testclient import TestClient

    from examples.chat_asgi import app

    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["x-worker"] == "0"
        for anchor in ['id="messages"', 'id="text"', 'id="send"', 'id="worker">0<']:
            assert anchor in page.text, anchor
        assert client.get("/whoami").json() == {"worker": 0, "pid": os.getpid()}
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            assert a.receive_json() == {"type": "hello", "worker": 0}
            assert b.receive_json() == {"type": "hello", "worker": 0}
            a.send_text(json.dumps({"text": " hi "}))
            got_a, got_b = a.receive_json(), b.receive_json()
            assert got_a == got_b and got_a["text"] == "hi" and got_a["type"] == "message"
            for bad, why in [("nope", "send JSON"), ("{}", 'send {"text"'), ('{"text": " "}', "empty"),
                             (json.dumps({"text": "x" * 501}), "longer than 500")]:
                b.send_text(bad)
                error = b.receive_json()
                assert error["type"] == "error" and why in error["error"], (bad, error)


def test_the_lifespan_hub_picks_its_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    import clustersync.asgi

    monkeypatch.delenv("CLUSTERSYNC_BUS", raising=False)
    assert clustersync.asgi.default_sync("c").__qualname__.startswith("broadcast_channel.")
    monkeypatch.setenv("CLUSTERSYNC_BUS", "/tmp/no-such.sock")  # a gunicorn or uvicorn worker joining a bus
    assert clustersync.asgi.default_sync("c").__qualname__.startswith("cluster.")


# -- under clustersync run -----------------------------------------------------------


class Client:
    """A WebSocket client of examples.chat_asgi: the worker that serves it, and the chat messages it got."""

    def __init__(self, port: int) -> None:
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(websockets_sync.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10))
        hello = json.loads(self.ws.recv(timeout=10))
        assert hello["type"] == "hello", hello
        self.worker: int = hello["worker"]
        self.messages: List[Dict[str, Any]] = []

    def read_until(self, texts: List[str], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not set(texts) <= {m["text"] for m in self.messages}:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"worker {self.worker}'s client got {self.messages}, not all of {texts}")
            message = json.loads(self.ws.recv(timeout=left))
            assert message["type"] == "message", message
            self.messages.append(message)

    def close(self) -> None:
        self._stack.close()


def connect_clients(port: int, workers: int, per_worker: int = 2, attempts: int = 80) -> List[Client]:
    """Connect until ``workers`` distinct workers serve at least one client (at most ``per_worker`` each)."""
    return spread(lambda: Client(port), workers, per_worker=per_worker, attempts=attempts)


@pytest.mark.timeout(40)
def test_chat_asgi_a_message_from_any_client_reaches_every_client_once() -> None:
    with Run("examples.chat_asgi:app", "-w", "4", "--bind", "127.0.0.1:0") as run:
        port = run.port()
        pids = run.ready(4)
        status, headers, body = request(port, "GET", "/")
        assert status == 200 and f'id="worker">{headers["x-worker"]}<'.encode() in body
        clients: List[Client] = []
        try:
            clients = connect_clients(port, 3)
            senders = [clients[0]] + [c for c in clients if c.worker != clients[0].worker][:1]
            texts: List[str] = []
            for sender in senders:  # each sender's "done" comes after its messages (per-publisher order)
                for text in (f"hello from {sender.worker}", f"more from {sender.worker}", f"done {sender.worker}"):
                    sender.ws.send(json.dumps({"text": text}))
                    texts.append(text)
            for client in clients:
                client.read_until(texts)
                got = sorted(m["text"] for m in client.messages)
                assert got == sorted(texts), f"worker {client.worker}'s client: {got}"
                assert len({m["id"] for m in client.messages}) == len(texts)
                for message in client.messages:
                    assert message["text"].endswith(str(message["worker"]))

            run.signal(signal.SIGTERM)
            for client in clients:  # uvicorn closes each WebSocket with 1012 (service restart)
                with pytest.raises(Exception) as closed:
                    client.ws.recv(timeout=5)
                assert "1012" in str(closed.value), closed.value
            assert run.wait(15) == 0, run.log
        finally:
            for client in clients:
                client.close()
        wait_gone(list(pids.values()), 2)
        assert len(run.matches(r"worker \d \(pid \d+\) stopped \(exited with status 0\)")) == 4, run.log


def get(port: int, path: str = "/", timeout: float = 10.0) -> Tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


class Hammer:
    """Threads making one new connection after another, counting the requests that fail."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.ok = 0
        self.failures: List[str] = []
        self.pids: set = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = get(self.port, timeout=5)
            except Exception as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                continue
            with self._lock:
                if status == 200:
                    self.ok += 1
                    self.pids.add(int(body.split()[-1]))
                else:
                    self.failures.append(f"status {status}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.mark.timeout(40)
def test_asgi_hup_and_graceful_stop_refuse_no_connection() -> None:
    """A bare ASGI function (auto-detected): every connection made during two rolling restarts is served;
    a request in flight when SIGTERM comes is answered; then no process is left and the port is free."""
    with Run("tests.apps.asgi_plain:app", "-w", "2", "--bind", "127.0.0.1:0") as run:
        port = run.port()
        run.ready(2)
        hammer = Hammer(port)
        try:
            for _ in range(2):
                mark = len(run.lines)
                run.signal(signal.SIGHUP)
                run.wait_line(r"rolling restart done", timeout=15, after=mark)
        finally:
            hammer.stop()
        assert hammer.failures == [], hammer.failures[:5]
        assert hammer.ok > 50, hammer.ok
        now = run.ready(2, after=mark)
        started = {int(m.group(1)) for m in run.matches(r"worker \d+ \(pid (\d+)\) ready")}
        assert len(started) == 6 and hammer.pids <= started
        assert len(hammer.pids) >= 3  # each worker that stayed while another was replaced served
        wait_gone(list(started - set(now.values())), 2)

        # A graceful stop: the request in flight is answered, then every worker exits 0.
        slow: Dict[str, Any] = {}
        in_flight = threading.Thread(target=lambda: slow.update(reply=get(port, "/slow?s=1")), daemon=True)
        in_flight.start()
        run.wait_line(r"INFO tests\.asgi: slow request: 1\.0 s")  # in a worker now
        run.signal(signal.SIGTERM)
        in_flight.join(10)
        assert slow.get("reply", (0, ""))[0] == 200, (slow, run.log)
        assert run.wait(15) == 0, run.log
        wait_gone(list(now.values()), 2)
        assert free_to_bind(port)


def blocking_sitecustomize(directory: Path) -> Dict[str, str]:
    """A sitecustomize in ``directory`` that makes ``import uvicorn`` fail; the environment that loads it."""
    (directory / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys

            class NoUvicorn:
                def find_spec(self, name, path=None, target=None):
                    if name == "uvicorn" or name.startswith("uvicorn."):
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None

            sys.meta_path.insert(0, NoUvicorn())
            """
        )
    )
    return {"PYTHONPATH": str(directory)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("interface", ["asgi", "auto"])
def test_without_uvicorn_an_asgi_app_stops_with_status_3_and_the_pip_line(interface: str, tmp_path: Path) -> None:
    env = blocking_sitecustomize(tmp_path)
    with Run(
        "tests.apps.asgi_plain:app", "-w", "2", "--bind", "127.0.0.1:0", "--interface", interface, env=env
    ) as run:
        assert run.wait(15) == 3, run.log
        assert run.lines[-1].endswith(MISSING_UVICORN), run.log
        assert len(run.matches(re.escape(PIP_LINE))) == 1, run.log
        if interface == "asgi":  # the primary checks before it starts anything
            assert not run.matches(r"worker \d"), run.log


@pytest.mark.timeout(30)
def test_an_asgi_app_whose_startup_fails_stops_with_status_3() -> None:
    with Run("tests.apps.asgi_plain:fails_startup", "-w", "2", "--bind", "127.0.0.1:0") as run:
        assert run.wait(15) == 3, run.log
        assert "lifespan startup failed" in run.lines[-1], run.log


@pytest.mark.timeout(30)
def test_reload_restarts_the_workers_when_a_file_changes(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("import threading\nimport clustersync\n\ndef main():\n    clustersync.notify_ready()\n"
                   "    threading.Event().wait()\n")
    with Run("app:main", "-w", "2", "--app-dir", str(tmp_path), "--reload") as run:
        first = run.ready(2)
        run.wait_line(r"--reload: watching 1 \.py files under " + str(tmp_path))

        # A new file: every worker is replaced, one at a time, within 2 s.
        mark = len(run.lines)
        started = time.monotonic()
        (tmp_path / "helper.py").write_text("X = 1\n")
        run.wait_line(r"--reload: helper\.py changed: rolling restart", timeout=2, after=mark)
        second = run.ready(2, timeout=2, after=mark)
        run.wait_line(r"rolling restart done", timeout=2, after=mark)
        assert time.monotonic() - started < 2.5, run.log
        assert not set(second.values()) & set(first.values())

        # Broken code: the first replacement fails and waits for a fix; the other worker keeps serving.
        mark = len(run.lines)
        app.write_text(app.read_text() + "\ndef broken(:\n")
        run.wait_line(r"cannot load app:main: .*SyntaxError.*; waiting for a file to change \(--reload\)",
                      timeout=5, after=mark)
        assert sum(alive(pid) for pid in second.values()) == 1

        # The fix: both workers come back with it.
        mark = len(run.lines)
        app.write_text(app.read_text().replace("def broken(:", "FIXED = True"))
        third = run.ready(2, timeout=5, after=mark)
        run.wait_line(r"rolling restart done", timeout=5, after=mark)
        assert not set(third.values()) & set(second.values())
        run.signal(signal.SIGTERM)
        assert run.wait(10) == 0, run.log
        wait_gone(list(third.values()), 2)


def test_the_watcher_sees_added_changed_and_removed_files_and_skips_the_rest(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("a")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("b")
    (tmp_path / "notes.txt").write_text("not python")
    for skipped in ("__pycache__", ".git", "node_modules", "venv"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "c.py").write_text("c")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("")
    watcher = Watcher(str(tmp_path))
    assert len(watcher) == 2 and watcher.changed() == []
    (tmp_path / "pkg" / "b.py").write_text("bb")
    (tmp_path / "d.py").write_text("d")
    (tmp_path / "a.py").unlink()
    (tmp_path / "notes.txt").write_text("still not python")
    (tmp_path / ".git" / "c.py").write_text("cc")
    assert watcher.changed() == sorted(str(tmp_path / p) for p in ("a.py", "d.py", "pkg/b.py"))
    assert watcher.changed() == []
