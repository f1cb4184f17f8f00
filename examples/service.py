"""A long-running service embedding a Runtime, with a tiny HTTP API (standard library only).

    python examples/service.py [DATA_DIR] [--port 8765]      # serve until Ctrl-C
    python examples/service.py --demo                        # serve, call itself, exit

    POST /runs                     {"prompt": "...", "id": "optional-id"}  -> 202 {"execution_id"}
    GET  /runs/ID                  -> the execution's result
    GET  /runs?status=suspended    -> executions from the index
    POST /runs/ID/approve          {"confirmation_id": "...", "note": "..."}
    POST /runs/ID/reject           {"confirmation_id": "...", "reason": "..."}

Work survives restarts: stop the service while an expense waits for approval, start it
again, approve it, and it carries on. Approvals may also come from an operator's
terminal ('perdure approve ID CID') while the service runs: it auto-resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import urllib.request
from http import HTTPStatus
from typing import Any

import anyio
from anyio.abc import SocketStream

from perdure import (
    Agent,
    ExecutionNotFoundError,
    InvalidSignalError,
    PromptMismatchError,
    Runtime,
    tool,
)
from perdure.providers import LLMRequest, Scripted

log = logging.getLogger("service")


@tool("pay_expense", requires_confirmation=True)
def pay_expense(employee: str, amount: float) -> str:
    """Reimburse an employee (a person approves first)."""
    return f"paid {amount:.2f} to {employee}"


def script(request: LLMRequest) -> Any:
    messages = request.messages
    last = messages[len(messages) - 1]
    if last.role == "user":
        employee, amount = last.content.split(":")
        return Scripted.call("pay_expense", employee=employee.strip(), amount=float(amount))
    return f"Expense handled: {last.content}"


agent = Agent(
    "expenses",
    instructions="Pay expenses after approval.",
    tools=[pay_expense],
    llm=Scripted(script, record=False),
)


class BadRequest(Exception):
    """The request cannot be read (answered 400; the service carries on)."""


_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024


class Api:
    """Routes HTTP requests to the runtime.

    Every request gets an answer or, if the client went away, none; whatever goes
    wrong with one request (bad input, a bug) never stops the service.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("?")[0].split("/") if p]
        query = dict(q.partition("=")[::2] for q in path.partition("?")[2].split("&") if q)
        if method == "POST" and not isinstance(body, dict):
            return 400, {"error": "the body must be a JSON object"}
        try:
            if method == "POST" and parts == ["runs"]:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    return 400, {"error": "'prompt' (a string) is required"}
                handle = await self.rt.spawn(agent, prompt, execution_id=body.get("id"))
                return 202, {"execution_id": handle.execution_id}
            if method == "GET" and parts == ["runs"]:
                infos = await self.rt.executions(status=query.get("status"))
                return 200, [i.to_dict() for i in infos]
            if method == "GET" and len(parts) == 2 and parts[0] == "runs":
                return 200, (await self.rt.result(parts[1])).to_dict()
            if method == "POST" and len(parts) == 3 and parts[2] in ("approve", "reject"):
                if parts[2] == "approve":
                    await self.rt.approve(
                        parts[1], body["confirmation_id"], body.get("note"), by="http"
                    )
                else:
                    await self.rt.reject(
                        parts[1], body["confirmation_id"], body["reason"], by="http"
                    )
                return 200, (await self.rt.result(parts[1])).to_dict()
        except ExecutionNotFoundError as exc:
            return 404, {"error": str(exc)}
        except PromptMismatchError as exc:
            return 409, {"error": str(exc)}
        except KeyError as exc:
            return 400, {"error": f"missing field {exc}"}
        except (InvalidSignalError, ValueError, TypeError) as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no route {method} {path}"}

    async def serve_client(self, stream: SocketStream) -> None:
        async with stream:
            try:
                method, path, body = await self._read_request(stream)
            except BadRequest as exc:
                await self._respond(stream, 400, {"error": str(exc)})
                return
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return  # the client went away before its request was complete
            try:
                status, payload = await self.handle(method, path, body)
            except Exception as exc:
                log.exception("%s %s failed", method, path)
                status, payload = 500, {"error": f"internal error: {type(exc).__name__}"}
            await self._respond(stream, status, payload)

    async def _read_request(self, stream: SocketStream) -> tuple[str, str, Any]:
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > _MAX_HEAD:
                raise BadRequest("request head too large")
            data += await stream.receive(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[1].startswith("/"):
            raise BadRequest(f"bad request line {lines[0][:100]!r}")
        method, path, _ = request_line
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise BadRequest(f"bad header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if not 0 <= length <= _MAX_BODY:
            raise BadRequest(f"Content-Length must be 0..{_MAX_BODY}")
        while len(rest) < length:
            rest += await stream.receive(65536)
        try:
            body = json.loads(rest[:length]) if length else {}
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        return method, path, body

    async def _respond(self, stream: SocketStream, status: int, payload: Any) -> None:
        out = json.dumps(payload).encode()
        phrase = HTTPStatus(status).phrase
        try:
            await stream.send(
                f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(out)}\r\nConnection: close\r\n\r\n".encode()
                + out
            )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client did not wait for the answer


def call(port: int, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def demo_client(port: int) -> None:
    run = call(port, "POST", "/runs", {"prompt": "ada: 42.50"})
    eid = run["execution_id"]
    print(f"POST /runs -> {run}")
    result = call(port, "GET", f"/runs/{eid}")
    while result["status"] in ("running", "queued"):
        result = call(port, "GET", f"/runs/{eid}")
    reason = result["suspend_reason"]
    print(f"GET /runs/{eid} -> {result['status']} ({reason['kind']} {reason['confirmation_id']})")
    print(
        f"GET /runs?status=suspended -> {len(call(port, 'GET', '/runs?status=suspended'))} waiting"
    )
    done = call(
        port, "POST", f"/runs/{eid}/approve", {"confirmation_id": reason["confirmation_id"]}
    )
    while done["status"] != "completed":
        done = call(port, "GET", f"/runs/{eid}")
    print(f"POST /runs/{eid}/approve -> {done['status']}: {done['output']}")


async def main(data_dir: str, port: int, demo: bool) -> None:
    async with Runtime(data_dir, agents=[agent]) as rt:
        api = Api(rt)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(f"serving on http://127.0.0.1:{port} (data dir {data_dir})", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, api.serve_client)
            if demo:
                await anyio.to_thread.run_sync(demo_client, port)
                tg.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", default=None)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--demo", action="store_true", help="call the API once, then exit")
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="perdure-service-")
    try:
        anyio.run(main, data_dir, 0 if args.demo else args.port, args.demo)
    except KeyboardInterrupt:
        print("stopped; running executions resume at the next start")
