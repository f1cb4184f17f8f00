"""Streams from responses and responses from streams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perdure.providers import (
    LLMResponse,
    MalformedResponseError,
    Message,
    ResponseCompleted,
    TextDelta,
    ToolCall,
)
from perdure.providers.streams import (
    ResponseAssembler,
    distinct_call_ids,
    events_from_response,
    parse_arguments,
    split_words,
)
from perdure.providers.types import ToolCallDelta, Usage


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_split_words_joins_back_exactly(text: str) -> None:
    pieces = split_words(text)
    assert "".join(pieces) == text
    assert all(piece for piece in pieces)


def test_split_words_is_word_sized() -> None:
    assert split_words("Hello  big world\n") == ["Hello", "  big", " world", "\n"]


def test_parse_arguments() -> None:
    assert parse_arguments('{"a": 1}') == {"a": 1}
    assert parse_arguments("") == {}
    assert parse_arguments("  ") == {}
    assert parse_arguments('{"a": ') == '{"a": '
    assert parse_arguments("[1, 2]") == "[1, 2]"


arguments = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)
calls = st.lists(
    st.builds(
        ToolCall,
        id=st.text(min_size=1, max_size=5),
        name=st.text(min_size=1, max_size=8),
        arguments=arguments | st.just("{not json"),
    ),
    max_size=3,
    # As every response perdure builds has them (distinct_call_ids sees to it).
    unique_by=lambda call: call.id,
)


@settings(max_examples=100, deadline=None)
@given(content=st.text(max_size=50), tool_calls=calls)
def test_assembling_the_events_of_a_response_gives_it_back(
    content: str, tool_calls: list[ToolCall]
) -> None:
    response = LLMResponse(
        Message("assistant", content, tool_calls=tuple(tool_calls)),
        finish_reason="tool_calls" if tool_calls else "stop",
        usage=Usage(3, 4),
        model="m",
        provider="p",
    )
    events = list(events_from_response(response))
    assert events[-1] == ResponseCompleted(response)
    assembler = ResponseAssembler()
    for event in events[:-1]:
        if isinstance(event, TextDelta):
            assembler.add_text(event.text)
        else:
            assert isinstance(event, ToolCallDelta)
            assembler.add_tool_call(event)
    rebuilt = assembler.build(
        finish_reason=response.finish_reason, usage=Usage(3, 4), model="m", provider="p"
    )
    assert rebuilt == response


def test_assembler_merges_pieces_by_index() -> None:
    assembler = ResponseAssembler()
    assembler.add_tool_call(ToolCallDelta(index=1, id="b", name="g", arguments='{"y"'))
    assembler.add_tool_call(ToolCallDelta(index=0, id="a", name="f", arguments=""))
    assembler.add_tool_call(ToolCallDelta(index=1, arguments=": 2}"))
    assembler.add_tool_call(ToolCallDelta(index=2, name="h"))  # no id from the server
    assert assembler.tool_calls() == (
        ToolCall("a", "f", {}),
        ToolCall("b", "g", {"y": 2}),
        ToolCall("call_2", "h", {}),
    )


def test_a_streamed_tool_call_without_a_name_is_malformed_as_when_not_streamed() -> None:
    assembler = ResponseAssembler()
    assembler.add_tool_call(ToolCallDelta(index=0, id="a", name="f", arguments="{}"))
    assembler.add_tool_call(ToolCallDelta(index=1, id="b", arguments='{"x": 1}'))
    with pytest.raises(MalformedResponseError, match="streamed tool call 1 has no function name"):
        assembler.build(finish_reason="tool_calls", usage=Usage(), model="m", provider="p")


server_ids = st.lists(st.none() | st.sampled_from(["", "a", "b", "call_0", "call_1", "a_1"]))


@settings(max_examples=300, deadline=None)
@given(ids=server_ids, taken=st.sets(st.sampled_from(["a", "call_0", "call_2", "a_1", "x"])))
def test_distinct_call_ids_are_present_new_and_deterministic(
    ids: list[str | None], taken: set[str]
) -> None:
    out = distinct_call_ids(ids, taken)
    assert len(out) == len(ids)
    assert all(out) and len(set(out)) == len(out) and not set(out) & taken
    # an id the server sent that is new to the conversation is kept as sent
    for position, given_id in enumerate(ids):
        if given_id and given_id not in taken and given_id not in ids[:position]:
            assert out[position] == given_id
    assert distinct_call_ids(ids, sorted(taken)) == out  # a function of its inputs only


def test_distinct_call_ids_examples() -> None:
    assert distinct_call_ids([None, ""]) == ["call_0", "call_1"]
    assert distinct_call_ids(["x", "x", "x"]) == ["x", "x_1", "x_2"]
    # a later turn numbers on from the calls before it, and never reuses their ids
    assert distinct_call_ids([None, "call_0"], {"call_0", "call_1"}) == ["call_2", "call_0_3"]


def test_the_assembler_gives_a_repeated_id_a_new_one() -> None:
    assembler = ResponseAssembler()
    assembler.add_tool_call(ToolCallDelta(index=0, id="dup", name="f", arguments="{}"))
    assembler.add_tool_call(ToolCallDelta(index=1, id="dup", name="g", arguments="{}"))
    assert [c.id for c in assembler.tool_calls()] == ["dup", "dup_1"]
    assert [c.id for c in assembler.tool_calls(taken={"dup"})] == ["dup_1", "dup_2"]
