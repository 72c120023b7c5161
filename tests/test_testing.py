"""clustersync.testing: a function in N nodes inside a test, through the relay or through threads."""

from __future__ import annotations

from typing import Any, Callable, List

import pytest

from clustersync.testing import NodeFailed, run_nodes

from . import workers

EVERYTHING = sorted((n, i) for n in range(3) for i in range(5))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,method", [("processes", "fork"), ("processes", "spawn"), ("threads", "fork")])
def test_every_node_hears_every_node(mode: str, method: str) -> None:
    results = run_nodes(workers.node_exchange, 3, args=(5,), mode=mode, start_method=method)
    assert results == [EVERYTHING] * 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_a_node_that_raises_fails_the_run_with_its_traceback(mode: str) -> None:
    with pytest.raises(NodeFailed) as failed:
        run_nodes(workers.node_fails, 3, mode=mode, timeout=30)
    assert failed.value.index == 1 and failed.value.error == "LookupError: node 1 fails on purpose"
    assert "node_fails" in failed.value.details  # the remote traceback


@pytest.mark.timeout(60)
def test_a_node_that_hangs_times_out_and_leaves_no_process() -> None:
    with pytest.raises(TimeoutError, match=r"nodes \[0\]"):
        run_nodes(workers.node_hangs, 2, timeout=2)
    # the autouse fixture fails this test if a worker is left behind


def test_bad_arguments_raise_at_once() -> None:
    with pytest.raises(ValueError):
        run_nodes(workers.node_hangs, 0)
    with pytest.raises(ValueError):
        run_nodes(workers.node_hangs, 2, mode="fibers")
    with pytest.raises(TypeError):
        run_nodes("not callable")  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_the_pytest_fixture(clustersync_nodes: Callable[..., List[Any]]) -> None:
    assert clustersync_nodes(workers.node_exchange, 3, args=(5,), mode="threads") == [EVERYTHING] * 3
    assert clustersync_nodes(workers.node_exchange, 2, args=(1,)) == [[(0, 0), (1, 0)]] * 2
