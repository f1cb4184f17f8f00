"""Fixtures for runtime tests: a Runtime on a real LMDB data dir in tmp_path; and
:func:`calling_once`, the one-tool-call agent many of them drive."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from perdure import Agent, Runtime, Tool
from perdure.providers import LLMRequest, Scripted

RuntimeFactory = Callable[..., Any]


def calling_once(name: str, work: Tool) -> Agent:
    """An agent whose model calls ``work(name=<the prompt>)`` once, then says "done"."""

    def script(request: LLMRequest) -> Any:
        if any(m.role == "tool" for m in request.messages):
            return "done"
        return Scripted.call(work.name, name=request.messages[-1].content)

    return Agent(name, tools=[work], llm=Scripted(script, record=False))


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
