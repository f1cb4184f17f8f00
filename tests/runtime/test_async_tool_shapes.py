"""Every shape of async callable is an async tool: awaited on the event loop, never threaded.

``inspect.iscoroutinefunction`` says False for an instance whose class has an
``async def __call__``; such a tool used to run in a worker thread, "returning" a
coroutine nothing awaited. Shapes: an ``async def`` function, a ``functools.partial`` of
one, an instance with an async ``__call__`` (plain and dataclass), a bound async method;
each given bare in ``tools=[...]`` and wrapped with ``@tool``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from perdure import Agent, Tool, tool
from perdure.events import execution_stream
from perdure.fingerprint import code_digest
from perdure.journal import load_state
from perdure.providers import Scripted

# (tool name, thread id, whether an anyio task was current) per call, in call order.
Calls = list[tuple[str, int, bool]]


def _note(calls: Calls, name: str) -> None:
    try:
        anyio.get_current_task()
        in_task = True
    except RuntimeError:  # no event loop in this thread: a worker thread
        in_task = False
    calls.append((name, threading.get_ident(), in_task))


def make_shapes(calls: Calls) -> dict[str, Callable[..., Any]]:
    """One async callable per shape, each answering ``"<shape>:<city>"``."""

    async def forecast(city: str, prefix: str = "function") -> str:
        """Forecast the weather.

        Args:
            city: Where.
        """
        await anyio.lowlevel.checkpoint()  # only a coroutine that is awaited gets past this
        _note(calls, prefix)
        return f"{prefix}:{city}"

    class Lookup:
        """Weather lookups through a client."""

        def __init__(self) -> None:
            self.spec = "client configuration"  # must not shadow Tool.spec()

        async def __call__(self, city: str) -> str:
            """Look up the weather in a city.

            Args:
                city: Where.
            """
            await anyio.lowlevel.checkpoint()
            _note(calls, "instance")
            return f"instance:{city}"

    @dataclasses.dataclass
    class DataLookup:
        # Class annotations of its own: get_type_hints(instance) used to read these.
        unit: str = "celsius"

        async def __call__(self, city: str) -> str:
            await anyio.lowlevel.checkpoint()
            _note(calls, "dataclass")
            return f"dataclass:{city}"

    class Service:
        async def lookup(self, city: str) -> str:
            """Look it up."""
            await anyio.lowlevel.checkpoint()
            _note(calls, "method")
            return f"method:{city}"

    return {
        "function": forecast,
        "partial": functools.partial(forecast, prefix="partial"),
        "instance": Lookup(),
        "dataclass": DataLookup(),
        "method": Service().lookup,
    }


SHAPES = ["function", "partial", "instance", "dataclass", "method"]


@pytest.mark.anyio
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "decorated"])
async def test_every_async_shape_runs_on_the_event_loop_and_is_recorded(
    open_runtime: Any, wrapped: bool
) -> None:
    calls: Calls = []
    shapes = make_shapes(calls)
    tools = [
        tool(f"t_{name}")(fn) if wrapped else Tool(fn, name=f"t_{name}")
        for name, fn in shapes.items()
    ]
    assert all(t.is_async for t in tools)
    turn = [Scripted.call(f"t_{name}", city=name.upper()) for name in SHAPES]
    agent = Agent("shapes", tools=tools, llm=Scripted([turn, "done"]))
    async with open_runtime() as rt:
        result = await rt.run(agent, "go", execution_id="shapes-1")
        records = [r async for r in rt.log.read(execution_stream("shapes-1"))]
        replayed = await load_state(rt.log, "shapes-1")
    assert result.status == "completed" and result.output == "done"
    # Each ran once, awaited in an anyio task on the loop's thread (this test's).
    assert sorted(name for name, _, _ in calls) == sorted(SHAPES)
    assert {(thread, in_task) for _, thread, in_task in calls} == {(threading.get_ident(), True)}
    expected = [f"{name}:{name.upper()}" for name in SHAPES]
    # Recorded in completion order (they run concurrently): put them back in turn order.
    index = {r.payload["step"]: r.payload["index"] for r in records if r.type == "tool.started"}
    completed = sorted(
        (r.payload for r in records if r.type == "tool.completed"),
        key=lambda c: index[c["step"]],
    )
    assert [(c["status"], c["output"]) for c in completed] == [("ok", e) for e in expected]
    assert [m.content for m in replayed.messages if m.role == "tool"] == expected


def test_async_shapes_get_their_schema_name_and_description_from_the_code_they_run() -> None:
    shapes = make_shapes([])
    city = {"type": "string", "description": "Where."}
    schema = {
        "type": "object",
        "properties": {"city": city},
        "additionalProperties": False,
        "required": ["city"],
    }
    partial = Tool(shapes["partial"])
    # The partial's bound keyword is configuration: neither asked of the model nor shown.
    assert partial.parameters == schema and "partial" not in str(partial.parameters)
    assert (partial.name, partial.description) == ("forecast", "Forecast the weather.")
    instance = Tool(shapes["instance"])
    assert instance.parameters == schema
    assert (instance.name, instance.description) == ("Lookup", "Look up the weather in a city.")
    assert instance.spec().parameters == schema  # the instance's own ``spec`` shadows nothing
    data = Tool(shapes["dataclass"], name="data")
    assert data.parameters["properties"] == {"city": {"type": "string"}}
    method = Tool(shapes["method"])
    assert (method.name, method.description) == ("lookup", "Look it up.")


def test_an_async_instance_is_digested_by_its_call_code_not_its_state() -> None:
    class Lookup:
        def __init__(self, key: str) -> None:
            self.key = key

        async def __call__(self, city: str) -> str:
            return city

    class Changed:
        def __init__(self, key: str) -> None:
            self.key = key

        async def __call__(self, city: str) -> str:
            return city.upper()

    assert code_digest(Lookup("sk-one")) == code_digest(Lookup("sk-two"))
    assert code_digest(Lookup("sk-one")) != code_digest(Changed("sk-one"))
    assert Tool(Lookup("a"), name="x").fingerprint == Tool(Lookup("b"), name="x").fingerprint


async def _fetch(q: str) -> str:
    await anyio.lowlevel.checkpoint()
    return f"fetched {q}"


def _hiding(fn: Callable[..., Any]) -> Callable[..., Any]:
    # No functools.wraps: the wrapper looks sync and returns fn's coroutine unawaited.
    def wrapper(q: str) -> Any:
        return fn(q)

    return wrapper


def _keeping(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(q: str) -> Any:
        return fn(q)

    return wrapper


async def _returns_coroutine(q: str) -> Any:
    return _fetch(q)  # forgot the await


SYNC_FIX = (
    "a sync function returned a coroutine instead of a result, so the async code it wraps "
    "never ran; declare it `async def`, or keep its signature with functools.wraps so that "
    "perdure sees the async function and awaits it"
)
ASYNC_FIX = (
    "the tool returned a coroutine instead of its result, so that code never ran; await it "
    "inside the tool and return what it gives"
)


@pytest.mark.anyio
async def test_a_tool_returning_a_coroutine_is_a_tool_error_and_the_coroutine_is_closed(
    open_runtime: Any, recwarn: pytest.WarningsRecorder
) -> None:
    tools = [
        tool("decorated")(_hiding(_fetch)),
        tool("lambda")(lambda q: _fetch(q)),
        tool("unawaited")(_returns_coroutine),
        tool("wrapped")(_keeping(_fetch)),  # the advice given works
    ]
    assert [t.is_async for t in tools] == [False, False, True, True]
    turn = [Scripted.call(t.name, q=t.name) for t in tools]
    agent = Agent("awaitables", tools=tools, llm=Scripted([turn, "done"]))
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="aw-1")
        records = [rec async for rec in rt.log.read(execution_stream("aw-1"))]
    gc.collect()  # an unclosed coroutine warns when it is collected
    assert [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)] == []
    assert r.status == "completed" and r.output == "done"
    steps = {
        rec.payload["tool"]: rec.payload["step"] for rec in records if rec.type == "tool.started"
    }
    outcomes = {rec.payload["step"]: rec.payload for rec in records if rec.type == "tool.completed"}

    def recorded(name: str) -> tuple[str, Any, Any]:
        c = outcomes[steps[name]]
        return c["status"], c["output"], c["error"]

    def where(name: str) -> str:
        return f"execution 'aw-1' step {steps[name]} (tool {name!r})"

    for name in ("decorated", "lambda"):
        error = {"type": "ToolError", "message": f"{where(name)}: {SYNC_FIX}"}
        assert recorded(name) == ("error", None, error)
    unawaited = {"type": "ToolError", "message": f"{where('unawaited')}: {ASYNC_FIX}"}
    assert recorded("unawaited") == ("error", None, unawaited)
    assert recorded("wrapped") == ("ok", "fetched wrapped", None)
    # the model is told, marked as an error, like any tool exception
    seen = {m.name: (m.is_error, m.content) for m in r.transcript if m.role == "tool"}
    assert seen["decorated"] == (True, f"ERROR (ToolError): {where('decorated')}: {SYNC_FIX}")
    assert seen["wrapped"] == (False, "fetched wrapped")


class _Pending:
    """An awaitable that is not a coroutine and cannot be cancelled."""

    def __await__(self) -> Any:
        yield from ()
        return "never seen"


@pytest.mark.anyio
async def test_a_tool_returning_another_awaitable_is_a_tool_error_saying_it_was_never_awaited(
    open_runtime: Any,
) -> None:
    @tool("pending")
    async def pending(q: str) -> Any:
        return _Pending()

    agent = Agent("pending", tools=[pending], llm=Scripted([Scripted.call("pending", q="x"), "ok"]))
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="aw-2")
    (message,) = [m for m in r.transcript if m.role == "tool"]
    assert message.is_error
    assert message.content == (
        "ERROR (ToolError): execution 'aw-2' step 2 (tool 'pending'): the tool returned an "
        f"awaitable ({__name__}._Pending) instead of its result, which was never awaited; "
        "await it inside the tool and return what it gives"
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_task_a_tool_returns_unawaited_is_cancelled_not_left_running(
    open_runtime: Any, anyio_backend: str
) -> None:
    import asyncio

    tasks: list[asyncio.Task[None]] = []

    async def forever() -> None:
        await asyncio.Event().wait()

    @tool("spawner")
    async def spawner(q: str) -> Any:
        tasks.append(asyncio.ensure_future(forever()))
        return tasks[-1]  # forgot the await

    agent = Agent("spawner", tools=[spawner], llm=Scripted([Scripted.call("spawner", q="x"), "ok"]))
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="aw-3")
    (task,) = tasks
    # a task left running would never end: a bounded wait turns that into a failure
    with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
        await task
    (message,) = [m for m in r.transcript if m.role == "tool"]
    assert message.is_error and "which was cancelled (its code may have started)" in message.content
