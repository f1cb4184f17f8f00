"""Adversarial probes of contracts: checks that cannot run, and concurrent calls.

(A contract override followed by SIGKILL at every record is driven by
``test_adversarial_delegation.py``'s delegation tree.)
"""

from __future__ import annotations

from typing import Any

import pytest

from perdure import Agent, AgentDefinitionError, ContractViolation, tool
from perdure.events import decode, execution_stream
from perdure.providers import Scripted

pytestmark = pytest.mark.anyio


def payer(ran: list[float], *amounts: float) -> Agent:
    @tool
    def pay(amount: float) -> str:
        ran.append(amount)
        return f"paid {amount:g}"

    calls = [Scripted.call("pay", amount=a) for a in amounts]
    return Agent("payer", tools=[pay], llm=Scripted([calls, "done"]))


def test_an_async_contract_is_refused_where_it_is_defined() -> None:
    """It used to be accepted and then never awaited: the coroutine object is not
    False, so every call passed the contract unchecked."""
    agent = payer([], 1e6)
    with pytest.raises(AgentDefinitionError, match="contract 'cap' is an async function"):

        @agent.contract("cap")
        async def cap(tool_name: str, args: Any) -> None:
            raise ContractViolation("never runs")

    assert agent.contracts == {}


async def test_a_contract_returning_an_awaitable_blocks_the_call(open_runtime: Any) -> None:
    ran: list[float] = []
    agent = payer(ran, 1e6)

    async def check() -> None:
        raise ContractViolation("never runs")

    agent.contract("cap")(lambda tool_name, args: check())
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="aw-1")
    assert ran == []
    reason = r.suspend_reason
    assert reason is not None and reason.kind == "contract" and reason.contract == "cap"
    assert "returned an awaitable" in reason.message


async def test_a_contract_with_a_bug_blocks_the_call_and_says_it_is_a_bug(
    open_runtime: Any,
) -> None:
    """A KeyError inside a contract used to reach the operator as the bare message
    "'amnt'"; the call must stay blocked (a check that cannot run lets nothing through)
    and the operator must be told it is the contract that broke, and which."""
    ran: list[float] = []
    agent = payer(ran, 5.0)

    @agent.contract("cap")
    def cap(tool_name: str, args: Any) -> bool:
        return args["amnt"] < 100  # the bug: a misspelt argument

    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="bug-1")
        reason = r.suspend_reason
        assert reason is not None and reason.kind == "contract" and reason.contract == "cap"
        assert reason.message.startswith("contract 'cap' raised KeyError: 'amnt' (a bug in")
        assert ran == []
        await rt.approve("bug-1", reason.confirmation_id, note="checked by hand", by="ops")
        r = await rt.wait("bug-1")
    assert r.status == "completed" and ran == [5.0]


async def test_a_contract_blocks_one_of_two_concurrent_calls_and_its_sibling_runs(
    open_runtime: Any,
) -> None:
    """Each call of a turn is checked on its own arguments: the one over the limit
    suspends, the other runs at once; the override runs the blocked one exactly once
    and the model sees both results in call order."""
    ran: list[float] = []
    agent = payer(ran, 900.0, 5.0)
    checked: list[float] = []

    @agent.contract("max-charge")
    def max_charge(tool_name: str, args: Any) -> None:
        checked.append(args["amount"])
        if args["amount"] > 500:
            raise ContractViolation(f"{args['amount']:g} exceeds 500")

    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="cc-1")
        reason = r.suspend_reason
        assert (
            reason is not None and reason.kind == "contract" and reason.message == "900 exceeds 500"
        )
        assert reason.arguments == {"amount": 900.0}
        assert ran == [5.0]  # the sibling within the limit ran without waiting
        await rt.approve("cc-1", reason.confirmation_id, note="VIP", by="carol")
        r = await rt.wait("cc-1")
        events = [decode(rec) async for rec in rt.log.read(execution_stream("cc-1"))]
    assert r.status == "completed" and sorted(ran) == [5.0, 900.0]
    assert checked == [900.0, 5.0]  # checked once each, at admission; not again on approval
    assert [m.content for m in r.transcript if m.role == "tool"] == ["paid 900", "paid 5"]
    [grant] = [e for e in events if e.type == "approval.granted"]
    assert (grant.override, grant.by, grant.note) == (True, "carol", "VIP")
