"""Fixtures for runtime tests: a Runtime on a real LMDB data dir in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from perdure import Runtime

RuntimeFactory = Callable[..., Any]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data dir."""
    return tmp_path / "data"


@pytest.fixture
def open_runtime(data_dir: Path) -> RuntimeFactory:
    """``async with open_runtime(**kw) as rt``: a Runtime on the test's data dir.

    ``durability="process"`` by default: these tests check semantics, not fsync (the
    crash tests and benchmarks use fsync). Opening it again after closing it is a
    restart on the same data.
    """

    @asynccontextmanager
    async def factory(**kwargs: Any) -> AsyncIterator[Runtime]:
        kwargs.setdefault("durability", "process")
        kwargs.setdefault("shutdown_timeout", 2.0)
        async with Runtime(data_dir, **kwargs) as rt:
            yield rt

    return factory
