"""Usage and cost that would quietly corrupt a budget, and ids that differ by path."""

from __future__ import annotations

import json
import math

import pytest

from perdure.providers import (
    Anthropic,
    LLMRequest,
    MalformedResponseError,
    Message,
    OpenAI,
    Price,
    ResponseCompleted,
    RetryPolicy,
    Usage,
)
from tests.support.anthropic_server import AnthropicServer
from tests.support.http_server import JSONReply, SSEEvent, SSEReply
from tests.support.openai_server import OpenAIServer, completion

REQUEST = LLMRequest(model="", messages=(Message("user", "hi"),))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5])
def test_a_price_that_would_break_a_budget_is_refused(bad: float) -> None:
    # NaN never compares greater than a limit: a budget priced with it never runs out.
    with pytest.raises(ValueError, match="finite, non-negative"):
        Price(bad, 1.0)
    with pytest.raises(ValueError, match="finite, non-negative"):
        Price(1.0, bad)


@pytest.mark.anyio
async def test_a_negative_token_count_is_a_malformed_response_not_a_credit(
    openai_server: OpenAIServer,
) -> None:
    pytest.importorskip("openai")
    body = completion("ok").body()
    body["usage"] = {"prompt_tokens": -1000, "completion_tokens": 5}
    openai_server.push(JSONReply(body))
    async with OpenAI(
        "m", base_url=openai_server.base_url, api_key="sk-x", retry=RetryPolicy(max_attempts=1)
    ) as provider:
        with pytest.raises(MalformedResponseError, match="usage is not a pair of token counts"):
            await provider.complete(REQUEST)


@pytest.mark.anyio
async def test_an_anthropic_tool_use_without_an_id_gets_the_same_id_streamed_or_not(
    anthropic_server: AnthropicServer,
) -> None:
    pytest.importorskip("anthropic")
    block = {"type": "tool_use", "name": "get_time", "input": {}}
    body = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [block],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    start = {**body, "content": [], "stop_reason": None}

    def event(kind: str, **data: object) -> SSEEvent:
        return SSEEvent(json.dumps({"type": kind, **data}), event=kind)

    anthropic_server.push(
        JSONReply(body),
        SSEReply(
            [
                event("message_start", message=start),
                event("content_block_start", index=0, content_block=block),
                event("content_block_stop", index=0),
                event(
                    "message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 1}
                ),
                event("message_stop"),
            ]
        ),
    )
    async with Anthropic(
        "claude-x",
        base_url=anthropic_server.base_url,
        api_key="k" * 20,
        retry=RetryPolicy(max_attempts=1),
    ) as provider:
        whole = await provider.complete(REQUEST)
        streamed = [e async for e in provider.stream(REQUEST)]
    assert isinstance(streamed[-1], ResponseCompleted)
    assert streamed[-1].response == whole
    assert whole.message.tool_calls[0].id == "toolu_0" and whole.usage == Usage(1, 1)
