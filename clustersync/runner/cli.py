"""The command line: ``python -m clustersync run MODULE:CALLABLE [options]`` (also ``clustersync``)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, List, Mapping, Optional, Sequence

from .. import __version__, _log
from .boot import split_app
from .sockets import parse_address
from .supervisor import RESTART_POLICIES, RunConfig, Supervisor
from .supervisor import MAX_RUN_WORKERS
from .interface import INTERFACES

__all__ = ["main", "build_parser", "config_from_args", "ENV"]

#: The environment variable behind each option (the option wins when both are given).
ENV = {
    "workers": "CLUSTERSYNC_NUM_WORKERS",
    "bind": "CLUSTERSYNC_BIND",
    "reuse_port": "CLUSTERSYNC_REUSE_PORT",
    "restart": "CLUSTERSYNC_RESTART",
    "graceful_timeout": "CLUSTERSYNC_GRACEFUL_TIMEOUT",
    "timeout": "CLUSTERSYNC_TIMEOUT",
    "start_method": "CLUSTERSYNC_START_METHOD",
    "log_level": "CLUSTERSYNC_LOG_LEVEL",
    "app_dir": "CLUSTERSYNC_APP_DIR",
    "uplink": "CLUSTERSYNC_UPLINK",
    "bus": "CLUSTERSYNC_BUS",
    "interface": "CLUSTERSYNC_INTERFACE",
    "reload": "CLUSTERSYNC_RELOAD",
}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
START_METHODS = ("fork", "spawn", "forkserver")

RUN_DESCRIPTION = """\
Start N worker processes; each imports MODULE (the current directory and
--app-dir are on sys.path) and calls CALLABLE with no arguments (a coroutine
it returns is run with asyncio.run). In a worker, clustersync.current_worker()
gives its index and the worker count, clustersync.listen_sockets() the sockets
of --bind, and Hub(sync=cluster(channel=...)) reaches every other worker. An
ASGI app (Starlette, FastAPI...; see --interface) is served with uvicorn on the
--bind sockets instead, and gets its hub with clustersync.asgi.hub() in its
lifespan.

A worker is ready once CALLABLE has run for 1 s, or when it calls
clustersync.notify_ready() (an ASGI app: once uvicorn serves). A crashed
worker is replaced under the same index, after a delay that doubles with each
crash in a row (0.1 s, 0.2 s, ... 10 s; back to 0.1 s once a worker stayed up
10 s). A worker that fails before it is ready on the first start, or 5 times
in a row, stops the command (status 3): a module that does not import or a
missing CALLABLE is reported in one line.
"""

RUN_EPILOG = """\
environment variables (an option on the command line wins):
  CLUSTERSYNC_NUM_WORKERS       -w/--workers
  CLUSTERSYNC_BIND              --bind, several separated by commas
  CLUSTERSYNC_REUSE_PORT        --reuse-port (1/true/yes or 0/false/no)
  CLUSTERSYNC_RESTART           --restart
  CLUSTERSYNC_GRACEFUL_TIMEOUT  --graceful-timeout
  CLUSTERSYNC_TIMEOUT           --timeout
  CLUSTERSYNC_START_METHOD      --start-method
  CLUSTERSYNC_LOG_LEVEL         --log-level
  CLUSTERSYNC_APP_DIR           --app-dir
  CLUSTERSYNC_INTERFACE         --interface
  CLUSTERSYNC_RELOAD            --reload (1/true/yes or 0/false/no)
  CLUSTERSYNC_UPLINK            --uplink
  CLUSTERSYNC_BUS               --bus
  Inside a worker, CLUSTERSYNC_WORKER_ID and CLUSTERSYNC_WORKERS hold its index
  and the worker count (they are outputs, not options).

signals to the primary:
  TERM     graceful stop: each worker first gets every message published
           before the stop, then SIGTERM (which raises SystemExit in the
           worker's main thread); SIGKILL after --graceful-timeout
  INT      the same (Ctrl-C); a second INT kills the workers at once
  QUIT     kill the workers at once
  HUP      rolling restart, one worker at a time, with the app imported afresh
  TTIN     one worker more
  TTOU     one worker fewer (the highest index goes)
  If the primary dies, every worker exits within about a second.

exit status:
  0        every worker returned, or a stop ended within the graceful timeout
  1        a stop had to kill workers, or the address could not be bound
  2        bad command line or environment variable
  3        the app failed to boot
  N        --restart never (or on-failure, for workers that returned): the
           status of the first worker that failed (128 + signal if killed)

example:
  python -m clustersync run examples.chat:main -w 4 --bind 127.0.0.1:8000
  python -m clustersync run examples.chat_asgi:app -w 4 --bind 127.0.0.1:8000
"""


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= n <= MAX_RUN_WORKERS:
        raise argparse.ArgumentTypeError(
            f"must be from 1 to {MAX_RUN_WORKERS}, not {n} (each worker is a Python process of "
            "its own: tens of MB; more workers than cores seldom helps)"
        )
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, not {text}")
    return value


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return convert


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not 1/true/yes or 0/false/no")


def _binds(text: str) -> List[str]:
    return [_address(part) for part in re.split(r"[,\s]+", text) if part]


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """The ``clustersync`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="clustersync",
        description="Pub/sub across the worker processes of one host.",
    )
    parser.add_argument("--version", action="version", version=f"clustersync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run MODULE:CALLABLE in N supervised worker processes",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(command_parser=run)  # for errors about environment variables
    run.add_argument("app", metavar="MODULE:CALLABLE", help="the function each worker calls, e.g. myapp.server:main")
    run.add_argument(
        "-w", "--workers", type=_workers, metavar="N", help="number of worker processes (default: the number of CPUs)"
    )
    run.add_argument(
        "--bind",
        action="append",
        type=_address,
        metavar="ADDRESS",
        help="listen on HOST:PORT, [IPV6]:PORT, :PORT (all interfaces) or unix:PATH; repeatable. "
        "The primary opens each socket once and every worker inherits it: "
        "clustersync.listen_sockets() returns them. Port 0 picks a free port (see the log)",
    )
    run.add_argument(
        "--reuse-port",
        action="store_const",
        const=True,
        help="bind a socket per worker with SO_REUSEPORT (the kernel spreads connections) "
        "instead of one shared socket; TCP only",
    )
    run.add_argument(
        "--restart",
        type=_choice(RESTART_POLICIES),
        metavar="{" + ",".join(RESTART_POLICIES) + "}",
        help="on-failure (default): replace workers that crash; a worker that returns is done. "
        "always: replace workers that return too. never: a worker that ends is done. "
        "The command ends when every worker is done",
    )
    run.add_argument(
        "--graceful-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="on stop, how long workers have after SIGTERM before SIGKILL (default: 30)",
    )
    run.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="liveness: kill and replace a worker not heard from for this long (its I/O thread "
        "answers pings, so only a stopped worker, or one whose GIL is held, goes silent); default: off",
    )
    run.add_argument(
        "--start-method",
        type=_choice(START_METHODS),
        metavar="{" + ",".join(START_METHODS) + "}",
        help="how workers start (default: fork, since the primary is single-threaded; "
        "forkserver with --uplink, whose threads run in the primary)",
    )
    run.add_argument(
        "--uplink",
        metavar="URL",
        help="bridge every channel to other hosts through this backplane: redis://, rediss://, "
        "postgresql://, postgres://, nats:// or tls:// (one connection for the whole host; "
        "the client library is an extra, e.g. pip install \"clustersync[redis]\")",
    )
    run.add_argument(
        "--log-level",
        type=_choice(LOG_LEVELS),
        metavar="LEVEL",
        help="debug, info (default), warning, error or critical; each line names the worker and pid",
    )
    run.add_argument("--app-dir", metavar="DIR", help="look for MODULE in DIR too (before the current directory)")
    run.add_argument(
        "--interface",
        type=_choice(INTERFACES),
        metavar="{" + ",".join(INTERFACES) + "}",
        help="asgi: serve CALLABLE, an ASGI app, with uvicorn on the --bind sockets "
        '(pip install "clustersync[asgi]"). call: call it. auto (default): asgi for a coroutine function, '
        "or an object whose __call__ is one, that takes (scope, receive, send) (Starlette, FastAPI...); "
        "call for anything else",
    )
    run.add_argument(
        "--reload",
        action="store_const",
        const=True,
        help="for development: restart the workers, one at a time, when a .py file under --app-dir "
        "(or the current directory) changes; a worker that fails to start waits for the next change",
    )
    run.add_argument(
        "--bus",
        metavar="PATH",
        help="also listen on this Unix socket (mode 0600), where processes this command did not start "
        "join the relay with cluster(channel=..., address=PATH) or CLUSTERSYNC_BUS=PATH",
    )
    _bus_commands(commands)
    return parser


def _uid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric id") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"an id is 0 or more, not {text}")
    return value


def _bus_commands(commands: Any) -> None:
    """``relay``, ``publish`` and ``stats``: the bus from outside ``run``."""
    relay = commands.add_parser(
        "relay",
        help="relay between processes that join a Unix socket (no workers of its own)",
        description="Relay between processes this command did not start (gunicorn or uvicorn workers, "
        "cron jobs, shells): each joins with cluster(channel=..., address=PATH) or CLUSTERSYNC_BUS=PATH. "
        "Stops on SIGINT or SIGTERM.",
    )
    relay.set_defaults(command_parser=relay)
    relay.add_argument("--bus", metavar="PATH", help="the socket to create, mode 0600 (default: $CLUSTERSYNC_BUS)")
    relay.add_argument("--allow-uid", type=_uid, action="append", default=[], metavar="UID",
                       help="let this user join too (repeatable); the relay's own user always may")
    relay.add_argument("--allow-gid", type=_uid, action="append", default=[], metavar="GID",
                       help="let processes of this group join (repeatable); the socket's mode must let them reach it")
    relay.add_argument("--uplink", metavar="URL", help="bridge every channel to other hosts (see clustersync run --help)")
    relay.add_argument("--log-level", type=_choice(LOG_LEVELS), default="info", metavar="LEVEL")
    publish = commands.add_parser(
        "publish",
        help="publish one message on a bus from a shell",
        description="Publish DATA (JSON, or - to read it from standard input) on TOPIC to every hub on CHANNEL.",
    )
    publish.set_defaults(command_parser=publish)
    publish.add_argument("--bus", metavar="PATH", help="the relay's socket (default: $CLUSTERSYNC_BUS)")
    publish.add_argument("--channel", required=True, help="the channel, as in cluster(channel=...)")
    publish.add_argument("--namespace", default="", help="the hubs' namespace (default: none)")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("data", metavar="DATA", help="a JSON value ('\"text\"', 42, '{\"a\": 1}'), or - for standard input")
    stats = commands.add_parser("stats", help="print a relay's counters as JSON")
    stats.set_defaults(command_parser=stats)
    stats.add_argument("--bus", metavar="PATH", help="the relay's socket (default: $CLUSTERSYNC_BUS)")


def _bus_main(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from . import bus

    path: str = args.bus or environ.get(ENV["bus"]) or ""
    if not path:
        args.command_parser.error(f"--bus PATH is needed (or {ENV['bus']})")
    if args.command == "relay":
        _log.configure(args.log_level, "relay")
        return bus.run_relay(path, allow_uids=args.allow_uid, allow_gids=args.allow_gid, uplink=args.uplink)
    _log.configure("warning", args.command)
    if args.command == "publish":
        return bus.publish(path, args.channel, args.topic, args.data, namespace=args.namespace)
    return bus.print_stats(path)


def config_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> RunConfig:
    """Merge the options with their environment variables and the defaults."""

    def pick(name: str, convert: Callable[[str], Any], default: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        text = environ.get(ENV[name])
        if text is None or text.strip() == "":
            return default
        try:
            return convert(text.strip())
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{ENV[name]}={text!r}: {exc}")

    try:
        split_app(args.app)
    except ValueError as exc:
        parser.error(str(exc))
    uplink = pick("uplink", str, None) or None
    interface = pick("interface", _choice(INTERFACES), "auto")
    if interface == "asgi" and not pick("bind", _binds, []):
        parser.error("--interface asgi needs a socket to serve on: give --bind HOST:PORT")
    if uplink is not None:
        from ..relay.uplink import uplink as check_uplink

        try:
            check_uplink(uplink)
        except (ValueError, ImportError) as exc:
            parser.error(f"--uplink: {exc}")
    return RunConfig(
        app=args.app,
        workers=pick("workers", _workers, None) or _default_workers(),
        binds=tuple(pick("bind", _binds, [])),
        reuse_port=bool(pick("reuse_port", _flag, False)),
        restart=pick("restart", _choice(RESTART_POLICIES), "on-failure"),
        graceful_timeout=pick("graceful_timeout", _seconds, 30.0),
        timeout=pick("timeout", _seconds, None) or None,  # 0: off
        start_method=pick("start_method", _choice(START_METHODS), None),
        log_level=pick("log_level", _choice(LOG_LEVELS), "info"),
        app_dir=pick("app_dir", str, None),
        uplink=uplink,
        bus=pick("bus", str, None) or None,
        interface=interface,
        reload=bool(pick("reload", _flag, False)),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``clustersync`` and ``python -m clustersync``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command != "run":
        return _bus_main(args, os.environ)
    config = config_from_args(args, args.command_parser, os.environ)
    _log.configure(config.log_level, "primary")
    return Supervisor(config).run()
