"""The pure core: apply folds events into state, plan decides what comes next."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from perdure.events import (
    ApprovalGranted,
    ApprovalRejected,
    ApprovalRequested,
    BudgetRaised,
    Event,
    ExecutionStarted,
    ExecutionSuspended,
    LLMCompleted,
    SignalAwaited,
    SignalReceived,
    ToolCompleted,
    ToolResolved,
    ToolStarted,
    decode,
    encode,
)
from perdure.log.protocol import Record
from perdure.state import (
    CallLLM,
    ExecutionState,
    Fail,
    Run,
    Suspend,
    apply,
    apply_records,
    plan,
)


def started(**kw: Any) -> ExecutionStarted:
    base: dict[str, Any] = dict(
        execution_id="x1",
        agent="a",
        prompt="hi",
        run_id="r",
        definition={},
        max_steps=10,
    )
    base.update(kw)
    return ExecutionStarted(**base)


def llm(step: int, *calls: tuple[str, dict[str, Any]], text: str = "") -> LLMCompleted:
    tool_calls = [
        {"id": f"c{step}-{i}", "name": n, "arguments": a} for i, (n, a) in enumerate(calls)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    response = {
        "message": message,
        "finish_reason": "tool_calls" if calls else "stop",
        "usage": {"input": 10, "output": 5},
        "model": "m",
        "provider": "p",
    }
    return LLMCompleted(step, response, "fp", 0.01, 1.0)


def tstart(step: int, *, idempotent: bool = True, attempt: int = 1) -> ToolStarted:
    return ToolStarted(
        step, 1, step - 2, f"c1-{step - 2}", "t", {}, f"k{step}", "fp", idempotent, attempt
    )


def fold(*events: Event) -> ExecutionState:
    state = ExecutionState()
    for e in events:
        apply(state, e)
    return state


def test_fresh_execution_calls_the_model() -> None:
    state = fold(started())
    assert state.status == "running"
    assert [m.content for m in state.messages] == ["hi"]
    assert plan(state) == CallLLM()


def test_tool_calls_get_positional_steps_and_are_admitted() -> None:
    state = fold(started(), llm(1, ("t", {"a": 1}), ("t", {"a": 2})))
    assert [c.step for c in state.calls] == [2, 3]
    assert state.step == 3
    action = plan(state)
    assert isinstance(action, Run)
    assert [c.step for c in action.admit] == [2, 3] and action.rerun == ()


def test_results_join_the_transcript_in_call_order_not_completion_order() -> None:
    head = [started(), llm(1, ("t", {}), ("t", {})), tstart(2), tstart(3)]
    a = fold(*head, ToolCompleted(2, "ok", "first"), ToolCompleted(3, "ok", "second"))
    b = fold(*head, ToolCompleted(3, "ok", "second"), ToolCompleted(2, "ok", "first"))
    assert a.messages == b.messages
    assert [m.content for m in a.messages[-2:]] == ["first", "second"]
    assert a.calls == [] and plan(a) == CallLLM()


def test_tool_errors_are_marked_as_errors_for_the_model() -> None:
    state = fold(
        started(),
        llm(1, ("t", {})),
        tstart(2),
        ToolCompleted(2, "error", error={"type": "ValueError", "message": "boom"}),
    )
    last = state.messages[-1]
    assert last.role == "tool" and last.is_error
    assert last.content == "ERROR (ValueError): boom"


def test_in_doubt_idempotent_call_is_rerun_with_its_key() -> None:
    state = fold(started(), llm(1, ("t", {})), tstart(2))
    action = plan(state)
    assert isinstance(action, Run) and [c.key for c in action.rerun] == ["k2"]


def test_in_doubt_non_idempotent_call_suspends_for_a_person() -> None:
    state = fold(started(), llm(1, ("t", {})), tstart(2, idempotent=False))
    action = plan(state)
    assert isinstance(action, Suspend)
    assert action.reason["kind"] == "unknown_outcome"
    assert action.reason["key"] == "k2" and action.reason["step"] == 2
    # an operator's retry makes it runnable again
    state = fold(
        started(),
        llm(1, ("t", {})),
        tstart(2, idempotent=False),
        ExecutionSuspended(action.reason),
        ToolResolved(2, "retry", "ops"),
    )
    assert state.status == "running"
    assert isinstance(plan(state), Run)


def test_approval_suspends_and_a_signal_unblocks_at_once() -> None:
    req = ApprovalRequested(2, "c-1", "t", {}, "approval", message="needs ok")
    state = fold(started(), llm(1, ("t", {})), req)
    action = plan(state)
    assert isinstance(action, Suspend) and action.reason["confirmation_id"] == "c-1"
    apply(state, ExecutionSuspended(action.reason))
    assert state.status == "suspended"
    apply(state, ApprovalGranted("c-1", "ops", signal_seq=7))
    # status flips in apply, so the index written with this event says "running"
    assert state.status == "running" and state.last_signal_seq == 7
    assert isinstance(plan(state), Run)


def test_rejection_reaches_the_model_marked_as_rejected() -> None:
    req = ApprovalRequested(2, "c-1", "transfer", {}, "approval")
    state = fold(started(), llm(1, ("transfer", {})), req)
    apply(state, ExecutionSuspended(plan(state).reason))  # type: ignore[union-attr]
    apply(state, ApprovalRejected("c-1", "alice", "too much money"))
    assert state.status == "running"
    last = state.messages[-1]
    assert last.is_error and last.content == "REJECTED by alice: too much money"
    assert plan(state) == CallLLM()


def test_budget_exhaustion_and_raise() -> None:
    state = fold(started(budget={"max_llm_calls": 1}), llm(1, text="partial"))
    # (a final answer would have completed it; pretend the turn had no calls and went on)
    action = plan(state)
    assert isinstance(action, Suspend) and action.reason["limit"] == "max_llm_calls"
    apply(state, ExecutionSuspended(action.reason))
    apply(state, BudgetRaised({"max_llm_calls": 3}, "ops"))
    assert state.status == "running" and plan(state) == CallLLM()


def test_tool_budget_defers_calls_beyond_it() -> None:
    state = fold(started(budget={"max_tool_calls": 1}), llm(1, ("t", {}), ("t", {})))
    action = plan(state)
    assert isinstance(action, Run) and [c.step for c in action.admit] == [2]
    apply(state, tstart(2))
    apply(state, ToolCompleted(2, "ok", 1))
    action = plan(state)
    assert isinstance(action, Suspend) and action.reason["limit"] == "max_tool_calls"


def test_max_steps_fails() -> None:
    state = fold(started(max_steps=1), llm(1, ("t", {})), tstart(2), ToolCompleted(2, "ok", 1))
    action = plan(state)
    assert isinstance(action, Fail) and action.kind == "max_steps"


def test_waiting_tool_resumes_when_its_signal_arrives() -> None:
    state = fold(
        started(),
        llm(1, ("t", {})),
        tstart(2),
        SignalAwaited(2, "signal", "paid", {"name": "paid"}),
    )
    action = plan(state)
    assert isinstance(action, Suspend) and action.reason == {
        "kind": "signal",
        "name": "paid",
        "step": 2,
        "tool": "t",
    }
    apply(state, ExecutionSuspended(action.reason))
    apply(state, SignalReceived("other", 1, "ops"))
    assert state.status == "suspended"
    apply(state, SignalReceived("paid", {"ok": True}, "ops"))
    assert state.status == "running"
    action = plan(state)
    assert isinstance(action, Run) and action.rerun[0].step == 2


# -- codec and determinism ---------------------------------------------------------------

_EVENTS = st.sampled_from(
    [
        started(),
        llm(1, ("t", {"q": [1, 2.5, None, "x"]})),
        tstart(2),
        ToolCompleted(2, "ok", {"nested": {"list": [True, b"bytes"]}}),
        ApprovalRequested(2, "c-1", "t", {"a": 1}, "contract", contract="limit", message="no"),
        BudgetRaised({"max_dollars": 1.5}, "ops", 3),
    ]
)


@given(_EVENTS)
def test_events_round_trip_through_records(event: Event) -> None:
    new = encode(event)
    record = Record("exec/x1", 1, new.type, new.version, 0.0, new.payload)
    assert decode(record) == event


@given(
    st.permutations([2, 3, 4]), st.lists(st.sampled_from(["ok", "error"]), min_size=3, max_size=3)
)
def test_replaying_the_same_log_gives_the_same_state(order: list[int], outcomes: list[str]) -> None:
    events: list[Event] = [started(), llm(1, ("t", {}), ("t", {}), ("t", {}))]
    events += [tstart(s) for s in (2, 3, 4)]
    events += [
        ToolCompleted(
            s, o, s if o == "ok" else None, None if o == "ok" else {"type": "E", "message": "m"}
        )
        for s, o in zip(order, outcomes, strict=True)
    ]
    live = fold(*events)
    replayed = ExecutionState()
    for e in events:
        apply(replayed, decode(Record("s", 1, encode(e).type, 1, 0.0, encode(e).payload)))
    assert replayed == live


# -- replay folds a chunk at a time ------------------------------------------------------

_TURNS = st.lists(
    st.tuples(
        st.sampled_from([1, 1, 1, 2, 0]),  # tool calls in the turn (0: final answer)
        st.sampled_from(["ok", "error"]),
        st.sampled_from([7, "text", None, True, {"k": [1, 2]}, 2.5]),  # the tool's output
        # re-run after a crash (a second tool.started), or only a second attempt's start
        st.sampled_from(["once", "once", "rerun", "second"]),
        st.sampled_from([0, 0, 0, 1, 2]),  # a signal (with this seq) arrives after the turn
        # who answered (a fallback chain switches models; "" is a provider-less model)
        st.sampled_from([("p", "m"), ("q", "m"), ("", "p/m"), ("p", "m2")]),
        st.sampled_from([0.1, 0.2, 0.0, None, 3]),  # the call's cost
    ),
    min_size=1,
    max_size=12,
)


def _history(turns: list[tuple[Any, ...]]) -> list[Event]:
    """A plausible stream: turns of tool calls, re-runs, errors, signals between turns."""
    events: list[Event] = [started(max_steps=100)]
    step = 0
    for n_calls, outcome, output, rerun, signal, (provider, model), cost in turns:
        step += 1
        answer = llm(step, *[("t", {"i": i}) for i in range(n_calls)])
        response = {**answer.response, "provider": provider, "model": model}
        events.append(dataclasses.replace(answer, response=response, cost=cost))
        calls = [step + 1 + i for i in range(n_calls)]
        for s in calls:
            events.append(tstart(s, attempt=2 if rerun == "second" else 1))
            if rerun == "rerun":
                events.append(tstart(s, attempt=2))
        for s in reversed(calls):  # outcomes out of call order
            if outcome == "ok":
                events.append(ToolCompleted(s, "ok", output))
            else:
                events.append(ToolCompleted(s, "error", None, {"type": "E", "message": "m"}))
        step += n_calls
        if signal:
            events.append(SignalReceived(f"s{signal}", {"n": signal}, "ops", signal_seq=signal))
        if not n_calls:
            break
    return events


@settings(max_examples=300)
@given(_TURNS, st.lists(st.integers(min_value=1, max_value=60), max_size=4))
def test_replay_by_chunks_builds_the_state_apply_builds(
    turns: list[tuple[Any, ...]], cuts: list[int]
) -> None:
    """apply_records (replay's fold, with its one-tool-step shortcut) equals apply on
    each event, wherever the chunks of the stream are cut (a step may straddle two)."""
    events = _history(turns)
    live = fold(*events)
    records = [
        Record("exec/x1", i + 1, r.type, r.version, 0.0, r.payload)
        for i, r in enumerate(encode(e) for e in events)
    ]
    replayed = ExecutionState()
    start = 0
    for cut in [*sorted({min(c, len(records)) for c in cuts}), len(records)]:
        apply_records(replayed, records[start:cut])
        start = cut
    assert replayed == live
    assert replayed.messages == live.messages and replayed.usage == live.usage


def test_replay_sums_costs_in_call_order_to_the_last_bit() -> None:
    # (0.1 + 0.1) + 1.1 != 0.1 + (0.1 + 1.1) in floats: a tally that summed a run of
    # steps on its own and added the sum at the end would show here. The first step
    # fails its tool (so it is folded record by record) and starts the totals at 0.1.
    turns = [(1, "error", None, "once", 0, ("p", "m"), 0.1)]
    turns += [(1, "ok", 7, "once", 0, ("p", "m"), c) for c in (0.1, 1.1)]
    events = _history(turns)
    live = fold(*events)
    records = [
        Record("exec/x1", i + 1, e.type, 1, 0.0, encode(e).payload) for i, e in enumerate(events)
    ]
    replayed = apply_records(ExecutionState(), records)
    assert replayed.usage.dollars == live.usage.dollars == (0.1 + 0.1) + 1.1 != 0.1 + (0.1 + 1.1)
    assert replayed.usage.by_model == live.usage.by_model and replayed == live


# -- the chunk fold against the record-by-record fold, over every shape a stream takes ----


def _shaped_history(draw: st.DrawFn) -> list[Event]:
    """A stream mixing usual tool steps (which the chunk fold takes in one go) with every
    record that breaks a run of them: approvals, budgets, delegations, drift, doubt."""
    from perdure.events import (
        BudgetInherited,
        DelegationCharged,
        DriftAccepted,
        DriftDetected,
        ExecutionCancelled,
        ExecutionCompleted,
        ExecutionFailed,
        ExecutionResumed,
        SignalIgnored,
    )

    parent = draw(
        st.sampled_from(
            [
                None,
                {"execution_id": "p", "step": 2},
                {
                    "execution_id": "p",
                    "step": 2,
                    "budget": {"max_llm_calls": 90, "max_dollars": 50.0},
                    "origins": {"max_llm_calls": "root", "max_dollars": "p"},
                },
            ]
        )
    )
    budget = draw(st.sampled_from([None, {"max_llm_calls": 80}, {"max_tool_calls": 70}]))
    events: list[Event] = [started(max_steps=100, budget=budget, parent=parent)]
    step = 0
    seq = 0

    def signal_seq() -> int:
        nonlocal seq
        seq += 1
        return seq

    def answer(*calls: tuple[str, dict[str, Any]]) -> LLMCompleted:
        nonlocal step
        step += 1
        base = llm(step, *calls)
        provider, model = draw(st.sampled_from([("p", "m"), ("q", "m"), ("", "p/m")]))
        # floats (some providers report them) are not tallied: the sums could round apart
        tokens = draw(st.sampled_from([(10, 5), (1, 0), (0.1, 1), (1.1, 0.2)]))
        response = {
            **base.response,
            "provider": provider,
            "model": model,
            "usage": {"input": tokens[0], "output": tokens[1]},
        }
        cost = draw(st.sampled_from([0.1, 0.2, 0.0, None, 3]))
        return dataclasses.replace(base, response=response, cost=cost)

    def start(s: int, attempt: int = 1, idempotent: bool = True) -> ToolStarted:
        return ToolStarted(
            s, step, s - step - 1, f"c{step}-{s - step - 1}", "t", {}, f"k{s}", "fp", idempotent,
            attempt,
        )  # fmt: skip

    for _ in range(draw(st.integers(1, 10))):
        kind = draw(
            st.sampled_from(
                ["tools", "tools", "tools", "approval", "mixed", "budget", "inherited",
                 "delegate", "drift", "doubt", "failed", "signal"]
            )
        )  # fmt: skip
        if kind == "tools":
            n = draw(st.sampled_from([1, 1, 2, 3]))
            events.append(answer(*[("t", {"i": i}) for i in range(n)]))
            calls = [step + 1 + i for i in range(n)]
            for s in calls:
                events.append(start(s))
            for s in draw(st.permutations(calls)):
                if draw(st.booleans()):
                    events.append(ToolCompleted(s, "ok", draw(st.sampled_from([7, "x", None]))))
                else:
                    events.append(ToolCompleted(s, "error", None, {"type": "E", "message": "m"}))
            step += n
        elif kind in ("approval", "mixed"):
            n = 1 if kind == "approval" else 2
            events.append(answer(*[("t", {"i": i}) for i in range(n)]))
            gated = step + n
            if n == 2:
                events.append(start(step + 1))
            events.append(ApprovalRequested(gated, f"c-{gated}", "t", {}, "approval"))
            if n == 2:
                events.append(ToolCompleted(step + 1, "ok", "first"))
            events.append(ExecutionSuspended({"kind": "approval", "step": gated}))
            if draw(st.booleans()):
                events.append(ApprovalGranted(f"c-{gated}", "ops", None, False, signal_seq()))
                events.append(start(gated))
                events.append(ToolCompleted(gated, "ok", "approved"))
            else:
                events.append(ApprovalRejected(f"c-{gated}", "ops", "no", signal_seq()))
            step += n
        elif kind == "budget":
            events.append(ExecutionSuspended({"kind": "budget", "limit": "max_llm_calls"}))
            inherited = draw(st.sampled_from([None, {}, {"max_dollars": 40.0}]))
            # a low limit keeps it suspended, with the usage as of the raise in its reason
            raised = {"max_llm_calls": draw(st.sampled_from([95, 1, 2, 3]))}
            events.append(BudgetRaised(raised, "ops", signal_seq(), inherited))
        elif kind == "inherited":
            left = draw(
                st.sampled_from(
                    [{"max_llm_calls": 60}, {"max_dollars": 0.5}, {"max_tokens": 30}, {}]
                )
            )
            origins = {k: "root" for k in left}
            events.append(BudgetInherited(left, "p", "runtime", origins, signal_seq()))
        elif kind == "delegate":
            events.append(answer(("delegate_to_kid", {"task": "go"})))
            s = step + 1
            child = f"x1/{s}"
            events.append(start(s))
            events.append(SignalAwaited(s, "child", f"child:{child}", {"child_id": child}))
            events.append(ExecutionSuspended({"kind": "child", "child_id": child}))
            usage = {"llm_calls": 2, "tool_calls": 1, "input_tokens": 4, "dollars": 0.3}
            outcome = {"status": "completed", "output": "kid done", "usage": usage}
            events.append(SignalReceived(f"child:{child}", outcome, "runtime", signal_seq()))
            events.append(start(s, attempt=2))
            events.append(DelegationCharged(s, child, usage))
            events.append(ToolCompleted(s, "ok", "kid done"))
            step += 1
        elif kind == "drift":
            events.append(DriftDetected(step, [{"field": "model"}], "suspend"))
            events.append(ExecutionSuspended({"kind": "drift"}))
            events.append(DriftAccepted({"instructions": "new"}, "ops", signal_seq()))
        elif kind == "doubt":
            events.append(answer(("t", {"i": 0})))
            s = step + 1
            events.append(start(s, idempotent=False))
            events.append(ExecutionSuspended({"kind": "unknown_outcome", "step": s}))
            action = draw(st.sampled_from(["retry", "complete", "fail"]))
            events.append(ToolResolved(s, action, "ops", output="by hand", signal_seq=signal_seq()))
            if action == "retry":
                events.append(start(s, attempt=2, idempotent=False))
                events.append(ToolCompleted(s, "ok", "again"))
            step += 1
        elif kind == "failed":
            events.append(ExecutionFailed("llm", {"type": "E", "message": "down"}, step))
            events.append(ExecutionResumed("ops", signal_seq()))
        else:
            events.append(SignalReceived("go", {"n": 1}, "ops", signal_seq()))
            events.append(SignalIgnored("stale", "no such call", "ops", signal_seq()))
    end = draw(st.sampled_from(["open", "open", "completed", "cancelled"]))
    if end == "completed":
        events.append(answer())
        events.append(ExecutionCompleted("done"))
    elif end == "cancelled":
        events.append(ExecutionCancelled("enough", "ops", signal_seq()))
    return events


@settings(max_examples=300, deadline=None)
@given(st.composite(_shaped_history)(), st.lists(st.integers(1, 80), max_size=4))
def test_the_chunk_fold_equals_the_record_fold_over_every_shape_of_stream(
    events: list[Event], cuts: list[int]
) -> None:
    """Replay's apply_records, fed the stream in chunks cut anywhere, builds exactly the
    state apply_record builds record by record: usage (tallied over runs of tool steps),
    limits, delegated usage, suspension, signal seq, transcript, the open calls."""
    import cbor2

    from perdure.state import apply_record

    def stored() -> list[Record]:
        # What a reader hands out: payloads decoded afresh from CBOR, shared by nothing.
        return [
            Record("exec/x1", i + 1, r.type, r.version, 0.0, cbor2.loads(cbor2.dumps(r.payload)))
            for i, r in enumerate(encode(e) for e in events)
        ]

    records = stored()
    chunked = ExecutionState()
    start = 0
    for cut in [*sorted({min(c, len(records)) for c in cuts}), len(records)]:
        apply_records(chunked, records[start:cut])
        start = cut
    # Every record but a tool step's may read what the ones before it folded (a budget
    # check reads usage): the chunk fold must have it right there too, not only at the
    # end (a later record may settle what an earlier one got wrong).
    tool_step = {"llm.completed", "tool.started", "tool.completed"}
    one_by_one = ExecutionState()
    for n, record in enumerate(stored(), 1):
        apply_record(one_by_one, record.type, record.payload)
        if record.type not in tool_step and n < len(records):
            assert apply_records(ExecutionState(), records[:n]) == one_by_one, record
    assert chunked == one_by_one
    assert chunked.usage.to_dict() == one_by_one.usage.to_dict()
    assert chunked.limits == one_by_one.limits and chunked.delegated == one_by_one.delegated
