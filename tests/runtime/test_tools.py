"""Tools: schemas derived from hints and docstrings, and argument validation."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

import pytest

from perdure import Agent, AgentDefinitionError, Tool, ToolArgumentsError, tool
from perdure.fingerprint import code_digest
from perdure.journal import load_state
from perdure.providers import Scripted
from perdure.tools import fresh_arguments


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


@dataclasses.dataclass
class Address:
    street: str
    zip: str | None = None


class Line(TypedDict):
    sku: str
    qty: int


def test_schema_from_hints_defaults_and_docstring() -> None:
    @tool("quote", description="Quote an order")
    def quote(
        customer: str,
        lines: list[Line],
        unit: Unit = Unit.C,
        express: bool = False,
        note: Annotated[str, "free text for the courier"] = "",
        address: Address | None = None,
        mode: Literal["air", "sea"] = "air",
    ) -> dict:
        """Quote.

        Args:
            customer: Who pays.
            lines: What they buy.
        """
        return {}

    schema = quote.parameters
    props = schema["properties"]
    assert schema["required"] == ["customer", "lines"]
    assert schema["additionalProperties"] is False
    assert props["customer"] == {"type": "string", "description": "Who pays."}
    assert props["lines"]["items"]["properties"]["qty"] == {"type": "integer"}
    assert props["lines"]["description"] == "What they buy."
    assert props["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert props["express"] == {"type": "boolean", "default": False}
    assert props["note"]["description"] == "free text for the courier"
    assert props["mode"] == {"enum": ["air", "sea"], "type": "string", "default": "air"}
    assert props["address"]["anyOf"][1] == {"type": "null"}
    assert props["address"]["anyOf"][0]["required"] == ["street"]


def test_bare_decorator_uses_name_and_docstring() -> None:
    @tool
    def lookup(order_id: int) -> str:
        """Find an order by id.

        More detail that the model does not need.
        """
        return str(order_id)

    assert isinstance(lookup, Tool)
    assert lookup.name == "lookup"
    assert lookup.description == "Find an order by id."
    assert lookup(7) == "7"  # still callable directly, for unit tests


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"location": 3}, "arguments.location: expected string, got integer 3"),
        ({}, "missing required 'location'"),
        ({"location": "x", "extra": 1}, "unexpected 'extra'"),
        ({"location": "x", "days": "3"}, "arguments.days"),
        ({"location": "x", "unit": "k"}, "'k' is not one of 'c', 'f'"),
        ('{"location": ', "must be a JSON object"),
        ([1, 2], "must be a JSON object, got list"),
    ],
)
def test_invalid_arguments_name_the_problem(arguments: object, fragment: str) -> None:
    @tool("get_weather")
    def get_weather(location: str, unit: Literal["c", "f"] = "c", days: int | None = None) -> dict:
        return {}

    with pytest.raises(ToolArgumentsError) as info:
        get_weather.check_arguments(arguments)
    assert fragment in str(info.value)


def test_valid_arguments_pass_including_int_for_number() -> None:
    @tool
    def charge(amount: float, currency: str = "EUR") -> None: ...

    assert charge.check_arguments({"amount": 5}) == {"amount": 5}
    with pytest.raises(ToolArgumentsError):
        charge.check_arguments({"amount": True})  # a bool is not a number in JSON


def test_unsupported_definitions_are_refused_clearly() -> None:
    with pytest.raises(AgentDefinitionError, match="name every parameter"):

        @tool
        def variadic(*args: int) -> None: ...

    with pytest.raises(AgentDefinitionError, match="cannot be described as JSON Schema"):

        @tool
        def opaque(thing: object) -> None: ...

    with pytest.raises(AgentDefinitionError, match="not accepted by model APIs"):

        @tool("has spaces")
        def fine(x: int) -> None: ...


def test_code_digest_ignores_formatting_comments_docstring_and_decorators() -> None:
    def a(x: int) -> int:
        """One."""
        return x + 1  # comment

    def b(x: int) -> int:
        """Two, reworded."""
        # different comment
        return x + 1

    def c(x: int) -> int:
        return x + 2

    assert code_digest(a) == code_digest(b)
    assert code_digest(a) != code_digest(c)


def test_fingerprint_changes_per_field() -> None:
    def make(description: str, body_plus: int) -> Tool:
        if body_plus == 1:

            def f(x: int) -> int:
                return x + 1
        else:

            def f(x: int) -> int:
                return x + 2

        return Tool(f, name="f", description=description)

    base = make("adds", 1)
    assert make("adds", 1).fingerprint == base.fingerprint
    assert make("adds one", 1).fingerprint["description"] != base.fingerprint["description"]
    assert make("adds", 2).fingerprint["code"] != base.fingerprint["code"]


@pytest.mark.anyio
async def test_a_tool_mutating_its_arguments_changes_neither_the_record_nor_the_transcript(
    open_runtime: Any,
) -> None:
    """Invariant 5: the live transcript is what replay rebuilds from the log."""

    @tool
    def pack(items: list[str], box: dict[str, list[int]]) -> str:
        items.append("mutated")  # a tool is free to use its arguments as scratch space
        box["sizes"].append(99)
        box["new"] = [1]
        return ",".join(items)

    call = Scripted.call("pack", items=["a", "b"], box={"sizes": [1, 2]})
    llm = Scripted([call, "packed"])
    agent = Agent("packer", tools=[pack], llm=llm)

    @agent.contract("meddler")
    def meddle(tool_name: str, arguments: dict[str, Any]) -> None:
        arguments["items"].append("by contract")  # neither may a contract change them
        arguments["box"] = {}

    async with open_runtime() as rt:
        live = await rt.run(agent, "pack it", execution_id="pk-1")
        replayed = await load_state(rt.log, "pk-1")
    assert live.status == "completed"
    assert list(live.transcript) == replayed.messages
    [assistant] = [m for m in live.transcript if m.tool_calls]
    assert assistant.tool_calls[0].arguments == {"items": ["a", "b"], "box": {"sizes": [1, 2]}}
    assert [m.content for m in live.transcript if m.role == "tool"] == ["a,b,mutated"]
    # the model's second request carried the arguments as the model sent them
    second = llm.requests[1].messages
    assert second[1].tool_calls[0].arguments == {"items": ["a", "b"], "box": {"sizes": [1, 2]}}
    # after a restart, the recovered execution holds the same transcript
    async with open_runtime(agents=[agent]) as rt:
        assert (await rt.result("pk-1")).transcript == live.transcript


def test_fresh_arguments_copies_only_when_there_is_something_to_copy() -> None:
    flat = {"a": 1, "b": "x", "c": None}
    assert fresh_arguments(flat) is flat  # fn(**flat) copies the top level already
    nested = {"a": [1, [2]], "b": {"c": (3, [4])}}
    copied = fresh_arguments(nested)
    assert copied == nested
    assert copied["a"] is not nested["a"] and copied["a"][1] is not nested["a"][1]
    assert copied["b"]["c"][1] is not nested["b"]["c"][1]


_ADDRESS_PRONE_TOOLS = """
import functools

from perdure import Tool

PARAMS = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


class Adder:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: int) -> int:
        return x + self.n


def add(x: int, n: int) -> int:
    return x + n


namespace: dict = {}
# No source to read: digested from bytecode, whose nested code object has an address.
exec("def made(x):\\n    def inner(y):\\n        return y + 1\\n    return inner(x)\\n", namespace)


def tools() -> list:
    return [
        Tool(Adder(1), name="adder", description="d", parameters=PARAMS),
        Tool(functools.partial(add, n=1), name="partial", description="d", parameters=PARAMS),
        Tool(namespace["made"], name="made", description="d", parameters=PARAMS),
    ]


if __name__ == "__main__":
    print(" ".join(t.fingerprint_digest for t in tools()))
"""


def test_fingerprints_of_instances_partials_and_sourceless_code_hold_no_address(
    tmp_path: Path,
) -> None:
    """A digest holding a memory address is drift on every restart."""
    module = tmp_path / "address_prone_tools.py"
    module.write_text(_ADDRESS_PRONE_TOOLS)
    runs = [
        subprocess.run(
            [sys.executable, str(module)], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert len(runs[0]) == 3 and runs[0] == runs[1]

    # ...and the digests still see the code and which arguments are bound (not their
    # values: those are configuration, like an instance's attributes)
    class Adder:
        def __call__(self, x: int) -> int:
            return x + 1

    class Subtracter:
        def __call__(self, x: int) -> int:
            return x - 1

    def add(x: int, n: int) -> int:
        return x + n

    assert code_digest(Adder()) == code_digest(Adder())
    assert code_digest(Adder()) != code_digest(Subtracter())
    assert code_digest(functools.partial(add, n=1)) == code_digest(functools.partial(add, n=1))
    assert code_digest(functools.partial(add, n=1)) == code_digest(functools.partial(add, n=2))
    assert code_digest(functools.partial(add, n=1)) != code_digest(functools.partial(add, x=1))
    assert code_digest(functools.partial(add, 1)) == code_digest(functools.partial(add, 2))
    assert code_digest(functools.partial(add, 1)) != code_digest(functools.partial(add, 1, 2))
    assert code_digest(functools.partial(add, 1)) != code_digest(add)


def test_retries_on_a_non_idempotent_tool_are_refused() -> None:
    with pytest.raises(AgentDefinitionError, match=r"retries=2 with idempotent=False") as info:

        @tool(idempotent=False, retries=2)
        def charge(amount: float) -> str: ...

    assert "current_idempotency_key()" in str(info.value) and "'charge'" in str(info.value)
    assert not tool("pay", idempotent=False)(lambda amount: "ok").retries  # fine without


@pytest.mark.anyio
async def test_a_result_nested_too_deep_to_read_back_is_a_tool_error_not_an_unreadable_log(
    open_runtime: Any,
) -> None:
    """Invariant 7: a result the log could not read back is refused before it is written."""

    def nested(depth: int) -> Any:
        value: Any = "leaf"
        for _ in range(depth):
            value = [value]
        return value

    @tool
    def dig(depth: int) -> Any:
        return nested(depth)

    llm = Scripted([[Scripted.call("dig", depth=100), Scripted.call("dig", depth=450)], "dug"])
    agent = Agent("digger", tools=[dig], llm=llm)
    async with open_runtime() as rt:
        live = await rt.run(agent, "dig", execution_id="dig-1")
        replayed = await load_state(rt.log, "dig-1")
    assert live.status == "completed" and live.output == "dug"
    ok, deep = [m for m in live.transcript if m.role == "tool"]
    assert not ok.is_error and json.loads(ok.content) == nested(100)
    assert deep.is_error
    assert deep.content == (
        "ERROR (TypeError): result" + "[0]" * 100 + ": nested more than 100 containers deep, "
        "which the log would not read back; return a flatter value (or a JSON string)"
    )
    assert replayed.messages == list(live.transcript)  # the log reads back whole


def test_a_tool_named_like_a_delegation_is_refused() -> None:
    """The delegate_to_ prefix marks the tools made for agents=[...]: the runtime shares
    a turn's budget among them, so a tool of the user's there would take a share."""

    @tool("delegate_to_payments")
    def pay() -> str:
        """Pay."""
        return "paid"

    with pytest.raises(AgentDefinitionError, match="'delegate_to_' are reserved") as info:
        Agent("clerk", tools=[pay])
    assert "agent 'clerk'" in str(info.value) and "rename the tool" in str(info.value)
    payments = Agent("payments")
    boss = Agent("boss", agents=[payments])  # the tool made for a sub-agent is fine
    assert "delegate_to_payments" in boss.tools
