"""The pytest plugin of clustersync (registered as an entry point): the ``clustersync_nodes`` fixture."""

from __future__ import annotations

import re
from typing import Any, Callable, List

import pytest

from .testing import run_nodes

__all__ = ["clustersync_nodes"]


@pytest.fixture
def clustersync_nodes(request: pytest.FixtureRequest) -> Callable[..., List[Any]]:
    """``run_nodes`` (see :mod:`clustersync.testing`), with a channel named after the test."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:180] or "test"
    calls = iter(range(1, 1_000_000))

    def run(fn: Callable[..., Any], count: int = 2, **options: Any) -> List[Any]:
        options.setdefault("channel", f"{base}-{next(calls)}")
        return run_nodes(fn, count, **options)

    return run
