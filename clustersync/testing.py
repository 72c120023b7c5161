"""Run a function in N workers inside a test, and get what each returned.

``run_nodes(fn, count)`` calls ``fn(node)`` in ``count`` nodes at once:
worker processes of a primary, through the real relay (``mode="processes"``),
or threads of this process through ``broadcast_channel`` (``mode="threads"``).
Each node gets a :class:`Node`: its index, the node count, ``node.hub()`` for
a hub on the test's own channel, and ``node.barrier()`` to wait for the
others. ``run_nodes`` returns the values ``fn`` returned, by index; if a node
raises, it raises :class:`NodeFailed` with that node's traceback; if they do
not all finish within ``timeout``, ``TimeoutError``. Whatever happens, no
process is left behind and every hub is closed.

pytest users get the same as the ``clustersync_nodes`` fixture (the package
registers a pytest plugin), which also names the channel after the test.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .hub import Hub
from .sync import broadcast_channel, cluster

__all__ = ["Node", "NodeFailed", "run_nodes", "MODES"]

MODES = ("processes", "threads")
_channels = itertools.count(1)


class NodeFailed(AssertionError):
    """A node's function raised: ``index``, ``error`` (``Type: message``) and ``details`` (its traceback)."""

    def __init__(self, index: int, error: str, details: str) -> None:
        super().__init__(f"node {index} raised {error}\n{details}")
        self.index = index
        self.error = error
        self.details = details


class Node:
    """What a node's function gets: ``index`` (0..count-1), ``count``, ``channel``, ``mode``."""

    def __init__(self, index: int, count: int, channel: str, mode: str, barrier: Any) -> None:
        self.index = index
        self.count = count
        self.channel = channel
        self.mode = mode
        self._barrier = barrier
        self._hubs: List[Hub] = []

    def hub(self, **options: Any) -> Hub:
        """A hub on the test's channel (``cluster`` in processes, ``broadcast_channel`` in threads).

        ``options`` go to :class:`~clustersync.hub.Hub`. It is closed when the node's function returns.
        """
        sync = cluster(channel=self.channel) if self.mode == "processes" else broadcast_channel(channel=self.channel)
        hub = Hub(sync=sync, **options)
        self._hubs.append(hub)
        return hub

    def barrier(self, timeout: float = 30.0) -> None:
        """Wait until every node has called this (for example: all subscribed, now publish)."""
        self._barrier.wait(timeout)

    def _close(self) -> None:
        for hub in self._hubs:
            hub.close()

    def __repr__(self) -> str:
        return f"<Node {self.index} of {self.count} ({self.mode}) on {self.channel!r}>"


def _run_one(fn: Callable[[Node], Any], node: Node, args: Tuple[Any, ...]) -> Tuple[str, Any, str]:
    try:
        value = fn(node, *args)
    except BaseException as exc:  # reported to the test, with the traceback
        return ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        node._close()
    return ("ok", value, "")


def _process_entry(
    fn: Callable[..., Any], args: Tuple[Any, ...], count: int, channel: str, barrier: Any, results: Any
) -> None:
    from .relay.worker import current_worker

    me = current_worker()
    assert me is not None
    node = Node(me.index, count, channel, "processes", barrier)
    status, value, details = _run_one(fn, node, args)
    try:
        results.put((me.index, status, value, details))
    except Exception as exc:  # the value does not pickle
        results.put((me.index, "error", f"{type(exc).__name__}: the return value cannot be sent: {exc}", ""))


def run_nodes(
    fn: Callable[..., Any],
    count: int = 2,
    *,
    args: Sequence[Any] = (),
    mode: str = "processes",
    start_method: str = "fork",
    timeout: float = 60.0,
    channel: Optional[str] = None,
) -> List[Any]:
    """Call ``fn(node, *args)`` in ``count`` nodes at once; return their results by index.

    ``mode``: ``"processes"`` (workers of a primary, through the relay; with
    ``spawn``/``forkserver``, ``fn``, ``args`` and the results must pickle)
    or ``"threads"`` (``broadcast_channel``). Raises :class:`NodeFailed` for
    the first node that raised, ``TimeoutError`` past ``timeout`` seconds.
    """
    if not callable(fn):
        raise TypeError("fn must be callable")
    if not isinstance(count, int) or not 1 <= count <= 256:
        raise ValueError("count must be an int from 1 to 256")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    channel = channel or f"clustersync-test-{os.getpid()}-{next(_channels)}"
    runner = _in_processes if mode == "processes" else _in_threads
    outcomes = runner(fn, tuple(args), count, channel, start_method, timeout)
    missing = [i for i in range(count) if i not in outcomes]
    for index in outcomes:  # in the order they finished: the first failure is the cause
        status, value, details = outcomes[index]
        if status == "error":
            raise NodeFailed(index, value, details)
    if missing:
        raise TimeoutError(f"nodes {missing} did not finish within {timeout:g} s")
    return [outcomes[i][1] for i in range(count)]


def _in_processes(
    fn: Callable[..., Any], args: Tuple[Any, ...], count: int, channel: str, start_method: str, timeout: float
) -> Dict[int, Tuple[str, Any, str]]:
    from .relay.primary import Primary

    ctx = multiprocessing.get_context(start_method)
    results = ctx.Queue()
    barrier = ctx.Barrier(count)
    primary = Primary(start_method=start_method, workers=count)
    outcomes: Dict[int, Tuple[str, Any, str]] = {}
    try:
        for _ in range(count):
            primary.fork(_process_entry, fn, args, count, channel, barrier, results)
        deadline = time.monotonic() + timeout
        while len(outcomes) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                index, status, value, details = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                if not primary.workers:  # every worker is gone: nothing more can come
                    for w in primary.exited:
                        if w.index not in outcomes:
                            outcomes[w.index] = ("error", f"the worker exited with {w.exitcode}", "")
                    break
                continue
            outcomes[index] = (status, value, details)
            if status == "error":
                break  # the others may be waiting for this one: stop them now
    finally:
        primary.close(timeout=5)
        results.close()
    return outcomes


def _in_threads(
    fn: Callable[..., Any], args: Tuple[Any, ...], count: int, channel: str, start_method: str, timeout: float
) -> Dict[int, Tuple[str, Any, str]]:
    barrier = threading.Barrier(count)
    outcomes: Dict[int, Tuple[str, Any, str]] = {}
    nodes = [Node(i, count, channel, "threads", barrier) for i in range(count)]

    lock = threading.Lock()

    def run(node: Node) -> None:
        outcome = _run_one(fn, node, args)
        with lock:  # dicts keep insertion order: the order the nodes finished
            outcomes[node.index] = outcome
        if outcome[0] == "error":
            barrier.abort()  # the others may be waiting for this one: stop them now

    threads = [threading.Thread(target=run, args=(n,), name=f"clustersync-node-{n.index}", daemon=True) for n in nodes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        barrier.abort()  # release nodes waiting on the others; their hubs close as they return
    with lock:
        return dict(outcomes)
