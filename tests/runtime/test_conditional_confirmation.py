"""``requires_confirmation`` as a rule: a plain function of the call's arguments says
whether this call waits for a person (``lambda a: a["amount"] > 1000``). The verdict is
recorded (``approval.requested``, or the call's start), so replay never asks again; a
rule that breaks makes the call wait, saying so.
"""

from __future__ import annotations

from typing import Any

import pytest

from perdure import Agent, AgentDefinitionError, tool
from perdure.events import execution_stream
from perdure.providers import Scripted

pytestmark = pytest.mark.anyio


def transfer_agent(rule: Any, ran: list[float], asked: list[float], *amounts: float) -> Agent:
    """The model moves each amount in turn (one call per turn), then says done."""

    def counted(args: dict[str, Any]) -> Any:
        asked.append(args["amount"])
        return rule(args)

    @tool("transfer", description="Move money", requires_confirmation=counted)
    def transfer(amount: float) -> str:
        ran.append(amount)
        return f"moved {amount}"

    turns = [Scripted.call("transfer", amount=a) for a in amounts]
    return Agent("mover", tools=[transfer], llm=Scripted([*turns, "done"]))


async def test_only_the_calls_the_rule_picks_wait_for_a_person(open_runtime: Any) -> None:
    ran: list[float] = []
    asked: list[float] = []
    agent = transfer_agent(lambda a: a["amount"] > 1000, ran, asked, 50.0, 5000.0, 20.0)
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "pay them", execution_id="cc-1")
        assert ran == [50.0]  # the small one ran at once
        reason = r.suspend_reason
        assert reason is not None and reason.kind == "approval"
        assert reason.arguments == {"amount": 5000.0}
        assert reason.message == "tool 'transfer' requires confirmation for these arguments"
        await rt.approve("cc-1", reason.confirmation_id)
        r = await rt.wait("cc-1")
        types = [rec.type async for rec in rt.log.read(execution_stream("cc-1"))]
    assert r.status == "completed" and ran == [50.0, 5000.0, 20.0]
    assert types.count("approval.requested") == 1
    # asked once per call: never again for the approved call, nor on the resume's replay
    assert asked == [50.0, 5000.0, 20.0]


async def test_a_restart_does_not_ask_the_rule_again(open_runtime: Any) -> None:
    ran: list[float] = []
    asked: list[float] = []
    agent = transfer_agent(lambda a: a["amount"] > 1000, ran, asked, 5000.0)
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "pay", execution_id="cc-2")
        cid = r.suspend_reason.confirmation_id  # type: ignore[union-attr]
    # The next deploy would not ask for this amount: the recorded verdict stands.
    agent = transfer_agent(lambda a: False, ran, asked, 5000.0)
    async with open_runtime(agents=[agent]) as rt:
        assert (await rt.result("cc-2")).is_suspended
        await rt.approve("cc-2", cid)
        r = await rt.wait("cc-2")
    assert r.status == "completed" and ran == [5000.0] and asked == [5000.0]


async def test_a_rule_that_raises_makes_the_call_wait_and_says_why(open_runtime: Any) -> None:
    ran: list[float] = []
    asked: list[float] = []

    def broken(args: dict[str, Any]) -> bool:
        return args["currency"] == "EUR"  # no such argument: KeyError

    agent = transfer_agent(broken, ran, asked, 10.0)
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "pay", execution_id="cc-3")
        reason = r.suspend_reason
        assert reason is not None and reason.kind == "approval"
        assert "requires_confirmation rule raised KeyError" in reason.message
        assert "approve or reject it" in reason.message
        await rt.reject("cc-3", reason.confirmation_id, "fix the rule first")
        r = await rt.wait("cc-3")
    assert r.status == "completed" and ran == []


async def test_the_rule_cannot_change_the_recorded_arguments(open_runtime: Any) -> None:
    ran: list[float] = []
    asked: list[float] = []

    def meddling(args: dict[str, Any]) -> bool:
        args["amount"] = 0.0
        return False

    agent = transfer_agent(meddling, ran, asked, 75.0)
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "pay", execution_id="cc-4")
    assert r.status == "completed" and ran == [75.0]


def test_a_rule_must_be_a_plain_function_or_a_bool() -> None:
    async def later(args: dict[str, Any]) -> bool:
        return True

    with pytest.raises(AgentDefinitionError, match=r"tool 'pay'.*plain function"):
        tool("pay", requires_confirmation=later)(lambda: None)
    with pytest.raises(AgentDefinitionError, match=r"tool 'pay'.*True, False or a function"):
        tool("pay", requires_confirmation="yes")(lambda: None)  # type: ignore[arg-type]
