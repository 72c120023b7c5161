"""Each network driver's client is an optional extra: without it, the factory names the install line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .runner_harness import ROOT

# A fresh interpreter in which the client libraries cannot be imported.
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("redis", "psycopg", "nats"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(
    "call,extra",
    [
        ("redis(url='redis://127.0.0.1:6379/0', channel='app')", "redis"),
        ("postgres(conninfo='postgresql://127.0.0.1/app', channel='app')", "postgres"),
        ("nats(servers='nats://127.0.0.1:4222', channel='app')", "nats"),
        ("from_url('rediss://127.0.0.1:6379/0', channel='app')", "redis"),
        ("uplink('nats://127.0.0.1:4222')", "nats"),
    ],
)
def test_without_the_client_the_factory_raises_import_error_naming_the_extra(call: str, extra: str) -> None:
    code = BLOCK + f"""
import clustersync                                   # the core imports without any client
from clustersync.sync import redis, postgres, nats, from_url
from clustersync.relay.uplink import uplink
try:
    {call}
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("no ImportError")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f'pip install "clustersync[{extra}]"'), proc.stdout
