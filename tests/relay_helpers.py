"""Helpers for the relay's tests: run N workers on a primary, check what an exchange delivered."""

from __future__ import annotations

import multiprocessing
import queue
import time
from typing import Any, Callable, Dict, List

from clustersync.relay.primary import Primary


def run_workers(
    target: Callable[..., Any], n: int, *args: Any, start_method: str = "fork", timeout: float = 40, **options: Any
) -> Dict[int, Any]:
    """Fork ``n`` workers running ``target(results, barrier, *args)``; return what each put, by index."""
    ctx = multiprocessing.get_context(start_method)
    results = ctx.Queue()
    barrier = ctx.Barrier(n)
    primary = Primary(start_method=start_method, workers=n, **options)
    out: Dict[int, Any] = {}
    try:
        for _ in range(n):
            primary.fork(target, results, barrier, *args)
        deadline = time.monotonic() + timeout
        # The relay runs on its own thread: this thread only collects.
        while len(out) < n:
            try:
                item = results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            out[item[0]] = item
        assert len(out) == n, f"only workers {sorted(out)} reported"
        assert primary.join(timeout=20), "workers did not exit"
        for w in primary.exited:
            assert w.exitcode == 0, f"worker {w.index} exited with {w.exitcode}"
        out["stats"] = primary.stats()
    finally:
        primary.close(timeout=5)
        results.close()
    return out


def check_exchange(out: Dict[int, Any], n: int, count: int, publishers: List[int], kind: str) -> None:
    for index in range(n):
        _, hub_id, ready, got, stats = out[index]
        assert ready, f"worker {index} never became ready"
        by_origin: Dict[str, List[Any]] = {}
        for origin, data in got:
            by_origin.setdefault(origin, []).append(data)
        expected_origins = len(publishers)
        assert len(by_origin) == expected_origins, (index, list(by_origin))
        for origin, items in by_origin.items():
            assert len(items) == count, f"worker {index} got {len(items)} from {origin}"
            if kind == "json":
                seqs = [d["i"] for d in items]
                assert seqs == list(range(count)), f"worker {index}: out of order from {origin}"
                assert len({d["w"] for d in items}) == 1
            elif kind == "bytes":
                assert all(type(d) is bytes for d in items)
                seqs = [int.from_bytes(d[1:5], "big") for d in items]
                assert seqs == list(range(count))
                assert all(d[5:] == b"\x00\xff" * 8 for d in items)
            else:
                assert all(type(d) is str and d.endswith(":é") for d in items)
                assert [int(d.split(":")[1]) for d in items] == list(range(count))
        if index in publishers:
            assert hub_id in by_origin  # its own messages, delivered locally once
        assert stats["errors"] == 0
    assert out["stats"]["dropped"] == 0


def collect(results: Any, kind: str, want: int, timeout: float = 30.0) -> List[Any]:
    """Take ``want`` items tagged ``kind`` from a results queue, in order; fail on anything else or past ``timeout``."""
    items: List[Any] = []
    deadline = time.monotonic() + timeout
    while len(items) < want:
        try:
            item = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"waited for {want} {kind!r}, got {items}") from None
        assert item[0] == kind, item
        items.append(item)
    return items
