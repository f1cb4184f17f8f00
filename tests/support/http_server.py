"""A scripted HTTP server on 127.0.0.1 for talking real clients through real sockets.

The server runs the stdlib ``ThreadingHTTPServer`` in a background thread, so it serves
tests on any async backend (asyncio, trio) and also a runtime running in a subprocess.
Each request is answered by the next reply queued with :meth:`ScriptedHTTPServer.push`,
or, when the queue is empty, by ``handler(request)``; every request is recorded.

Replies:

- :class:`JSONReply` -- a status, headers and a JSON body.
- :class:`RawReply` -- arbitrary bytes (a malformed body).
- :class:`SSEReply` -- server-sent events, chunked; ``drop_after=N`` closes the socket
  after N events without finishing the body (a connection dropped mid-stream);
  ``gate=Gate(N)`` stops after N events until the test releases it (so a client is
  known to have seen part of a stream, and no more, when it acts on it).
- :class:`DropConnection` -- close the socket without answering at all.
- :class:`Hang` -- answer nothing until released (or the server stops): a timeout.
- anything with ``render(request) -> reply`` (the wire-format modules use this to answer
  with JSON or SSE depending on whether the request asked for a stream), or a plain
  function ``request -> reply``.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

__all__ = [
    "DropConnection",
    "Gate",
    "Hang",
    "JSONReply",
    "RawReply",
    "RecordedRequest",
    "Renderable",
    "Reply",
    "SSEEvent",
    "SSEReply",
    "ScriptedHTTPServer",
]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: Mapping[str, str]  # names lower-cased
    body: bytes

    @property
    def json(self) -> Any:
        """The body decoded as JSON (``None`` when empty)."""
        return json.loads(self.body) if self.body else None

    @property
    def wants_stream(self) -> bool:
        """True if the JSON body asked for ``"stream": true``."""
        body = self.json
        return isinstance(body, dict) and bool(body.get("stream"))


@dataclass(frozen=True)
class JSONReply:
    """Answer with ``body`` encoded as JSON."""

    body: Any
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawReply:
    """Answer with ``body`` verbatim (for malformed bodies)."""

    body: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: an optional ``event:`` name and its ``data:`` text."""

    data: str
    event: str | None = None

    def encode(self) -> bytes:
        """The event on the wire, blank line included."""
        head = f"event: {self.event}\n" if self.event is not None else ""
        return (head + f"data: {self.data}\n\n").encode()


@dataclass(frozen=True)
class Gate:
    """Pause a stream after ``after`` events until ``release`` is set (or the server stops).

    ``reached`` is set when the stream pauses: every event before the gate has been
    written to the socket.
    """

    after: int
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class SSEReply:
    """Answer with a ``text/event-stream`` body, one chunk per event.

    ``drop_after``: close the socket after that many events, without the final chunk, so
    the client sees a connection dropped mid-body. ``gate``: pause at a :class:`Gate`.
    """

    events: Sequence[SSEEvent]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    gate: Gate | None = None


@dataclass(frozen=True)
class DropConnection:
    """Close the connection without sending any response."""


@dataclass(frozen=True)
class Hang:
    """Send nothing until ``release`` is set or the server stops."""

    release: threading.Event = field(default_factory=threading.Event)


Reply = JSONReply | RawReply | SSEReply | DropConnection | Hang


class Renderable(Protocol):
    """A reply that decides its wire form from the request (JSON or SSE)."""

    def render(self, request: RecordedRequest) -> Reply:
        """The concrete reply for ``request``."""
        ...


Scripted = Reply | Renderable | Callable[[RecordedRequest], Any]


class ScriptedHTTPServer:
    """A loopback HTTP server answering from a queue of replies or a handler function.

    Use as a context manager (``with ScriptedHTTPServer() as server: ...``); ``url`` is
    its root URL. Thread-safe: the test thread pushes replies and reads ``requests``
    while handler threads serve.
    """

    def __init__(
        self, handler: Callable[[RecordedRequest], Any] | None = None, port: int = 0
    ) -> None:
        self.handler = handler
        self.requested_port = port
        self._queue: collections.deque[Any] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._hangs: list[threading.Event] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Bind to 127.0.0.1 (an ephemeral port unless one was given); serve in a thread."""
        outer = self

        class Handler(_Handler):
            server_owner = outer

        self._server = ThreadingHTTPServer(("127.0.0.1", self.requested_port), Handler)
        self._server.daemon_threads = True
        # A short poll interval: stop() waits for the serving loop to notice, and the
        # stdlib default (0.5 s) would add that much to every test's teardown.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="scripted-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, release hung requests and close the socket."""
        with self._lock:
            hangs = list(self._hangs)
        for event in hangs:
            event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ScriptedHTTPServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    # -- scripting ---------------------------------------------------------------

    def push(self, *replies: Scripted) -> None:
        """Queue replies; each answers one request, in order."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        """How many queued replies are still unused."""
        with self._lock:
            return len(self._queue)

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
            number = len(self._requests)
            scripted: Any = self._queue.popleft() if self._queue else self.handler
        if scripted is None:
            return JSONReply(
                {
                    "error": {
                        "message": f"fake server: no reply scripted for request {number} "
                        f"({request.method} {request.path})",
                        "type": "test_setup_error",
                    }
                },
                status=500,
            )
        return self._resolve(scripted, request)

    def _resolve(self, scripted: Any, request: RecordedRequest) -> Reply:
        # Render until we reach a concrete wire reply: a handler may return a Renderable.
        for _ in range(10):
            if isinstance(scripted, JSONReply | RawReply | SSEReply | DropConnection | Hang):
                if isinstance(scripted, Hang):
                    with self._lock:
                        self._hangs.append(scripted.release)
                if isinstance(scripted, SSEReply) and scripted.gate is not None:
                    with self._lock:
                        self._hangs.append(scripted.gate.release)
                return scripted
            if hasattr(scripted, "render"):
                scripted = scripted.render(request)
            elif callable(scripted):
                scripted = scripted(request)
            else:
                raise TypeError(f"fake server: cannot answer with {scripted!r}")
        raise TypeError("fake server: reply renders to itself forever")


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection; HTTP/1.1 so clients keep connections alive as in real life."""

    protocol_version = "HTTP/1.1"
    server_owner: ScriptedHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: the stdlib default writes every request to stderr.
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        reply = self.server_owner._next_reply(request)
        try:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            # The client went away (it timed out, or was cancelled): nothing to answer.
            self.close_connection = True

    def _send(self, reply: Reply) -> None:
        if isinstance(reply, DropConnection):
            self._drop()
        elif isinstance(reply, Hang):
            reply.release.wait()
            self._drop()
        elif isinstance(reply, JSONReply):
            self._send_body(reply.status, reply.headers, json.dumps(reply.body).encode())
        elif isinstance(reply, RawReply):
            self._send_body(reply.status, reply.headers, reply.body, reply.content_type)
        else:
            self._send_events(reply)

    def _send_body(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _send_events(self, reply: SSEReply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        for number, event in enumerate(reply.events):
            if reply.drop_after is not None and number >= reply.drop_after:
                self._drop()
                return
            if reply.gate is not None and number == reply.gate.after:
                reply.gate.reached.set()
                reply.gate.release.wait()
            data = event.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        if reply.drop_after is not None and reply.drop_after <= len(reply.events):
            self._drop()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        # Close the socket at once, mid-message: the client sees the peer disconnect.
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
