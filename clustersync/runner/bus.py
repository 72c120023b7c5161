"""The bus commands: ``clustersync relay``, ``clustersync publish`` and ``clustersync stats``.

- ``relay --bus PATH`` runs a relay with no workers of its own, so that the
  workers of an app under gunicorn or ``uvicorn --workers`` (which the
  primary did not start) share one bus;
- ``publish --bus PATH --channel C TOPIC DATA`` publishes one message from a
  shell (``DATA`` is JSON, or ``-`` to read it from standard input);
- ``stats --bus PATH`` prints the relay's counters as JSON.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any, Optional, Sequence, TextIO

from ..hub import Hub
from ..sync.cluster import cluster

__all__ = ["run_relay", "publish", "print_stats", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE"]

EXIT_OK = 0
#: The relay could not start, or the bus could not be reached.
EXIT_ERROR = 1
#: Bad input (DATA that is not JSON, a bad argument).
EXIT_USAGE = 2

logger = logging.getLogger("clustersync")


def run_relay(
    path: str,
    *,
    allow_uids: Sequence[int] = (),
    allow_gids: Sequence[int] = (),
    uplink: Optional[str] = None,
) -> int:
    """Relay between the processes that join the bus at ``path`` until SIGINT or SIGTERM; return the exit status."""
    from ..relay.primary import Primary

    try:
        primary = Primary(thread=False, listen=path, allow_uids=allow_uids, allow_gids=allow_gids, uplink=uplink)
    except (OSError, ValueError, ImportError) as exc:
        logger.error("cannot relay on %s: %s", path, exc)
        return EXIT_ERROR
    stop = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)
        primary.loop.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert primary.bus is not None
        logger.info(
            "relaying on %s (mode %s; same user%s)%s",
            path,
            oct(primary.bus.mode)[2:],
            "".join(f", uid {u}" for u in allow_uids) + "".join(f", gid {g}" for g in allow_gids),
            f", uplink {uplink}" if uplink else "",
        )
        primary.loop.run(lambda: bool(stop))
        logger.info("%s: stopping the relay", signal.Signals(stop[0]).name if stop else "stopped")
    finally:
        primary.close(timeout=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _read_data(data: str, stdin: TextIO) -> Any:
    text = stdin.read() if data == "-" else data
    return json.loads(text)


def publish(path: str, channel: str, topic: str, data: str, *, namespace: str = "", stdin: TextIO = sys.stdin) -> int:
    """Publish one message on the bus at ``path``; return the exit status."""
    try:
        value = _read_data(data, stdin)
    except ValueError as exc:
        print(f"clustersync publish: DATA is not JSON ({exc}); a string is written '\"text\"'", file=sys.stderr)
        return EXIT_USAGE
    try:
        hub = Hub(sync=cluster(channel=channel, address=path), namespace=namespace)
    except (TypeError, ValueError) as exc:
        print(f"clustersync publish: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not hub.wait_ready(5.0):
            print(f"clustersync publish: could not join the bus at {path} (see the error above)", file=sys.stderr)
            return EXIT_ERROR
        hub.publish(topic, value)
    except (TypeError, ValueError) as exc:
        print(f"clustersync publish: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        hub.close()
    return EXIT_OK


def print_stats(path: str, out: TextIO = sys.stdout) -> int:
    """Print the relay's counters as JSON; return the exit status."""
    from ..relay.bus import connect

    try:
        link = connect(path)
        stats = link.relay_stats(5.0)
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"clustersync stats: {exc}", file=sys.stderr)
        return EXIT_ERROR
    json.dump(stats, out, indent=2, sort_keys=True)
    out.write("\n")
    return EXIT_OK
