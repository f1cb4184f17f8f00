"""One provider instance used from successive event loops (asyncio, trio, asyncio).

A script that opens ``Runtime`` twice, or a test suite running both backends, uses one
module-level provider from several event loops in turn. The SDK clients' connection
pools belong to one loop, so the providers must build a client per loop.
"""

from __future__ import annotations

import importlib.util

import anyio
import pytest

from perdure.providers import LLMRequest, Message, OpenAI
from tests.support.anthropic_server import AnthropicServer, message
from tests.support.openai_server import OpenAIServer, completion

REQUEST = LLMRequest(model="", messages=[Message("user", "hi")])
BACKENDS = ["asyncio", "trio", "asyncio", "trio", "trio"]


def test_openai_provider_survives_a_change_of_event_loop(openai_server: OpenAIServer) -> None:
    provider = OpenAI("gpt-test", base_url=openai_server.base_url, api_key="sk-loops")

    async def ask(number: int) -> str:
        openai_server.push(completion(f"answer {number}"))
        return (await provider.complete(REQUEST)).message.content

    answers = [anyio.run(ask, n, backend=backend) for n, backend in enumerate(BACKENDS)]
    assert answers == [f"answer {n}" for n in range(len(BACKENDS))]
    assert len(openai_server.chat_requests) == len(BACKENDS)  # none failed and was retried
    # Closing from yet another loop cannot close the last loop's connections: no error.
    anyio.run(provider.aclose)
    # A closed provider used again builds a fresh client instead of failing.
    assert anyio.run(ask, 99, backend="trio") == "answer 99"
    anyio.run(provider.aclose, backend="trio")


@pytest.mark.skipif(
    importlib.util.find_spec("anthropic") is None, reason="the 'anthropic' extra is not installed"
)
def test_anthropic_provider_survives_a_change_of_event_loop(
    anthropic_server: AnthropicServer,
) -> None:
    from perdure.providers import Anthropic

    provider = Anthropic("claude-test", base_url=anthropic_server.base_url, api_key="k-loops")

    async def ask(number: int) -> str:
        anthropic_server.push(message(f"answer {number}"))
        return (await provider.complete(REQUEST)).message.content

    answers = [anyio.run(ask, n, backend=backend) for n, backend in enumerate(BACKENDS)]
    assert answers == [f"answer {n}" for n in range(len(BACKENDS))]
    assert len(anthropic_server.message_requests) == len(BACKENDS)
    anyio.run(provider.aclose, backend="trio")  # from the loop that last used it
