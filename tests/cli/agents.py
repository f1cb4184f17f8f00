"""Agents whose executions fill the CLI tests' data dirs (scripted models, no network).

Imported both by the tests and by ``owner.py`` running in another process, so the
definitions (and their fingerprints) are the same on both sides. ``ALL`` is what
``perdure replay --agent tests.cli.agents:ALL`` replays against.
"""

from __future__ import annotations

import os
import signal

from perdure import Agent, Budget, ContractViolation, current_idempotency_key, tool, wait_for_signal
from perdure.providers import BadRequestError, Scripted

#: Set in a child process's environment to make ``charge_card`` SIGKILL its own process
#: mid-call, leaving the call in doubt (started, never finished).
CRASH_IN_TOOL = "PERDURE_TEST_CRASH_IN_TOOL"


@tool("get_weather", description="Get the current weather for a city")
def get_weather(city: str) -> dict:
    """Current weather."""
    return {"city": city, "forecast": "sunny", "celsius": 21}


@tool("transfer_funds", description="Move money between accounts", requires_confirmation=True)
def transfer_funds(dst: str, amount: float) -> dict:
    """Move money (needs a person's approval first)."""
    return {"moved": amount, "to": dst, "key": current_idempotency_key()}


@tool("charge_card", description="Charge the customer's card", idempotent=False)
def charge_card(amount: float) -> dict:
    """Charge a card: not idempotent, so a crash inside leaves it in doubt."""
    if os.environ.get(CRASH_IN_TOOL):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"charged": amount}


@tool("await_go", description="Wait until an operator says go")
def await_go() -> object:
    """Suspend until the 'go' signal arrives, then return its payload."""
    return wait_for_signal("go")


@tool("report", description="Write a long report")
def report(size: int) -> str:
    """A report of ``size`` characters (large outputs for the pipe tests)."""
    return "x" * size


weather = Agent(
    "weather",
    instructions="You report the weather.",
    tools=[get_weather],
    llm=Scripted([Scripted.call("get_weather", city="Paris"), "It is sunny in Paris."]),
)

banker = Agent(
    "banker",
    instructions="You move money when asked.",
    tools=[transfer_funds],
    llm=Scripted(
        [Scripted.call("transfer_funds", dst="savings", amount=50.0), "Moved $50 to savings."]
    ),
)

guarded = Agent(
    "guarded",
    instructions="You move money within limits.",
    tools=[get_weather],
    llm=Scripted([Scripted.call("get_weather", city="Zurich"), "Checked Zurich."]),
)


@guarded.contract("no-zurich")
def _no_zurich(tool_name: str, arguments: dict) -> None:
    if arguments.get("city") == "Zurich":
        raise ContractViolation("Zurich lookups need a second pair of eyes")


budgeted = Agent(
    "budgeted",
    instructions="You report the weather cheaply.",
    tools=[get_weather],
    llm=Scripted([Scripted.call("get_weather", city="Oslo"), "Cold in Oslo."]),
    budget=Budget(max_llm_calls=1),
)

charger = Agent(
    "charger",
    instructions="You charge cards.",
    tools=[charge_card],
    llm=Scripted([Scripted.call("charge_card", amount=9.99), "Charged $9.99."]),
)

waiter = Agent(
    "waiter",
    instructions="You wait for the go.",
    tools=[await_go],
    llm=Scripted([Scripted.call("await_go"), "Went."]),
)

failing = Agent(
    "failing",
    instructions="You fail.",
    llm=Scripted([BadRequestError("the scripted model refuses", provider="scripted")]),
)

reporter = Agent(
    "reporter",
    instructions="You write long reports.",
    tools=[report],
    llm=Scripted([Scripted.call("report", size=300_000), "Report written."]),
)


@tool("snapshot", description="Take a binary snapshot")
def snapshot() -> dict:
    """Values JSON lacks (bytes, NaN) and a key that looks like an export tag."""
    return {"blob": b"\x00\xffdata", "ratio": float("nan"), "$bytes": "not a tag", "n": [1, 2.5]}


archiver = Agent(
    "archiver",
    instructions="You archive.",
    tools=[snapshot],
    llm=Scripted([Scripted.call("snapshot"), "Archived."]),
)

helper = Agent("helper", instructions="You help.", llm=Scripted(["Helped."]))

boss = Agent(
    "boss",
    instructions="You delegate.",
    agents=[helper],
    llm=Scripted([Scripted.call("delegate_to_helper", task="help me"), "Boss done."]),
)

ALL = [weather, banker, guarded, budgeted, charger, waiter, failing, reporter, archiver, boss]
