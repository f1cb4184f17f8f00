"""The ``perdure`` command: inspect, verify and operate a data dir.

    perdure [--data-dir DIR] [--json] COMMAND [ARGS]

The data dir defaults to ``$PERDURE_DATA_DIR``, else ``./perdure-data``.

Reading commands (``status``, ``inspect``, ``steps``, ``events``, ``export``,
``health``, ``replay``) open the log as a client: they never take the owner lock, so
they work while a service owns the dir, and they write nothing. Signal commands
(``approve``, ``reject``, ``signal``, ``resume``, ``resolve``, ``cancel``) check the
signal against the execution's index entry, then append it to the inbox stream
through the same client path, exactly as ``Runtime.approve`` and friends do: the
owning runtime notices within ~50 ms, delivers it and auto-resumes the execution; with
no runtime running the signal waits in the inbox and takes effect at the next start.
``purge`` deletes finished executions, so it must own the dir: with a runtime running it
refuses, naming the owner's pid (that service can call ``rt.purge(...)`` itself).

Every command takes ``--json`` (one JSON document on stdout, errors included) and
otherwise prints aligned text for people. Exit status: 0 success; 1 an error, a fault
(``health``), drift (``replay``) or a signal that was not sent; 2 a usage error (a
``replay --agent`` that cannot be imported or is no Agent included); 141 when stdout
was closed before everything was written (``perdure events ID | head``), quietly, for
every command.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import getpass
import importlib
import io
import json
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any, NoReturn, TextIO

import anyio

import perdure
from perdure.agent import Agent
from perdure.budget import Budget
from perdure.cli_export import export_document, record_to_json, to_json_value
from perdure.cli_render import (
    clip,
    fmt_bytes,
    fmt_clock,
    fmt_dollars,
    fmt_json,
    fmt_time,
    key_values,
    next_steps,
    render_change,
    render_entry,
    table,
)
from perdure.cli_timeline import timeline
from perdure.drift import Replayer, ReplayReport
from perdure.errors import PerdureError
from perdure.events import (
    INBOX_STREAM,
    Event,
    EventDecodeError,
    SignalSent,
    decode,
    encode,
    execution_stream,
    record_types,
)
from perdure.journal import index_meta
from perdure.log import (
    ANY,
    DataDirLockedError,
    Fault,
    LmdbLog,
    LogError,
    Record,
    StreamInfo,
    TrimmedError,
)
from perdure.result import ExecutionInfo
from perdure.retention import FINISHED, batches, cutoff, eligible_trees
from perdure.signals import BUILTIN, canonical_name, in_doubt_problem, precheck, resume_problem
from perdure.state import TERMINAL, ExecutionState, apply
from perdure.status import (
    STATUSES,
    PendingSignal,
    blocked_descendant,
    confirmation_owner,
    describe,
    owner_phrase,
    owner_pid,
    pending_signals,
    registered_agents,
)
from perdure.timers import decider

__all__ = ["CliError", "build_parser", "console_command", "main", "run"]

DEFAULT_DATA_DIR = "./perdure-data"
_PREFIX = "exec/"


class CliError(Exception):
    """A command cannot do what was asked; the message says why and what to do."""

    def __init__(self, message: str, kind: str = "error", code: int = 1) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class _UsageError(Exception):
    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises on bad usage instead of exiting, so that a usage
    error can be reported as JSON when ``--json`` was asked for."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message}", self.format_usage())

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        # argparse's own swallows OSError: --help into a closed pipe would exit 0.
        if message:
            (file or sys.stderr).write(message)


# -- entry points ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run the command line and exit with its status."""
    out = _buffered_stdout()
    try:
        code = run(argv, out=out)
        out.flush()
    except BrokenPipeError:
        code = _closed_pipe()
    sys.exit(code)


def _buffered_stdout() -> TextIO:
    """stdout through a buffered binary layer of our own.

    Under ``PYTHONUNBUFFERED`` (or ``python -u``) ``sys.stdout`` writes straight to the
    descriptor and drops whatever a short write did not take: when the reader of a pipe
    leaves mid-write (``perdure export ID | head -c 100``), the rest is lost without an
    error and the command would exit 0. A ``BufferedWriter`` writes everything or
    raises, so every command sees the closed pipe and exits 141, however Python runs.
    """
    stdout = sys.stdout
    try:
        fd = stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return stdout  # replaced by something without a descriptor: use it as it is
    raw = io.FileIO(fd, "w", closefd=False)
    errors = stdout.errors or "strict"
    return io.TextIOWrapper(
        io.BufferedWriter(raw),
        encoding=stdout.encoding or "utf-8",
        # A terminal or pipe whose encoding lacks a character (PYTHONIOENCODING=ascii,
        # a Latin-1 locale) gets it escaped rather than a crash halfway through a table;
        # JSON is written ASCII-only there (see _ensure_ascii), so it stays valid.
        errors="backslashreplace" if errors == "strict" else errors,
        line_buffering=raw.isatty(),  # a person at a terminal sees each line at once
    )


def _closed_pipe() -> int:
    # The reader went away (``| head``). Point stdout at /dev/null so that the final
    # flush at interpreter exit cannot raise again, and exit as SIGPIPE would, quietly.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command line; returns the exit status. ``out`` defaults to stdout."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that a usage error can be reported as JSON too.
    wants_json = "--json" in args_list
    out = out if out is not None else sys.stdout
    parser = build_parser()
    try:
        # --help and --version print to sys.stdout: make that ``out``, so that a closed
        # pipe is seen when ``out`` is flushed (exit 141), as for every command.
        with contextlib.redirect_stdout(out):
            args = parser.parse_args(args_list)
    except _UsageError as exc:
        return _report(out, wants_json, str(exc), "usage", 2, usage=exc.usage)
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else 0
    if args.data_dir is not None and not args.data_dir.strip():
        # An unset shell variable (--data-dir "$DIR") must not fall back to
        # $PERDURE_DATA_DIR or ./perdure-data: that would act on another store.
        message = (
            "--data-dir is empty (an unset shell variable?); pass the data dir a Runtime "
            "opened, or leave --data-dir out to use $PERDURE_DATA_DIR"
        )
        return _report(out, wants_json, message, "usage", 2)
    data_dir = args.data_dir or os.environ.get("PERDURE_DATA_DIR") or DEFAULT_DATA_DIR
    ctx = _Ctx(data_dir, os.path.abspath(data_dir), bool(args.json), out)
    command: Callable[[_Ctx, argparse.Namespace], Awaitable[int]] = args.handler
    try:
        _check_data_dir(data_dir)
        return anyio.run(command, ctx, args)
    except CliError as exc:
        if os.environ.get("PERDURE_DEBUG") and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)  # e.g. an --agent module that raised
        return _report(out, ctx.json, str(exc), exc.kind, exc.code)
    except (PerdureError, EventDecodeError) as exc:
        return _report(out, ctx.json, str(exc), type(exc).__name__, 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _has_broken_pipe(exc):
            raise BrokenPipeError from None
        if os.environ.get("PERDURE_DEBUG"):
            traceback.print_exc()
        message = (
            f"unexpected {type(exc).__name__}: {exc} (set PERDURE_DEBUG=1 for a traceback, "
            f"and please report it)"
        )
        return _report(out, ctx.json, message, "internal", 1)


def _has_broken_pipe(exc: BaseException) -> bool:
    if isinstance(exc, BrokenPipeError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_has_broken_pipe(e) for e in exc.exceptions)
    return False


def _report(out: TextIO, as_json: bool, message: str, kind: str, code: int, usage: str = "") -> int:
    if as_json:
        _write_json(out, {"error": {"kind": kind, "message": message}})
    else:
        sys.stderr.write(f"{usage}{message if usage else 'perdure: error: ' + message}\n")
    return code


def _write_json(out: TextIO, doc: Any) -> None:
    text = json.dumps(
        to_json_value(doc), ensure_ascii=_ensure_ascii(out), indent=2, allow_nan=False
    )
    out.write(text + "\n")


def _ensure_ascii(out: TextIO) -> bool:
    """Whether JSON for ``out`` must escape non-ASCII: its encoding cannot hold all of
    Unicode (an escaped character would no longer be valid JSON)."""
    encoding = getattr(out, "encoding", None)
    if not isinstance(encoding, str):
        return False  # a StringIO: text, no encoding at all
    try:
        return not codecs.lookup(encoding).name.startswith(("utf-", "utf_", "gb18030"))
    except LookupError:
        return True


@dataclass(slots=True)
class _Ctx:
    data_dir: str  # as the user spelled it, for messages
    abs_dir: str
    json: bool
    out: TextIO

    def emit(self, doc: Any) -> None:
        _write_json(self.out, doc)

    def lines(self, lines: Iterable[str]) -> None:
        write = self.out.write
        for line in lines:
            write(line + "\n")


def console_command() -> str:
    """How a person runs ``perdure`` from this interpreter's environment (shell-quoted).

    ``perdure`` when the one on PATH is this environment's own (a virtualenv that is
    activated); else the console script beside ``sys.executable`` (``.venv/bin/perdure``,
    relative to the current directory when it is under it); else ``python -m
    perdure.cli`` with this interpreter. Examples print it, so the command they suggest
    works as printed, with or without the virtualenv activated.
    """
    # Not realpath: a virtualenv's python is a symlink out of the virtualenv.
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    script = os.path.join(bin_dir, "perdure")
    if not (os.path.isfile(script) and os.access(script, os.X_OK)):
        return shlex.join([sys.executable, "-m", "perdure.cli"])
    found = shutil.which("perdure")
    try:
        if found is not None and os.path.samefile(found, script):
            return "perdure"
    except OSError:
        pass
    relative = os.path.relpath(script)
    return shlex.quote(script if relative.startswith("..") else relative)


# -- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``perdure`` argument parser (each subcommand's ``handler`` is its coroutine)."""
    # --data-dir and --json work before or after the command; SUPPRESS keeps a
    # subcommand from overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help="the data dir")
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document (errors too)",
    )

    parser = _Parser(
        prog="perdure",
        description="Inspect, verify and operate a perdure data dir.",
        epilog="The data dir defaults to $PERDURE_DATA_DIR, else ./perdure-data.",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="the data dir (default: $PERDURE_DATA_DIR, else ./perdure-data)",
    )
    parser.add_argument(
        "--json", action="store_true", default=False, help="print one JSON document (errors too)"
    )
    parser.add_argument("--version", action="version", version=f"perdure {perdure.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(
        name: str, handler: Callable[..., Awaitable[int]], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("status", _status, "list executions: agent, status, steps, cost, last update")
    p.add_argument("--status", choices=STATUSES, help="only executions with this status")
    p.add_argument("--agent", help="only executions of this agent")

    p = command("inspect", _inspect, "one execution: prompt, usage, suspension, children")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p = command("steps", _steps, "the step timeline: LLM calls, tool calls, approvals, signals")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p = command("events", _events, "the raw records of an execution")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p = command("export", _export, "the whole history as JSON that round-trips")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    command("health", _health, "full integrity scan; exits 1 naming every fault")

    def signal_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--by", help="who is acting (default: cli:USER@HOST)")
        p.add_argument(
            "--wait",
            type=_seconds,
            metavar="SECONDS",
            help="wait until the owning runtime has taken the signal and the execution "
            "has settled; exit 1 if it has not within SECONDS (or no runtime owns the dir)",
        )

    p = command("approve", _approve, "approve a pending tool call (or override a contract)")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p.add_argument("confirmation_id", metavar="CID", help="the confirmation id (see inspect)")
    p.add_argument(
        "--note",
        help="recorded with the approval (a contract override without one records 'no note given')",
    )
    signal_options(p)

    p = command("reject", _reject, "reject a pending tool call; the model is told why")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p.add_argument("confirmation_id", metavar="CID", help="the confirmation id (see inspect)")
    p.add_argument("--reason", required=True, help="returned to the model as the call's result")
    signal_options(p)

    p = command("signal", _signal, "send a named signal with an optional JSON payload")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p.add_argument("name", metavar="NAME")
    p.add_argument("payload", metavar="JSON", nargs="?", help="the payload, as JSON")
    signal_options(p)

    p = command("resume", _resume, "raise the budget, accept drift, or retry a failed execution")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p.add_argument("--max-dollars", type=float, metavar="N")
    p.add_argument("--max-llm-calls", type=int, metavar="N")
    p.add_argument("--max-tool-calls", type=int, metavar="N")
    p.add_argument("--max-tokens", type=int, metavar="N")
    p.add_argument(
        "--accept-drift", action="store_true", help="make the current agent definition its baseline"
    )
    signal_options(p)

    p = command("resolve", _resolve, "decide an in-doubt (unknown_outcome) tool call")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--retry", action="store_true", help="run it again, same idempotency key")
    how.add_argument("--complete", metavar="JSON", help="record this result as its outcome")
    how.add_argument(
        "--fail", nargs="?", const="", metavar="REASON", help="record a failure (told the model)"
    )
    signal_options(p)

    p = command("cancel", _cancel, "cancel an execution for good")
    p.add_argument("execution_id", metavar="ID", help="the execution id")
    p.add_argument("--reason", default="", help="recorded with the cancellation")
    signal_options(p)

    p = command(
        "purge",
        _purge,
        "delete finished executions (whole delegation trees) last updated before a cutoff",
    )
    p.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="how long ago their last update was at least: 30d, 12h, 90m, 3600s, 2w",
    )
    p.add_argument(
        "--status",
        action="append",
        choices=FINISHED,
        help="only trees whose root has this status (repeatable; default: all three)",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")

    p = command(
        "replay",
        _replay,
        "replay recorded executions against the current agent code; exit 1 on drift",
    )
    p.add_argument(
        "--agent",
        action="append",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="an Agent, or an iterable of Agents, to replay against (repeatable)",
    )
    p.add_argument("execution_ids", metavar="ID", nargs="*", help="default: all of those agents")
    return parser


def _seconds(text: str) -> float:
    """A ``--wait`` value: seconds, zero or more (``inf``: until it settles)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the seconds to wait, 0 or more (inf waits until it settles)"
        )
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """A ``--older-than`` value: a number and a unit (s, m, h, d, w), in seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; give a number and a unit: 30d, 12h, 90m, 3600s "
            f"or 2w (0s: every finished execution)"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# -- shared pieces --------------------------------------------------------------------------


@asynccontextmanager
async def _open(ctx: _Ctx) -> AsyncIterator[LmdbLog]:
    """The data dir's log, opened as a client (never the owner lock; signals only)."""
    try:
        log = await LmdbLog.open(ctx.data_dir, types=record_types(), client=True)
    except LogError as exc:
        text = str(exc)
        if "holds no perdure log" not in text and "MDB_INVALID" not in text:
            raise
        raise CliError(
            f"{text}; is it the data dir a Runtime opened? pass --data-dir DIR or set "
            f"PERDURE_DATA_DIR",
            "no_data_dir",
        ) from None
    try:
        yield log
    finally:
        await log.aclose()


def _check_data_dir(path: str) -> None:
    """A clear error for a data dir that is missing or holds no log (before opening)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(
            f"data dir {path!r} is not a directory; pass --data-dir DIR (the directory a "
            f"Runtime opened) or set PERDURE_DATA_DIR",
            "no_data_dir",
        )
    if not os.path.isdir(path):
        raise CliError(
            f"data dir {path!r} does not exist; pass --data-dir DIR or set "
            f"PERDURE_DATA_DIR (default {DEFAULT_DATA_DIR})",
            "no_data_dir",
        )
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise CliError(
            f"data dir {path!r} holds no perdure log (no data.mdb); is it the right dir?",
            "no_data_dir",
        )


async def _find(log: LmdbLog, ctx: _Ctx, execution_id: str) -> StreamInfo:
    try:
        info = await log.stream_info(execution_stream(execution_id))
    except LogError:
        info = None  # a name the log cannot even hold is no execution either
    if info is None:
        raise CliError(
            f"no execution {execution_id!r} in {ctx.data_dir}; see 'perdure status'", "not_found"
        )
    return info


async def _history(log: LmdbLog, info: StreamInfo) -> list[tuple[Record, Event]]:
    """Every record of the stream up to the index entry's last seq, with its event."""
    out: list[tuple[Record, Event]] = []
    async for record in log.read(info.stream):
        if record.seq > info.last_seq:
            break  # appended after we read the index entry: keep the snapshot consistent
        out.append((record, decode(record)))
    return out


def _fold(info: StreamInfo, history: Iterable[tuple[Record, Event]]) -> ExecutionState:
    state = ExecutionState()
    for record, event in history:
        try:
            apply(state, event)
        except Exception as exc:
            raise CliError(
                f"stream {info.stream!r} seq {record.seq}: cannot apply {record.type!r} "
                f"({exc}); run 'perdure health'",
                "corrupt",
            ) from None
        state.seq = record.seq
    return state


def _eid(info: StreamInfo) -> str:
    return info.stream[len(_PREFIX) :]


def _operator() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name in the environment or the password database
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


class _NotJson(ValueError):
    """A constant Python's json module accepts but JSON does not (NaN, Infinity)."""


def _refuse_constant(name: str) -> NoReturn:
    raise _NotJson(f"{name} is not a JSON value (JSON has no NaN or Infinity)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999
        raise _NotJson(f"{literal} is too large for a float (it would be Infinity)")
    return value


#: How deeply a JSON value from the command line may nest. The log's CBOR decoder reads
#: back at most 400 levels, and a payload is nested further when it is recorded (the
#: signal, then the tool result and the model's messages that carry it): a deeper one
#: would be written and then never read again, by the runtime or by any command.
MAX_JSON_DEPTH = 64


def _parse_json(text: str, what: str) -> Any:
    try:
        # json.loads takes NaN and Infinity by default; JSON has neither, and a payload
        # holding one would be stored as a tagged float no JSON reader expects.
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotJson as exc:
        raise CliError(
            f"{what} is not valid JSON: {exc}: {text[:80]!r}; use null, a finite number, "
            f'or a string such as "NaN"',
            "bad_json",
        ) from None
    except RecursionError:
        value = None  # deeper than Python's own limit: refused below
        depth = sys.getrecursionlimit()
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
            f"{text[:80]!r}; quote it for the shell, e.g. '{{\"key\": 1}}' or '\"text\"'",
            "bad_json",
        ) from None
    else:
        depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise CliError(
            f"{what} nests {'more than ' if value is None else ''}{depth} levels deep, more "
            f"than the {MAX_JSON_DEPTH} a payload may (the log could not read it back): "
            f"{text[:80]!r}; flatten it",
            "bad_json",
        )
    return value


def _depth(value: Any) -> int:
    """How many arrays and objects deep ``value`` nests (a scalar: 0), without recursing."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in children)
    return deepest


def _owner_text(ctx: _Ctx, owner: int | None) -> str:
    if owner is None:
        return f"data dir {ctx.data_dir}: no runtime owns it"
    return f"data dir {ctx.data_dir}: owned by runtime pid {owner}"


# -- status ---------------------------------------------------------------------------------


async def _status(ctx: _Ctx, args: argparse.Namespace) -> int:
    async with _open(ctx) as log:
        where: dict[str, Any] = {"kind": "execution"}
        if args.status:
            where["status"] = args.status
        if args.agent:
            where["agent"] = args.agent
        infos = [info async for info in log.streams(prefix=_PREFIX, where=where)]
        pending = await pending_signals(log)
        owner = owner_pid(ctx.data_dir)
        agents = await registered_agents(log, owner)
    infos.sort(key=lambda i: (i.created_at, i.stream))
    rows = []
    for info in infos:
        eid = _eid(info)
        item = ExecutionInfo.from_index(eid, info.meta, info.created_at, info.updated_at).to_dict()
        n = len(pending.get(eid, ()))
        item["status_text"] = describe(info.meta, owned=owner is not None, pending=n, agents=agents)
        item["pending_signals"] = n
        rows.append(item)
    if ctx.json:
        ctx.emit(
            {
                "data_dir": ctx.abs_dir,
                "owner_pid": owner,
                "owner": None
                if owner is None
                else {"pid": owner, **({} if agents is None else {"agents": sorted(agents)})},
                "filters": {"status": args.status, "agent": args.agent},
                "executions": rows,
            }
        )
        return 0
    lines = [_owner_text(ctx, owner)]
    if not rows:
        filters = " and ".join(
            f"{k} {v!r}" for k, v in (("status", args.status), ("agent", args.agent)) if v
        )
        lines.append(f"no executions{' with ' + filters if filters else ''}")
        ctx.lines(lines)
        return 0
    lines += table(
        ("EXECUTION", "AGENT", "STATUS", "STEPS", "TOKENS", "COST", "UPDATED"),
        (
            (
                r["execution_id"],
                r["agent"],
                r["status_text"],
                str(r["steps"]),
                str(r["tokens"]),
                fmt_dollars(r["dollars"]),
                fmt_time(r["updated_at"]),
            )
            for r in rows
        ),
        right=(3, 4, 5),
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines.append(f"{len(rows)} execution{'s' if len(rows) != 1 else ''}: {summary}")
    ctx.lines(lines)
    return 0


# -- purge ----------------------------------------------------------------------------------


async def _purge(ctx: _Ctx, args: argparse.Namespace) -> int:
    statuses = frozenset(args.status or FINISHED)
    now = time.time()
    cut = cutoff(args.older_than, now)
    try:
        # Deleting is the owner's alone: with the owner lock held, no runtime can be
        # running an execution (or starting an actor) while its streams go.
        log = await LmdbLog.open(ctx.data_dir, types=record_types())
    except DataDirLockedError as exc:
        owner = f"runtime pid {exc.pid}" if exc.pid is not None else "another process"
        raise CliError(
            f"data dir {ctx.data_dir!r} is owned by {owner}; only the owner may delete "
            f"executions: call rt.purge(...) in that service (it skips the executions it "
            f"is running), or stop it first and run 'perdure purge' again",
            "owned",
        ) from None
    async with log:
        trees = await eligible_trees(log, cut, statuses)
        pending = await pending_signals(log)
        # A signal waiting in the inbox for a tree is delivered at the next start: the
        # tree is kept for it (deleted, its id reused, the signal would reach the new one).
        held = [t for t in trees if not pending.keys().isdisjoint(t.members)]
        trees = [t for t in trees if pending.keys().isdisjoint(t.members)]
        rows = []
        for tree in trees:
            for eid in tree.members:
                info = await log.stream_info(execution_stream(eid))
                assert info is not None  # we own the dir: nothing else deletes
                item = ExecutionInfo.from_index(eid, info.meta, info.created_at, info.updated_at)
                rows.append({**item.to_dict(), "root": tree.root})
        if not args.dry_run:
            deleted = 0
            for batch in batches(trees):
                try:
                    await log.delete_streams([execution_stream(eid) for eid in batch])
                except LogError as exc:
                    if not deleted:
                        raise
                    # What was deleted is gone: say so, or the operator would think
                    # the purge did nothing.
                    raise CliError(
                        f"purged {_n(deleted, 'execution')}, then deleting the next "
                        f"{len(batch)} failed ({exc}); those are intact (each delete is "
                        f"atomic): fix the cause and run 'perdure purge' again to delete "
                        f"the rest",
                        "partial_purge",
                    ) from exc
                deleted += len(batch)
    kept = [{"execution_id": t.root, "why": "signals for it wait in the inbox"} for t in held]
    if ctx.json:
        ctx.emit(
            {
                "data_dir": ctx.abs_dir,
                "dry_run": bool(args.dry_run),
                "older_than_seconds": args.older_than,
                "cutoff": cut,
                "statuses": sorted(statuses),
                "purged": rows,
                "kept": kept,
            }
        )
        return 0
    verb = "would purge" if args.dry_run else "purged"
    lines: list[str] = []
    if rows:
        lines += table(
            ("EXECUTION", "AGENT", "STATUS", "TREE", "UPDATED"),
            (
                (r["execution_id"], r["agent"], r["status"], r["root"], fmt_time(r["updated_at"]))
                for r in rows
            ),
        )
    lines += [f"kept {k['execution_id']}: {k['why']}" for k in kept]
    if not rows:
        lines.append(
            f"nothing to purge: no finished execution tree was last updated before {fmt_time(cut)}"
        )
        ctx.lines(lines)
        return 0
    lines.append(
        f"{verb} {_n(len(rows), 'execution')} in {_n(len(trees), 'tree')}, finished and last "
        f"updated before {fmt_time(cut)}"
        + ("; run again without --dry-run to delete them" if args.dry_run and rows else "")
    )
    ctx.lines(lines)
    return 0


# -- inspect --------------------------------------------------------------------------------


async def _inspect(ctx: _Ctx, args: argparse.Namespace) -> int:
    eid = args.execution_id
    async with _open(ctx) as log:
        info = await _find(log, ctx, eid)
        history = await _history(log, info)
        children = [
            child
            async for child in log.streams(prefix=f"{_PREFIX}{eid[:200]}")
            if child.meta.get("parent") == eid
        ]
        all_pending = await pending_signals(log)
        pending = all_pending.get(eid, [])
        state = _fold(info, history)
        owner = owner_pid(ctx.data_dir)
        owned = owner is not None
        agents = await registered_agents(log, owner)
        # A child's own suspension (an approval, say) shows from the parent's side.
        waiting_on = []
        for child_id in _child_blockers(state.suspend_reason):
            child = await log.stream_info(execution_stream(child_id))
            cmeta = child.meta if child is not None else {}
            waiting_on.append(
                {
                    "execution_id": child_id,
                    "agent": cmeta.get("agent"),
                    "status": cmeta.get("status"),
                    "status_text": describe(
                        cmeta,
                        owned=owned,
                        pending=len(all_pending.get(child_id, ())),
                        agents=agents,
                    )
                    if child is not None
                    else "not started yet",
                    "reason": cmeta.get("reason"),
                    "confirmations": list(cmeta.get("confirmations") or ()),
                }
            )
            deepest = await blocked_descendant(log, cmeta) if child is not None else None
            if deepest is not None:
                # A grandchild's approval holds up the chain: say whom to decide.
                did, dmeta = deepest
                text = describe(dmeta, owned=owned, pending=len(all_pending.get(did, ())))
                waiting_on[-1]["status_text"] += f"; waits for {did}: {text}"
                waiting_on[-1]["blocked_at"] = {
                    "execution_id": did,
                    "status": dmeta.get("status"),
                    "status_text": text,
                    "reason": dmeta.get("reason"),
                    "confirmations": list(dmeta.get("confirmations") or ()),
                }
    meta = info.meta
    status = str(meta.get("status"))
    last_fingerprint = None
    for record, event in history:
        if record.type == "llm.completed":
            last_fingerprint = getattr(event, "fingerprint", None)
    open_calls = [
        {
            "step": c.step,
            "tool": c.tool,
            "status": c.status,
            "arguments": c.arguments,
            "key": c.key,
            "attempts": c.attempts,
            "idempotent": c.idempotent,
            "confirmation_id": c.confirmation_id,
            "waiting": c.waiting,
        }
        for c in state.calls
        if c.status != "done"
    ]
    doc = {
        "execution_id": eid,
        "agent": state.agent or meta.get("agent"),
        "status": status,
        "status_text": describe(meta, owned=owned, pending=len(pending), agents=agents),
        "reason": meta.get("reason"),
        "confirmations": list(meta.get("confirmations") or ()),
        # When its earliest timer fires (it sleeps in perdure.sleep), else None.
        "wakes_at": (meta.get("timer") or (None,))[0],
        # When its execution timeout cancels it, if it has one (kept once it finished).
        "deadline": state.deadline,
        "owner_pid": owner,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "records": info.last_seq,
        "prompt": state.prompt,
        "run_id": state.run_id,
        "metadata": state.metadata,
        "parent": state.parent,
        "output": state.output,
        "error": state.error,
        "failure_kind": state.failure_kind,
        "cancel_reason": state.cancel_reason,
        "cancelled_by": state.cancelled_by,
        "steps": state.step,
        "max_steps": state.max_steps,
        "usage": state.usage.to_dict(),
        "delegated_usage": state.delegated.to_dict() if state.delegated else None,
        "budget": state.budget.to_dict() if state.budget else None,
        "inherited_budget": state.inherited.to_dict() if state.inherited else None,
        "limits": state.limits.to_dict() if state.limits else None,
        "definition": state.definition,
        "request_fingerprint": last_fingerprint,
        "suspension": state.suspend_reason,
        "waiting_on": waiting_on,
        "open_calls": open_calls,
        "drift": state.drift,
        "children": [
            {
                "execution_id": _eid(c),
                "agent": c.meta.get("agent"),
                "status": c.meta.get("status"),
                "status_text": describe(c.meta, owned=owned, agents=agents),
                "steps": c.meta.get("steps", 0),
                "dollars": c.meta.get("dollars", 0.0),
            }
            for c in children
        ],
        "pending_signals": [p.to_dict() for p in pending],
        "next_steps": next_steps(eid, status, state.suspend_reason),
    }
    in_doubt = [c for c in open_calls if c["status"] == "started" and not c["idempotent"]]
    if in_doubt and status in ("running", "queued") and not owned:
        # Not suspended yet (that happens when a runtime next opens the dir), but the
        # operator may decide the call now; the decision waits in the inbox.
        doc["next_steps"] = [
            f"step {in_doubt[0]['step']} ({in_doubt[0]['tool']}) is in doubt; decide it now: "
            f"perdure resolve {eid} --retry | --complete JSON | --fail [REASON]"
        ]
    if pending:
        doc["next_steps"] = _after_pending(doc["next_steps"], pending, owner)
    if ctx.json:
        ctx.emit(doc)
    else:
        ctx.lines(_inspect_lines(doc))
    return 0


def _after_pending(
    steps: list[str], pending: Sequence[PendingSignal], owner: int | None
) -> list[str]:
    """The next steps once the signals waiting in the inbox are counted: a confirmation
    with a decision waiting, a named signal already sent, or anything after a waiting
    cancel, needs nothing more (the signal commands would refuse or duplicate it)."""
    when = (
        f"runtime pid {owner} delivers it"
        if owner is not None
        else "delivered when a runtime next opens the dir"
    )
    kinds = [canonical_name(p.name) for p in pending]
    if "cancel" in kinds:
        return [f"a cancel waits in the inbox ({when}); nothing more to decide"]
    decided = {
        str(p.payload.get("confirmation_id"))
        for p, k in zip(pending, kinds, strict=True)
        if k in ("approve", "reject") and isinstance(p.payload, Mapping)
    }
    kept = [s for s in steps if not any(f" {cid} " in f"{s} " for cid in decided)]
    # A named signal a tool waits for, already waiting in the inbox: sending it again
    # would only queue a second one behind it.
    sent = {shlex.quote(p.name) for p, k in zip(pending, kinds, strict=True) if k not in BUILTIN}
    kept = [s for s in kept if not (s.startswith("send it: ") and s.split(" ")[-2] in sent)]
    waiting = ", ".join(f"{p.name} (inbox seq {p.seq})" for p in pending)
    return [f"waiting in the inbox: {clip(waiting, 200)} ({when})", *kept]


def _inspect_lines(d: Mapping[str, Any]) -> list[str]:
    usage = d["usage"]
    pairs = [
        ("execution", d["execution_id"]),
        ("agent", str(d["agent"])),
        ("status", d["status_text"]),
        ("created", fmt_time(d["created_at"])),
        ("updated", fmt_time(d["updated_at"])),
    ]
    if d["wakes_at"] is not None:
        pairs.append(("wakes", f"{fmt_time(d['wakes_at'])} (timer)"))
    if d["deadline"] is not None:
        pairs.append(("deadline", f"{fmt_time(d['deadline'])} (execution timeout)"))
    if d["parent"]:
        parent = d["parent"]
        pairs.append(("parent", f"{parent.get('execution_id')} (step {parent.get('step')})"))
    pairs.append(("prompt", fmt_json(d["prompt"])))
    if d["output"] is not None:
        pairs.append(("output", fmt_json(d["output"])))
    if d["error"]:
        err = d["error"]
        message = clip(f"{err.get('type')}: {err.get('message')}", None)
        pairs.append(("error", f"{d['failure_kind']}: {message}"))
    if d["cancel_reason"] is not None:
        why = clip(d["cancel_reason"], None) or "(no reason given)"
        by = clip(d["cancelled_by"], None) or "unknown"
        pairs.append(("cancelled", f"{why} (by {by})"))
    steps = f"{d['steps']} (max {d['max_steps']} LLM calls), {d['records']} records"
    pairs.append(("steps", steps))
    pairs.append(
        (
            "usage",
            f"{_n(usage['llm_calls'], 'LLM call')}, {_n(usage['tool_calls'], 'tool call')}, "
            f"{usage['total_tokens']} tokens ({usage['input_tokens']} in, "
            f"{usage['output_tokens']} out), {fmt_dollars(usage['dollars'])}",
        )
    )
    for model, u in usage.get("by_model", {}).items():
        pairs.append(
            (
                "",
                f"{model}: {_n(int(u['calls']), 'call')}, {u['tokens']:g} tokens, "
                f"{fmt_dollars(u['dollars'])}",
            )
        )
    delegated = d.get("delegated_usage")
    if delegated:
        # Apart from "usage" (its own): each dollar shows once in 'perdure status'.
        pairs.append(
            (
                "delegated",
                f"{_n(delegated['llm_calls'], 'LLM call')}, "
                f"{_n(delegated['tool_calls'], 'tool call')}, {delegated['total_tokens']} "
                f"tokens, {fmt_dollars(delegated['dollars'])} by its finished children "
                f"(counted toward its budget)",
            )
        )
    budget = d["budget"]
    pairs.append(
        ("budget", ", ".join(f"{k} {v:g}" for k, v in budget.items()) if budget else "none")
    )
    inherited = d.get("inherited_budget")
    if inherited:
        parent = (d["parent"] or {}).get("execution_id")
        pairs.append(
            (
                "inherited",
                ", ".join(f"{k} {v:g}" for k, v in inherited.items())
                + f" (what {parent} had left; the tighter limit applies)",
            )
        )
    if d["metadata"]:
        pairs.append(("metadata", fmt_json(d["metadata"])))
    lines = key_values(pairs)

    definition = d["definition"] or {}
    lines.append("fingerprints (at start, or at the last accepted drift)")
    fp = [
        (
            "instructions",
            f"{definition.get('instructions')}  "
            f"{fmt_json(definition.get('instructions_text'), 80)}",
        ),
        ("model", str(definition.get("model"))),
        ("params", str(definition.get("params"))),
    ]
    for name, t in (definition.get("tools") or {}).items():
        fp.append(
            (
                f"tool {name}",
                f"description {t.get('description')}, schema {t.get('schema')}, "
                f"code {t.get('code')}",
            )
        )
    if d["request_fingerprint"]:
        fp.append(("last LLM request", str(d["request_fingerprint"])))
    lines += key_values(fp, indent="  ")

    reason = d["suspension"]
    if reason:
        lines.append("suspension")
        children = {c["execution_id"]: c for c in d["waiting_on"]}
        for b in reason.get("pending") or [reason]:
            lines.append("  " + _blocker(b, children.get(b.get("child_id"))))
    if d["open_calls"]:
        lines.append("open tool calls")
        lines += [
            "  " + line
            for line in table(
                ("STEP", "TOOL", "STATE", "ATTEMPTS", "KEY", "ARGUMENTS"),
                (
                    (
                        str(c["step"]),
                        c["tool"],
                        c["status"] + ("" if c["idempotent"] else " (not idempotent)"),
                        str(c["attempts"]),
                        c["key"] or "-",
                        fmt_json(c["arguments"], 80),
                    )
                    for c in d["open_calls"]
                ),
                right=(0, 3),
            )
        ]
    if d["drift"]:
        lines.append("drift")
        for item in d["drift"]:
            changes = "; ".join(render_change(c) for c in item.get("changes") or [])
            lines.append(f"  step {item.get('step')} ({item.get('action')}): {changes}")
    if d["children"]:
        lines.append("children")
        lines += [
            "  " + line
            for line in table(
                ("EXECUTION", "AGENT", "STATUS", "STEPS", "COST"),
                (
                    (
                        c["execution_id"],
                        str(c["agent"]),
                        c["status_text"],
                        str(c["steps"]),
                        fmt_dollars(c["dollars"]),
                    )
                    for c in d["children"]
                ),
                right=(3, 4),
            )
        ]
    if d["pending_signals"]:
        lines.append("pending signals (in the inbox, not yet delivered)")
        for p in d["pending_signals"]:
            lines.append(
                f"  inbox seq {p['inbox_seq']}: {clip(p['name'], 80)} "
                f"{fmt_json(p['payload'], 80)} by {clip(p['by'], 80)} at "
                f"{fmt_time(p['sent_at'])}{_held_note(p)}"
            )
    if d["next_steps"]:
        lines.append("next")
        lines += ["  " + s for s in d["next_steps"]]
    return lines


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _child_blockers(reason: Mapping[str, Any] | None) -> list[str]:
    """The child executions a suspension waits for, in call order."""
    if not reason:
        return []
    blockers = reason.get("pending") or [reason]
    return [str(b["child_id"]) for b in blockers if b.get("kind") == "child" and b.get("child_id")]


def _blocker(b: Mapping[str, Any], child: Mapping[str, Any] | None = None) -> str:
    kind = b.get("kind")
    if kind in ("approval", "contract"):
        args = fmt_json(b.get("arguments"), 100)
        head = f"{kind} {b.get('confirmation_id')}: step {b.get('step')} {b.get('tool')} {args}"
        if kind == "contract":
            why = clip(str(b.get("message")), None)
            return f"{head}; contract {b.get('contract')!r} blocked it: {why}"
        return head
    if kind == "budget":
        text = f"budget: {b.get('limit')} {b.get('limit_value')} reached (used {b.get('used')})"
        if b.get("origin"):
            whose = (
                f"its parent {b.get('parent')}"
                if b.get("origin") == b.get("parent")
                else f"{b.get('origin')} (through its parent {b.get('parent')})"
            )
            text += f"; the limit is what was left of the budget of {whose}"
        return text
    if kind == "unknown_outcome":
        return (
            f"unknown_outcome: step {b.get('step')} {b.get('tool')} "
            f"{fmt_json(b.get('arguments'), 80)} started {b.get('attempts')} time(s) but never "
            f"finished; key {b.get('key')}; the tool is not idempotent"
        )
    if kind == "drift":
        return f"drift: {clip(str(b.get('message')), None)}"
    if kind == "signal":
        text = f"signal: step {b.get('step')} {b.get('tool')} waits for signal {b.get('name')!r}"
        if b.get("timer"):
            text += f", or its timeout at {fmt_time(b.get('until'))} (timer {b.get('timer')!r})"
        return text
    if kind == "timer":
        return (
            f"timer: step {b.get('step')} {b.get('tool')} sleeps until "
            f"{fmt_time(b.get('until'))} (timer {b.get('name')!r})"
        )
    if kind == "child":
        head = f"child: step {b.get('step')} waits for child execution {b.get('child_id')}"
        if child is None:
            return head
        text = f"{head}: {child['status_text']}"
        if child.get("status") == "suspended":
            deepest = (child.get("blocked_at") or {}).get("execution_id") or b.get("child_id")
            text += f"; see 'perdure inspect {deepest}'"
        return text
    return fmt_json(b)


# -- steps, events, export ------------------------------------------------------------------


async def _steps(ctx: _Ctx, args: argparse.Namespace) -> int:
    eid = args.execution_id
    async with _open(ctx) as log:
        info = await _find(log, ctx, eid)
        history = await _history(log, info)
        pending = (await pending_signals(log)).get(eid, [])
        owner = owner_pid(ctx.data_dir)
        agents = await registered_agents(log, owner)
    entries = timeline(history)
    status_text = describe(info.meta, owned=owner is not None, pending=len(pending), agents=agents)
    if ctx.json:
        ctx.emit(
            {
                "execution_id": eid,
                "status": info.meta.get("status"),
                "status_text": status_text,
                "steps": entries,
            }
        )
        return 0
    rows = []
    for e in entries:
        step, kind, detail = render_entry(e)
        rows.append((str(e["seq"]), fmt_clock(e["time"]), step, kind, detail))
    lines = [f"execution {eid}: {status_text}"]
    lines += table(("SEQ", "TIME", "STEP", "KIND", "DETAIL"), rows, right=(0, 2))
    ctx.lines(lines)
    return 0


async def _events(ctx: _Ctx, args: argparse.Namespace) -> int:
    eid = args.execution_id
    async with _open(ctx) as log:
        info = await _find(log, ctx, eid)
        if ctx.json:
            records = [
                record_to_json(r) async for r in log.read(info.stream) if r.seq <= info.last_seq
            ]
            ctx.emit({"execution_id": eid, "stream": info.stream, "records": records})
            return 0
        # Streamed line by line: a long history starts printing at once, and a reader
        # that stops early (``| head``) stops the scan.
        write = ctx.out.write
        async for r in log.read(info.stream):
            if r.seq > info.last_seq:
                break
            write(
                f"{r.seq:>6}  {fmt_time(r.timestamp)}  {r.type} v{r.version}  "
                f"{fmt_json(r.payload)}\n"
            )
    return 0


async def _export(ctx: _Ctx, args: argparse.Namespace) -> int:
    eid = args.execution_id
    async with _open(ctx) as log:
        info = await _find(log, ctx, eid)
        records = [r async for r in log.read(info.stream) if r.seq <= info.last_seq]
    doc = export_document(eid, info, records)
    target = args.output
    if target and target != "-" and not _is_stdout(target, ctx.out):
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False) + "\n"
        await anyio.to_thread.run_sync(_write_export, eid, target, text, ctx.abs_dir)
        if ctx.json:
            ctx.emit({"execution_id": eid, "file": target, "records": len(records)})
        else:
            ctx.lines([f"exported {len(records)} records of execution {eid} to {target}"])
        return 0
    # stdout, spelled "-" or as a path to it (-o /dev/stdout): only the document goes
    # there, so that it stays one JSON document for the reader.
    ctx.out.write(json.dumps(doc, ensure_ascii=_ensure_ascii(ctx.out), allow_nan=False) + "\n")
    return 0


def _is_stdout(target: str, out: TextIO) -> bool:
    """Whether ``target`` is the file ``out`` already writes to (``-o /dev/stdout``)."""
    try:
        return os.path.samestat(os.stat(target), os.fstat(out.fileno()))
    except (OSError, ValueError, AttributeError):  # no such path, or stdout has no fd
        return False


def _write_export(eid: str, target: str, text: str, data_dir: str) -> None:
    """Write an export to ``target`` without ever replacing something that is not a file.

    A regular file (or a new one) is written aside and renamed over, so a reader never
    sees half an export; through a symlink, the temporary file goes beside the link's
    real target and is renamed onto that, so the link stays a link. Anything else that
    exists (a terminal, a FIFO, /dev/null, /dev/full) is written into as it is: renaming
    over it would replace the device node or the FIFO with a JSON file. Nothing in the
    data dir is written: ``-o DIR/data.mdb`` would replace the whole log with one export.
    """

    def fail(why: str, kind: str = "error", code: int = 1) -> NoReturn:
        raise CliError(f"cannot write the export of {eid!r} to {target!r}: {why}", kind, code)

    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None  # a new file (or a dangling link: its target is created)
    except OSError as exc:
        fail(_os_error(exc))
    name = eid.replace("/", "_")  # a child's id holds a slash: no subdirectory
    if st is not None and stat.S_ISDIR(st.st_mode):
        fail(
            f"it is a directory; give a file name, e.g. -o {os.path.join(target, name)}.json",
            "usage",
            2,
        )
    if st is not None and stat.S_ISBLK(st.st_mode):
        fail("it is a block device (a disk); give a file name", "usage", 2)
    real = os.path.realpath(target)
    store = os.path.realpath(data_dir)
    if os.path.commonpath([real, store]) == store or _is_store_file(st, store):
        fail(
            f"it is inside the data dir {data_dir!r}, next to (or onto) the log itself; "
            f"write the export somewhere else, e.g. -o {name}.json",
            "usage",
            2,
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_into(target, text, fail)
        return
    try:
        same = st is None or os.path.samestat(st, os.stat(real))
    except OSError:
        same = False
    if not same:
        # A link the kernel follows but a path cannot name (/proc/self/fd/N, say):
        # nothing to rename onto, so write into the file itself.
        _write_into(target, text, fail)
        return
    directory, name = os.path.split(real)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 less the umask, as a new file would get; an existing file keeps its mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        fail(f"cannot create a file in {directory!r} ({_os_error(exc)})")
    try:
        try:
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if st is not None:
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.replace(tmp, real)
        except OSError as exc:
            fail(_os_error(exc))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_store_file(st: os.stat_result | None, store: str) -> bool:
    """Whether ``st`` is one of the data dir's own files (reached by another path)."""
    if st is None:
        return False
    for name in ("data.mdb", "lock.mdb", "owner.lock"):
        try:
            if os.path.samestat(st, os.stat(os.path.join(store, name))):
                return True
        except OSError:
            continue
    return False


def _write_into(target: str, text: str, fail: Callable[[str], NoReturn]) -> None:
    try:
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        fail(_os_error(exc))


def _os_error(exc: OSError) -> str:
    """The error without the file name (the caller names the path the user gave)."""
    if exc.errno is not None and exc.strerror:
        return f"{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return str(exc)


# -- health ---------------------------------------------------------------------------------


async def _health(ctx: _Ctx, args: argparse.Namespace) -> int:
    async with _open(ctx) as log:
        faults = list(await log.check())
        stats = dict(await log.stats())
        faulty = {f.stream for f in faults if f.stream is not None}
        faults += await _check_histories(log, faulty)
    owner = owner_pid(ctx.data_dir)
    try:
        disk_free: int | None = shutil.disk_usage(ctx.data_dir).free
    except OSError:
        disk_free = None
    doc = {
        "ok": not faults,
        "data_dir": ctx.abs_dir,
        "owner_pid": owner,
        "checked": [
            "record checksums and decoding",
            "seq gaps",
            "index vs streams",
            "secondary index",
            "every execution's records fold, and its status matches the index",
        ],
        "stats": stats,
        "disk_free_bytes": disk_free,
        "faults": [
            {"stream": f.stream, "seq": f.seq, "kind": f.kind, "detail": f.detail} for f in faults
        ],
    }
    if ctx.json:
        ctx.emit(doc)
        return 0 if not faults else 1
    pairs = [
        ("data dir", doc["data_dir"]),
        ("owner", f"runtime pid {owner}" if owner is not None else "none"),
        ("streams", str(stats.get("streams"))),
        ("records", str(stats.get("records"))),
        (
            "map",
            f"{fmt_bytes(stats['map_used_bytes'])} used of {fmt_bytes(stats['map_size'])} "
            f"({stats['map_used_fraction']:.1%}; it grows by itself), file "
            f"{fmt_bytes(stats['file_bytes'])}",
        ),
    ]
    if disk_free is not None:
        pairs.append(("disk free", fmt_bytes(disk_free)))
    pairs.append(("checked", "; ".join(doc["checked"])))
    lines = key_values(pairs)
    if not faults:
        lines.append(f"healthy: no faults in {stats.get('records')} records")
    else:
        lines += [f"FAULT {f}" for f in faults]
        lines.append(
            f"{len(faults)} fault{'s' if len(faults) != 1 else ''} found: restore the data dir "
            f"from a backup, or export what still reads ('perdure export ID') before repairing"
        )
    ctx.lines(lines)
    return 0 if not faults else 1


async def _check_histories(log: LmdbLog, skip: set[str]) -> list[Fault]:
    """Fold every execution's records and compare the result with its index entry.

    The log's own check covers bytes (checksums, gaps, index entries); this covers
    meaning: a record that does not fit its event class, a history that cannot be
    folded, or an index status that the records do not bear out.
    """
    faults: list[Fault] = []
    async for info in log.streams(prefix=_PREFIX):
        if info.stream in skip:
            continue
        state = ExecutionState()
        seq = 0
        try:
            async for record in log.read(info.stream):
                if record.seq > info.last_seq:
                    break
                seq = record.seq
                apply(state, decode(record))
        except LogError as exc:
            faults.append(Fault(info.stream, getattr(exc, "seq", seq + 1), "decode", str(exc)))
            continue
        except Exception as exc:
            faults.append(Fault(info.stream, seq, "history", f"{type(exc).__name__}: {exc}"))
            continue
        now = await log.stream_info(info.stream)
        if now is None or now.last_seq != info.last_seq:
            continue  # a live owner appended meanwhile; the snapshot we compared is gone
        want = index_meta(state)
        got = info.meta
        status = got.get("status")
        # "queued" is an admission state the runtime keeps in the index only.
        status = "running" if status == "queued" else status
        if status != want["status"] or got.get("agent") != want["agent"]:
            faults.append(
                Fault(
                    info.stream,
                    info.last_seq,
                    "status",
                    f"the index says {got.get('status')!r} (agent {got.get('agent')!r}) but the "
                    f"records say {want['status']!r} (agent {want['agent']!r})",
                )
            )
    if INBOX_STREAM not in skip:
        try:
            await _check_inbox(log, faults)
        except LogError as exc:
            faults.append(Fault(INBOX_STREAM, getattr(exc, "seq", None), "decode", str(exc)))
        except EventDecodeError as exc:
            faults.append(Fault(INBOX_STREAM, None, "decode", str(exc)))
    return faults


async def _check_inbox(log: LmdbLog, faults: list[Fault]) -> None:
    """Every record the inbox keeps must be a signal.

    The owner trims delivered signals from the inbox's front, so the scan starts at its
    first kept seq, and moves on past records a running owner trims during the scan.
    """
    info = await log.stream_info(INBOX_STREAM)
    after = info.first_seq - 1 if info is not None else 0
    while True:
        try:
            async for record in log.read(INBOX_STREAM, after=after):
                after = record.seq
                if not isinstance(decode(record), SignalSent):
                    faults.append(
                        Fault(INBOX_STREAM, record.seq, "history", f"a {record.type!r} record")
                    )
            return
        except TrimmedError as exc:
            after = exc.first_seq - 1


# -- signals --------------------------------------------------------------------------------


async def _send(
    ctx: _Ctx,
    args: argparse.Namespace,
    signals: Sequence[tuple[str, Any]]
    | Callable[[LmdbLog, StreamInfo], Awaitable[Sequence[tuple[str, Any]]]],
) -> int:
    """Check each signal against the index entry and the signals already waiting in the
    inbox, then append them all to the inbox."""
    eid = args.execution_id
    by = args.by or _operator()
    async with _open(ctx) as log:
        info = await _find(log, ctx, eid)
        meta = info.meta
        todo = await signals(log, info) if callable(signals) else signals
        for name, payload in todo:
            data = payload if isinstance(payload, Mapping) else {}
            problem = precheck(
                eid,
                str(meta.get("status")),
                list(meta.get("confirmations") or ()),
                name,
                data,
                usage=meta,
            )
            if problem is not None:
                if canonical_name(name) in ("approve", "reject"):
                    problem = await _decided(log, info, canonical_name(name), data, problem)
                raise CliError(problem, "invalid_signal")
            if canonical_name(name) == "resume":
                problem = await resume_problem(log, eid, meta)
                if problem is not None:
                    raise CliError(problem, "invalid_signal")
        if any(canonical_name(name) == "resolve" for name, _ in todo):
            # Also when sent as 'perdure signal ID resolve JSON': the index cannot tell.
            problem = in_doubt_problem(eid, _fold(info, await _history(log, info)))
            if problem is not None:
                raise CliError(problem, "invalid_signal")
        # Delivery takes one decision per confirmation (one cancel, one resolve...) and
        # turns the rest down; while the first still waits in the inbox the index does
        # not show it yet, so a second one is refused here rather than stored as a no-op.
        waiting = (await pending_signals(log)).get(eid, [])
        todo = _not_yet_sent(eid, todo, waiting, owner_pid(ctx.data_dir), ctx.data_dir)
        # What the signals can do depends on what the execution waits for: the index
        # says why it is suspended; the suspension itself (folded from the records)
        # names the signals its tools wait for.
        reason, waits = None, []
        if meta.get("status") == "suspended" or any(n not in BUILTIN for n, _ in todo):
            state = _fold(info, await _history(log, info))
            reason = state.suspend_reason
            for c in state.calls:
                if c.status != "waiting" or not c.waiting:
                    continue
                if c.waiting.get("kind") not in ("signal", "timer"):
                    continue
                waits.append({"name": c.waiting.get("name"), "step": c.step, "tool": c.tool})
                if c.waiting.get("timer"):  # a timed wait_for_signal: its timer wakes it too
                    waits.append({"name": c.waiting["timer"], "step": c.step, "tool": c.tool})
        resumes, effect, detail = _effect(todo, meta, reason, waits)
        records = [encode(SignalSent(eid, name, payload, by)) for name, payload in todo]
        # One append: the signals of one command arrive together or not at all.
        last = await log.append(INBOX_STREAM, records, expect=ANY)
        first = last - len(records) + 1
        sent = [
            {"name": name, "payload": payload, "inbox_seq": first + i}
            for i, (name, payload) in enumerate(todo)
        ]
        owner = owner_pid(ctx.data_dir)
        settled: bool | None = None
        if args.wait is not None:
            # With no owner nothing will take the signal before a runtime starts.
            settled = False
            if owner is not None:
                info, settled = await _wait_settled(log, eid, last, args.wait)
        pending = (await pending_signals(log)).get(eid, [])
        agents = await registered_agents(log, owner)
    status_text = describe(info.meta, owned=owner is not None, pending=len(pending), agents=agents)
    if ctx.json:
        ctx.emit(
            {
                "execution_id": eid,
                "sent": sent,
                "by": by,
                "owner_pid": owner,
                "settled": settled,
                "status": info.meta.get("status"),
                "status_text": status_text,
                "resumes": resumes,
                "note": detail or None,
            }
        )
    else:
        names = ", ".join(f"{s['name']} (inbox seq {s['inbox_seq']})" for s in sent)
        lines = [f"sent {clip(names, None)} to execution {eid} as {clip(by, None)}"]
        agent = meta.get("agent")
        if owner is None:
            lines.append(
                f"no runtime owns {ctx.data_dir}: the signal is stored and takes effect when a "
                f"runtime with agent {agent!r} registered opens it"
            )
        elif agents is not None and agent not in agents:
            lines.append(
                f"runtime pid {owner} delivers it, but has no agent {agent!r} registered: "
                f"the execution carries on once that runtime registers it (rt.register)"
            )
        elif settled is None:
            lines.append(f"runtime pid {owner} delivers it{effect}")
        if detail and not settled:
            lines.append(detail)
        if settled:
            lines.append(f"runtime pid {owner} took it; the execution has settled")
        lines.append(f"status: {status_text}")
        if settled is False:
            lines.append(
                f"not settled within {args.wait:g}s"
                if owner is not None
                else "not waiting: no runtime is there to take it"
            )
        ctx.lines(lines)
    return 1 if settled is False else 0


async def _decided(
    log: LmdbLog, info: StreamInfo, kind: str, payload: Mapping[str, Any], problem: str
) -> str:
    """Why an approve/reject cannot apply, from the records when they know more than
    the index: the confirmation was decided already, or it is a child execution's."""
    eid, cid = _eid(info), payload.get("confirmation_id")
    if not cid:
        return problem
    for e in reversed(timeline(await _history(log, info))):
        if e["kind"] in ("approved", "rejected") and e.get("confirmation_id") == cid:
            verb = "overridden" if e.get("override") else e["kind"]
            step = f", step {e['step']}" if e.get("step") else ""
            status = str(info.meta.get("status"))
            now = f"; the execution is {status}" if status in TERMINAL else ""
            by = decider(e.get("by"), lambda by: clip(str(by), 80))
            return (
                f"confirmation {cid!r} of execution {eid!r} was already {verb} by {by} "
                f"(seq {e['seq']}{step}){now}; a confirmation is decided once, so nothing "
                f"was sent; see 'perdure steps {eid}'"
            )
    chain = await confirmation_owner(log, eid, cid)
    if chain is None:
        return problem
    owner = chain[-1]
    where = owner_phrase(eid, chain)
    rest = "[--note TEXT]" if kind == "approve" else "--reason WHY"
    return (
        f"confirmation {cid!r} belongs to {where}; decide it there: perdure {kind} "
        f"{shlex.quote(owner)} {cid} {rest}; nothing was sent"
    )


#: Signals that deliver once: a second one, sent while the first waits in the inbox, is
#: turned down on delivery (approve and reject are matched by confirmation id).
_ONCE = ("resolve", "resume", "accept_drift")


def _not_yet_sent(
    eid: str,
    todo: Sequence[tuple[str, Any]],
    waiting: Sequence[PendingSignal],
    owner: int | None,
    data_dir: str,
) -> list[tuple[str, Any]]:
    """``todo`` less what a signal already waiting in the inbox does; raises if that
    leaves nothing to send, or if a signal would contradict one that waits.

    A ``resume`` or ``accept_drift`` already waiting is simply not sent again (so
    ``resume ID --max-llm-calls N`` still sends the budget); a second decision on a
    confirmation, a second resolve and anything after a cancel are refused, naming the
    signal that waits.
    """
    out = list(todo)
    if not waiting:
        return out
    when = (
        f"runtime pid {owner} has not delivered it yet"
        if owner is not None
        else f"no runtime owns {data_dir}: it is delivered at the next start"
    )

    def which(p: PendingSignal) -> str:
        return f"{p.name} by {clip(p.by, 80)} (inbox seq {p.seq}{_held_note(p.to_dict())})"

    def refuse(what: str) -> NoReturn:
        raise CliError(
            f"execution {eid!r}: {what}; {when}. Nothing was sent; see 'perdure inspect {eid}'",
            "already_sent",
        )

    kinds = [(canonical_name(p.name), p) for p in waiting]
    cancel = next((p for k, p in kinds if k == "cancel"), None)
    if cancel is not None:
        refuse(f"a cancel waits in the inbox, {which(cancel)}, and then it takes no more signals")
    for name, payload in todo:
        kind = canonical_name(name)
        data = payload if isinstance(payload, Mapping) else {}
        for k, p in kinds:
            theirs = p.payload if isinstance(p.payload, Mapping) else {}
            if kind in ("approve", "reject") and k in ("approve", "reject"):
                cid = data.get("confirmation_id")
                if cid is not None and theirs.get("confirmation_id") == cid:
                    refuse(
                        f"confirmation {cid!r} already has a decision waiting in the inbox, "
                        f"{which(p)}; a confirmation is decided once"
                    )
            elif kind == "resolve" and k == "resolve":
                refuse(
                    f"a decision on the in-doubt call already waits in the inbox, {which(p)} "
                    f"({theirs.get('action')})"
                )
            elif kind in _ONCE and k == kind and (name, payload) in out:
                out.remove((name, payload))
    if not out:
        asked = {canonical_name(name) for name, _ in todo}
        same = next(p for k, p in kinds if k in asked)
        refuse(f"{which(same)} already waits in the inbox and does the same")
    return out


def _effect(
    todo: Sequence[tuple[str, Any]],
    meta: Mapping[str, Any],
    reason: Mapping[str, Any] | None,
    waits: Sequence[Mapping[str, Any]],
) -> tuple[bool, str, str]:
    """What delivering these signals does, as far as the index and the records show.

    ``reason`` is the suspension (if suspended), ``waits`` the tool calls waiting in
    ``wait_for_signal`` (name, step, tool). Returns whether it resumes the execution,
    the end of "runtime pid N delivers it...", and a line of detail (or ""). Only a
    signal that can unblock the execution is said to resume it: a named signal no tool
    waits for is kept for a tool that waits for it later.
    """
    status = meta.get("status")
    kinds = [canonical_name(name) for name, _ in todo]
    if "cancel" in kinds:
        return False, " and cancels the execution", ""
    blockers = list((reason.get("pending") or [reason]) if reason else [])
    waiting = ", ".join(_blocker_name(b) for b in blockers) or str(meta.get("reason"))
    user = [name for name, _ in todo if name not in BUILTIN]
    if user:
        name = user[0]
        later = f"{name!r} is stored for a tool that calls wait_for_signal({name!r}) later"
        matched = [b for b in waits if b.get("name") == name]
        if matched:
            rest = [
                b
                for b in blockers
                if not (
                    b.get("kind") in ("signal", "timer") and name in (b.get("name"), b.get("timer"))
                )
            ]
            detail = f"step {matched[0].get('step')} ({matched[0].get('tool')}) waits for {name!r}"
            if rest:
                detail += "; the execution then still waits for " + ", ".join(
                    _blocker_name(b) for b in rest
                )
            if status != "suspended":  # a sibling call still runs: only this one carries on
                return True, "", detail
            return True, " and resumes the execution", detail
        if waits:
            now = ", ".join(
                f"{b.get('name')!r} (step {b.get('step')}, {b.get('tool')})" for b in waits
            )
            detail = f"the execution waits for signal {now}, not {name!r}: {later}"
            return False, "; it does not resume the execution", detail
        if status == "suspended":
            detail = f"no tool waits for {name!r} now (the execution waits for {waiting}): {later}"
            return False, "; it does not resume the execution", detail
        detail = (
            f"it goes to tools waiting in wait_for_signal({name!r}); none waits now, so {later}"
        )
        return False, "", detail
    unblocks = {
        "approve": status == "suspended",
        "reject": status == "suspended",
        "budget": status == "suspended" and meta.get("reason") == "budget",
        "resolve": status == "suspended" and meta.get("reason") == "unknown_outcome",
        "resume": status == "failed" or meta.get("reason") == "drift",
        "accept_drift": status == "suspended" and meta.get("reason") == "drift",
    }
    if any(unblocks.get(k, False) for k in kinds):
        return True, " and resumes the execution", ""
    if status == "suspended":
        return False, "; it does not resume the execution", f"it still waits for {waiting}"
    return False, "", ""


def _blocker_name(b: Mapping[str, Any]) -> str:
    kind = b.get("kind")
    if kind in ("approval", "contract"):
        return f"{kind} {b.get('confirmation_id')}"
    if kind == "signal":
        return f"signal {b.get('name')!r}"
    if kind == "timer":
        return f"timer {b.get('name')!r}"
    if kind == "child":
        return f"child execution {b.get('child_id')}"
    return str(kind)


def _held_note(p: Mapping[str, Any]) -> str:
    """Why a pending signal is not delivered yet, for ``inspect``: held or behind one."""
    if p.get("state") == "held":
        tries = p.get("attempts") or 0
        return f"; held: delivery failed {tries} time(s) ({p.get('error')}), being retried"
    if p.get("state") == "waiting":
        return "; waiting behind a held signal for this execution"
    return ""


async def _wait_settled(
    log: LmdbLog, eid: str, seq: int, timeout: float
) -> tuple[StreamInfo, bool]:
    """Wait until the runtime has taken inbox signal ``seq`` and the execution settled."""
    stream = execution_stream(eid)
    info = await log.stream_info(stream)
    assert info is not None
    with anyio.move_on_after(timeout):
        while True:
            inbox = await log.stream_info(INBOX_STREAM)
            cursor = int(inbox.meta.get("cursor", 0) or 0) if inbox else 0
            info = await log.stream_info(stream)
            assert info is not None
            taken = cursor >= seq or int(info.meta.get("signal_seq", 0) or 0) >= seq
            if taken and info.meta.get("status") not in ("running", "queued"):
                return info, True
            # Appends to the execution wake us at once; the inbox cursor (index meta
            # only) is looked at again at least every 0.2 s.
            await log.wait_for_append(stream, info.last_seq, timeout=0.2)
    return info, False


async def _approve(ctx: _Ctx, args: argparse.Namespace) -> int:
    payload = {"confirmation_id": args.confirmation_id, "note": args.note}
    return await _send(ctx, args, [("approve", payload)])


async def _reject(ctx: _Ctx, args: argparse.Namespace) -> int:
    payload = {"confirmation_id": args.confirmation_id, "reason": args.reason}
    return await _send(ctx, args, [("reject", payload)])


async def _signal(ctx: _Ctx, args: argparse.Namespace) -> int:
    payload = None if args.payload is None else _parse_json(args.payload, "the signal payload")
    name = args.name
    if not name.strip():
        raise CliError("a signal needs a name", "usage", 2)
    if name != name.strip() or clip(name, None) != name:
        # wait_for_signal('go') never matches 'go ' or 'go\n': almost surely a quoting slip.
        raise CliError(
            f"signal name {name!r} has surrounding spaces or control characters; a tool waits "
            f"for an exact name, e.g. perdure signal {shlex.quote(args.execution_id)} go",
            "usage",
            2,
        )
    if name.startswith("child:"):
        # The runtime posts a child's outcome to its parent under this name; one sent
        # by hand would hand the parent a result the child never produced.
        raise CliError(
            f"signal name {name!r} is reserved: the runtime sends a child execution's "
            f"result to its parent under it; act on the child itself (perdure inspect "
            f"{shlex.quote(name[len('child:') :])})",
            "usage",
            2,
        )
    return await _send(ctx, args, [(args.name, payload)])


async def _cancel(ctx: _Ctx, args: argparse.Namespace) -> int:
    return await _send(ctx, args, [("cancel", {"reason": args.reason})])


async def _resolve(ctx: _Ctx, args: argparse.Namespace) -> int:
    if args.retry:
        payload: dict[str, Any] = {"action": "retry"}
    elif args.complete is not None:
        payload = {"action": "complete", "output": _parse_json(args.complete, "--complete")}
    else:
        payload = {"action": "fail", "reason": args.fail}
    return await _send(ctx, args, [("resolve", payload)])


async def _resume(ctx: _Ctx, args: argparse.Namespace) -> int:
    limits = {
        "max_dollars": args.max_dollars,
        "max_llm_calls": args.max_llm_calls,
        "max_tool_calls": args.max_tool_calls,
        "max_tokens": args.max_tokens,
    }
    try:
        budget = Budget(**limits) if any(v is not None for v in limits.values()) else None
    except ValueError as exc:
        raise CliError(f"resume {args.execution_id}: {exc}", "usage", 2) from None
    owner = owner_pid(ctx.data_dir)

    async def plan(log: LmdbLog, info: StreamInfo) -> list[tuple[str, Any]]:
        # What Runtime.resume sends: the budget, the drift acceptance, and a resume for
        # a failed execution (or one suspended for drift that is not being accepted).
        eid, meta = _eid(info), info.meta
        status, reason = meta.get("status"), meta.get("reason")
        todo: list[tuple[str, Any]] = []
        if budget is not None:
            todo.append(("budget", {"budget": budget.to_dict()}))
        if args.accept_drift:
            todo.append(("accept_drift", {}))
        drift_held = status == "suspended" and reason == "drift" and not args.accept_drift
        if status == "failed" or drift_held:
            todo.append(("resume", {}))
        if todo or status in TERMINAL:
            return todo or [("resume", {})]  # a terminal status: precheck says why not
        text = describe(meta, owned=owner is not None)
        if status == "suspended":
            # The suspension as recorded names what it waits for (a signal's name, the
            # budget limit reached); the index entry only says why.
            suspension = _fold(info, await _history(log, info)).suspend_reason
            hints = next_steps(eid, "suspended", suspension or {"kind": reason})
            raise CliError(
                f"execution {eid!r} is {text}; resume does not decide that"
                + (f": {hints[0]}" if hints else ""),
                "nothing_to_resume",
            )
        if owner is None:
            raise CliError(
                f"execution {eid!r} is {text}: it carries on when a runtime with agent "
                f"{meta.get('agent')!r} registered opens {ctx.data_dir}; nothing was sent",
                "nothing_to_resume",
            )
        raise CliError(
            f"execution {eid!r} is already {status} (runtime pid {owner} owns the dir); "
            f"nothing was sent",
            "nothing_to_resume",
        )

    return await _send(ctx, args, plan)


# -- replay ---------------------------------------------------------------------------------


def _load_agents(specs: Sequence[str]) -> list[Agent]:
    """Import each ``module:attribute`` and collect its agents and their sub-agents."""
    # As ``python -m`` does: modules of the project in the current directory import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    found: dict[str, Agent] = {}
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise CliError(
                f"--agent {spec!r}: use MODULE:ATTRIBUTE, e.g. 'myapp.agents:support'", "usage", 2
            )
        obj: Any = _import_agent_module(spec, module_name)
        for part in attribute.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise CliError(
                    f"--agent {spec!r}: {module_name!r} has no attribute {attribute!r}",
                    "import",
                    2,
                ) from None
        if isinstance(obj, Agent):
            agents = [obj]
        else:
            items = obj.values() if isinstance(obj, Mapping) else obj
            try:
                agents = list(items)
            except TypeError:
                agents = [obj]
            if not agents or not all(isinstance(a, Agent) for a in agents):
                raise CliError(
                    f"--agent {spec!r} is a {type(obj).__name__}, not an Agent or an iterable "
                    f"of Agents",
                    "usage",
                    2,
                )
        todo = list(agents)
        while todo:
            agent = todo.pop()
            known = found.get(agent.name)
            if known is agent:
                continue
            if known is not None:
                raise CliError(f"two different agents are named {agent.name!r}", "usage", 2)
            found[agent.name] = agent
            todo.extend(agent.agents)
    return list(found.values())


def _import_agent_module(spec: str, module_name: str) -> Any:
    """Import the module of an ``--agent`` spec, telling "not found" from "it raised"."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise CliError(
                f"--agent {spec!r}: cannot import {module_name!r} (ModuleNotFoundError: "
                f"{exc}); run from your project's directory or set PYTHONPATH",
                "import",
                2,
            ) from None
        error: BaseException = exc  # found, but something it imports is missing
    except (Exception, SystemExit) as exc:  # a module that calls sys.exit() at import
        error = exc
    if isinstance(error, SyntaxError) and error.filename:
        where = f"{error.filename}:{error.lineno}"
    else:
        frames = traceback.extract_tb(error.__traceback__)
        # The innermost frame is where it raised (importlib's own frames come first).
        where = ""
        if frames:
            last = frames[-1]
            where = f"{last.filename}:{last.lineno} in {last.name}"
            where += f": {last.line}" if last.line else ""
    raise CliError(
        f"--agent {spec!r}: module {module_name!r} was found but raised while importing: "
        f"{type(error).__name__}: {error}"
        + (f" (at {where})" if where else "")
        + (
            "; install what it imports, or fix the module"
            if isinstance(error, ImportError)
            else "; fix the module"
        )
        + " (set PERDURE_DEBUG=1 for the whole traceback)",
        "import",
        2,
    ) from error


async def _replay(ctx: _Ctx, args: argparse.Namespace) -> int:
    agents = _load_agents(args.agent)
    names = {a.name for a in agents}
    replayer = Replayer(agents)
    reports: list[ReplayReport] = []
    async with _open(ctx) as log:
        if args.execution_ids:
            infos = [await _find(log, ctx, eid) for eid in args.execution_ids]
        else:
            infos = [
                info
                async for info in log.streams(prefix=_PREFIX, where={"kind": "execution"})
                if info.meta.get("agent") in names
            ]
            infos.sort(key=lambda i: (i.created_at, i.stream))
        for info in infos:
            try:
                events = [event for _, event in await _history(log, info)]
            except (LogError, EventDecodeError) as exc:
                reports.append(
                    ReplayReport(
                        _eid(info),
                        str(info.meta.get("agent")),
                        int(info.meta.get("steps", 0)),
                        str(info.meta.get("status")),
                        error=str(exc),
                    )
                )
                continue
            report = replayer.replay(events)
            if not report.execution_id:
                report.execution_id = _eid(info)
            # The status every other command shows: the index's ("queued" is kept there
            # only; the records of a queued execution fold to "running").
            report.status = str(info.meta.get("status"))
            reports.append(report)
    bad = [r for r in reports if not r.ok]
    if ctx.json:
        ctx.emit(
            {
                "ok": not bad,
                "agents": sorted(names),
                "replayed": len(reports),
                "drifted": len(bad),
                "executions": [r.to_dict() for r in reports],
            }
        )
        return 1 if bad else 0
    lines = [
        f"replaying {len(reports)} execution{'s' if len(reports) != 1 else ''} against "
        f"{', '.join(args.agent)} (agents {', '.join(sorted(names))}); nothing is called"
    ]
    if not reports:
        lines.append("nothing to replay: no executions of these agents in " + ctx.data_dir)
    rows = table(
        ("EXECUTION", "AGENT", "STATUS", "STEPS", "REPLAY"),
        (
            (
                r.execution_id,
                r.agent,
                r.status,
                str(r.steps),
                "ok" if r.ok else ("ERROR" if r.error else "DRIFT"),
            )
            for r in reports
        ),
        right=(3,),
    )
    if reports:
        lines.append(rows[0])
    for r, row in zip(reports, rows[1:], strict=True):
        lines.append(row)
        if r.error:
            lines.append(f"  {r.error}")
        for item in r.drift:
            lines += ["  " + line for line in _drift_lines(item)]
    if bad:
        lines.append(
            f"{len(bad)} of {len(reports)} executions drifted or failed to replay: under this "
            f"code, unfinished ones would suspend (or fail) on resume, per their agent's drift "
            f"policy"
        )
    else:
        lines.append("no drift")
    ctx.lines(lines)
    return 1 if bad else 0


def _drift_lines(item: Mapping[str, Any]) -> list[str]:
    kind = item.get("kind")
    step = item.get("step")
    if kind == "arguments":
        return [
            f"step {step} (tool {item.get('tool')}): recorded arguments "
            f"{fmt_json(item.get('arguments'), 80)} no longer fit: {item.get('error')}"
        ]
    what = "LLM request" if kind == "llm" else f"tool {item.get('tool')}"
    head = f"step {step} ({what}): fingerprint {item.get('recorded')} -> {item.get('current')}"
    changes = item.get("changes") or []
    return [head] + ["  " + render_change(c) for c in changes]


if __name__ == "__main__":
    main()
