"""Servers that echo the API key back, on every path an error takes to the user.

The key comes back in a JSON error body that is retried (so it passes the retry log
line too), in an error event inside a 200 stream, in a plain-text body of a 401 and of
a 500, and in an HTML page served with status 200. Whatever the path, the key must
appear in no recorded record, no log line (any logger, at DEBUG) and no Result.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure import Agent, Runtime
from perdure.events import execution_stream
from perdure.providers import Fallback, LLMRequest, Message, OpenAI, ProviderError, RetryPolicy
from tests.support.http_server import RawReply, RecordedRequest, SSEEvent, SSEReply
from tests.support.openai_server import OpenAIServer, error

pytestmark = pytest.mark.anyio

KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
ECHO = f"key {KEY}; header 'Authorization: Bearer {KEY}'; x-api-key={KEY}"


async def no_sleep(seconds: float) -> None:
    return None


def echoing(mode: str) -> Any:
    def reply(request: RecordedRequest) -> Any:
        if mode == "retried-503":
            return error(503, ECHO, type="server_error")
        if mode == "stream-error-event":
            if request.wants_stream:
                event = {"error": {"message": ECHO, "type": "server_error"}}
                return SSEReply([SSEEvent(json.dumps(event))])
            return error(500, ECHO, type="server_error")
        if mode == "text-401":
            return RawReply(ECHO.encode(), status=401, content_type="text/plain")
        if mode == "text-500":
            return RawReply(ECHO.encode(), status=500, content_type="text/plain")
        return RawReply(f"<html>{ECHO}</html>".encode(), content_type="text/html")

    return reply


def assert_no_key(*texts: str) -> None:
    for text in texts:
        assert KEY not in text and KEY[8:24] not in text, text


@pytest.mark.parametrize(
    "mode", ["retried-503", "stream-error-event", "text-401", "text-500", "html-200"]
)
@pytest.mark.parametrize("streaming", [False, True], ids=["run", "stream"])
async def test_an_echoed_key_reaches_no_record_log_line_or_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, streaming: bool
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: perdure's, the SDK's, the HTTP stack's
    with OpenAIServer(echoing(mode)) as server:
        provider = OpenAI(
            "gpt-test",
            base_url=server.base_url,
            api_key=KEY,
            retry=RetryPolicy(max_attempts=2, sleep=no_sleep),
        )
        agent = Agent("keyed", llm=provider)
        async with Runtime(tmp_path / "data", durability="process") as rt:
            if streaming:
                r = [i async for i in rt.stream(agent, "hi", execution_id="k-1")][-1]
            else:
                r = await rt.run(agent, "hi", execution_id="k-1")
            recorded = [repr(x.payload) async for x in rt.log.read(execution_stream("k-1"))]
        assert server.chat_requests  # the server was asked, and answered with the key
    assert r.status == "failed" and r.error is not None
    assert "execution 'k-1' step 1" in r.error["message"]
    logged = [record.getMessage() for record in caplog.records]
    assert_no_key(*recorded, *logged, repr(r.error), repr(provider), repr(agent.llm))


async def test_a_chain_whose_members_all_echo_their_keys_shows_neither(
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = "sk-other-9876543210zyxwvutsrqponmlkjihgfedcba"
    caplog.set_level(logging.DEBUG)
    with (
        OpenAIServer(echoing("retried-503")) as first,
        OpenAIServer(lambda r: error(503, f"bad key {other}", type="server_error")) as second,
    ):
        policy = RetryPolicy(max_attempts=2, sleep=no_sleep)
        chain = Fallback(
            [
                OpenAI("a", base_url=first.base_url, api_key=KEY, retry=policy),
                OpenAI("b", base_url=second.base_url, api_key=other, retry=policy, name="b"),
            ]
        )
        with pytest.raises(ProviderError) as caught:
            await chain.complete(LLMRequest(model="", messages=[Message("user", "hi")]))
    err = caught.value
    rendered = "".join(traceback.format_exception(err)) + repr([f.__dict__ for f in err.failures])
    logged = [record.getMessage() for record in caplog.records]
    assert_no_key(rendered, *logged)
    assert other not in rendered and not [line for line in logged if other in line]
    assert str(err).count("[REDACTED]") >= 2  # both members' echoes, both scrubbed
