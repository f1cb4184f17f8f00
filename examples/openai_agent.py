"""A durable agent on OpenAI or any OpenAI-compatible server, streaming its answer.

    OPENAI_API_KEY=sk-... python examples/openai_agent.py "What's the weather in Paris?"
    OPENAI_BASE_URL=http://localhost:11434/v1 PERDURE_MODEL=llama3.1 \
        python examples/openai_agent.py

Set OPENAI_API_KEY for OpenAI itself, or OPENAI_BASE_URL for a self-hosted server (vLLM,
Ollama, llama.cpp, LM Studio; no key needed). PERDURE_MODEL picks the model (default
gpt-4o-mini). It needs the openai package (pip install -e '.[openai]', or the dev
extras). To try it with no account at all, run the test suite's fake server from the
repo root (it needs the dev extras: pip install -e '.[dev]'):

    python -m tests.support.openai_server 8765 &
    OPENAI_BASE_URL=http://127.0.0.1:8765/v1 python examples/openai_agent.py

Every model call and tool call is a durable step in ./perdure-data: interrupt it with
Ctrl-C or kill -9 and run it again with the same --id, and it carries on from where it
stopped without asking the model again for steps it already answered.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

import anyio

from perdure import Agent, Result, Runtime, tool
from perdure.providers import OpenAI, TextDelta


@tool("get_weather", description="Get the current weather for a city")
def get_weather(city: str) -> dict:
    """Current weather (a stand-in: plug a real weather API in here).

    Args:
        city: City name, e.g. "Paris".
    """
    return {"city": city, "forecast": "sunny", "celsius": 21}


def provider() -> OpenAI:
    """The OpenAI provider, configured from the environment, or exit saying what to set."""
    key = os.environ.get("OPENAI_API_KEY")
    base_url = os.environ.get("OPENAI_BASE_URL")
    if not key and not base_url:
        sys.exit(
            "examples/openai_agent.py needs a model endpoint:\n"
            "  export OPENAI_API_KEY=sk-...                 # for OpenAI\n"
            "  export OPENAI_BASE_URL=http://host:port/v1   # for an OpenAI-compatible server\n"
            "or, to try it locally with no account (from the repo root, with the dev extras\n"
            "installed: pip install -e '.[dev]'):\n"
            "  python -m tests.support.openai_server 8765 &\n"
            "  OPENAI_BASE_URL=http://127.0.0.1:8765/v1 python examples/openai_agent.py"
        )
    model = os.environ.get("PERDURE_MODEL", "gpt-4o-mini")
    # A self-hosted server usually wants no key; the client still needs some string.
    return OpenAI(model, base_url=base_url, api_key=key or "not-needed")


async def main(question: str, execution_id: str, data_dir: str) -> None:
    agent = Agent(
        "weather",
        instructions="Answer weather questions. Use get_weather; be brief.",
        tools=[get_weather],
        llm=provider(),
    )
    # Registered at open: an execution a killed run left behind resumes at once, and
    # rt.stream below follows it from its next model call.
    async with Runtime(data_dir, agents=[agent]) as rt:
        print(f"execution {execution_id}")
        async for item in rt.stream(agent, question, execution_id=execution_id):
            if isinstance(item, TextDelta):
                print(item.text, end="", flush=True)
            elif isinstance(item, dict) and item.get("kind") == "tool":
                print(f"\n  [step {item['step']}: {item['tool']} -> {item['status']}]")
            elif isinstance(item, Result):
                print(f"\n{item.status}: {item.output}")
                u = item.usage
                print(
                    f"usage: {u.llm_calls} model calls, {u.total_tokens} tokens, ${u.dollars:.5f}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What's the weather in Paris?")
    parser.add_argument("--id", default=None, help="execution id (reuse it to resume)")
    parser.add_argument("--data-dir", default="./perdure-data")
    args = parser.parse_args()
    anyio.run(main, args.question, args.id or uuid.uuid4().hex[:12], args.data_dir)
