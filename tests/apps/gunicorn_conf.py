"""gunicorn -c gunicorn_conf.py myapp:app: gunicorn's workers on one clustersync bus (docs/web-apps.md).

The master starts ``clustersync relay --bus PATH`` before its first worker
(``on_starting``) and stops it once the last worker is gone (``on_exit``); a
HUP replaces the workers and keeps the relay.
Every worker gets ``CLUSTERSYNC_BUS=PATH`` (``raw_env``), so a hub opened
with ``cluster(channel=...)`` in the app joins the bus. PATH is
``$CLUSTERSYNC_BUS``, else /run/app/bus.sock (its directory must exist and be
writable by gunicorn's user). tests/test_bus.py runs this very file.
"""

import os
import socket
import subprocess
import sys
import time

BUS = os.environ.get("CLUSTERSYNC_BUS") or "/run/app/bus.sock"

workers = 2
worker_class = "uvicorn_worker.UvicornWorker"  # an ASGI app: pip install uvicorn-worker
raw_env = [f"CLUSTERSYNC_BUS={BUS}"]


def _listening(path):
    """True once a relay accepts on ``path`` (a socket file left by a dead relay refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def on_starting(server):
    # A session of its own: Ctrl-C on gunicorn does not stop the relay before the workers.
    relay = subprocess.Popen(
        [sys.executable, "-m", "clustersync", "relay", "--bus", BUS], start_new_session=True
    )
    # Kept on the arbiter: a HUP reads this file again, and its globals start afresh.
    server.clustersync_relay = relay
    deadline = time.monotonic() + 10
    while not _listening(BUS):
        if relay.poll() is not None:
            raise RuntimeError(f"clustersync relay exited with status {relay.returncode} (its error is above)")
        if time.monotonic() > deadline:
            relay.kill()
            raise RuntimeError(f"clustersync relay did not listen on {BUS} within 10 s")
        time.sleep(0.05)
    server.log.info("clustersync relay (pid %d) listens on %s", relay.pid, BUS)


def on_exit(server):
    relay = getattr(server, "clustersync_relay", None)
    if relay is not None and relay.poll() is None:
        relay.terminate()  # SIGTERM: it stops, status 0, and removes its socket
        try:
            relay.wait(10)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()
