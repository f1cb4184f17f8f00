"""Text for people: aligned tables and the readable views of ``perdure`` commands.

Machine output (``--json``) never goes through here; these functions only turn plain
data into lines. Values from the log are shown as compact JSON, clipped where a view
is a summary (``steps``); ``events`` and ``--json`` always give them in full.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from perdure.cli_export import to_json_value

__all__ = [
    "clip",
    "fmt_bytes",
    "fmt_clock",
    "fmt_dollars",
    "fmt_json",
    "fmt_time",
    "key_values",
    "next_steps",
    "render_change",
    "render_entry",
    "table",
]


#: Characters that would move the cursor or end the line in a terminal (line breaks,
#: tabs, escape sequences, C1 controls, Unicode line separators), as visible escapes.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def clip(text: str, limit: int | None) -> str:
    """``text`` on one line with control characters escaped, cut to ``limit``
    characters (None: whole)."""
    # A value from the log (an operator's --by, a signal name, an error message) must
    # not break a table row or send escape sequences to the terminal.
    text = text.translate(_CONTROLS)
    if limit is None or len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "…"


def fmt_json(value: Any, limit: int | None = None) -> str:
    """``value`` as compact one-line JSON (tagged where JSON lacks a type), clipped."""
    text = json.dumps(to_json_value(value), ensure_ascii=False, separators=(", ", ": "))
    return clip(text, limit)


def fmt_time(ts: float | None) -> str:
    """Local date and time to the second."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def fmt_clock(ts: float) -> str:
    """Local time of day to the millisecond."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def fmt_dollars(value: float | None) -> str:
    """Dollars with enough digits for per-call costs; ``-`` when unknown."""
    if value is None:
        return "-"
    return f"${value:.4f}" if value >= 0.01 or value == 0 else f"${value:.6f}"


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop returns first


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()
) -> list[str]:
    """Aligned lines: a header, then one line per row; columns in ``right`` right-aligned."""
    rows = [list(r) for r in rows]
    right = set(right)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    last = len(headers) - 1

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            if i in right:
                parts.append(cell.rjust(widths[i]))
            elif i == last:
                parts.append(cell)  # no trailing spaces
            else:
                parts.append(cell.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def key_values(pairs: Iterable[tuple[str, str]], indent: str = "") -> list[str]:
    """``key  value`` lines with the values aligned."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{indent}{k.ljust(width)}  {v}".rstrip() for k, v in pairs]


def _cmd(*words: str) -> str:
    return "perdure " + " ".join(shlex.quote(w) if w != "..." else w for w in words)


#: The flag of ``perdure resume`` that raises each budget limit.
_BUDGET_FLAGS = {
    "max_dollars": "--max-dollars",
    "max_llm_calls": "--max-llm-calls",
    "max_tool_calls": "--max-tool-calls",
    "max_tokens": "--max-tokens",
}


def next_steps(execution_id: str, status: str, reason: Mapping[str, Any] | None) -> list[str]:
    """What an operator can do next about an execution, as commands to run."""
    eid = execution_id
    if status == "failed":
        return [f"retry it from its log: {_cmd('resume', eid)}"]
    if status != "suspended" or not reason:
        return []
    out: list[str] = []
    for blocker in reason.get("pending") or [reason]:
        kind = blocker.get("kind")
        if kind in ("approval", "contract"):
            cid = str(blocker.get("confirmation_id"))
            verb = "override the contract" if kind == "contract" else "approve"
            out.append(f"{verb}: {_cmd('approve', eid, cid)} [--note TEXT]")
            out.append(f"reject: {_cmd('reject', eid, cid, '--reason', 'WHY')}")
            if blocker.get("until") is not None:
                out.append(
                    f"undecided, {cid} is rejected by itself at {fmt_time(blocker['until'])}"
                )
        elif kind == "budget":
            flag = _BUDGET_FLAGS.get(str(blocker.get("limit")), "--max-llm-calls")
            origin = blocker.get("origin")
            if origin and origin != eid:
                # The limit is what an ancestor had left: raised there, it is handed
                # down and this execution resumes by itself.
                out.append(
                    f"raise the budget of {origin}, whose limit this is (handed down, "
                    f"it resumes this one): {_cmd('resume', str(origin), flag, 'N')}"
                )
                out.append(f"or let this one spend past it: {_cmd('resume', eid, flag, 'N')}")
            else:
                out.append(f"raise the budget: {_cmd('resume', eid, flag, 'N')}")
        elif kind == "unknown_outcome":
            out.append(
                f"decide the in-doubt call: {_cmd('resolve', eid, '--retry')} | "
                f"--complete JSON | --fail [REASON]"
            )
        elif kind == "drift":
            out.append(f"see what changed: {_cmd('replay', '--agent', 'MODULE:AGENT', eid)}")
            out.append(f"accept the new definition: {_cmd('resume', eid, '--accept-drift')}")
        elif kind == "signal":
            out.append(f"send it: {_cmd('signal', eid, str(blocker.get('name')), 'JSON')}")
            if blocker.get("timer"):
                out.append(f"it times out by itself at {fmt_time(blocker.get('until'))}")
        elif kind == "timer":
            name = str(blocker.get("name"))
            out.append(
                f"it resumes by itself at {fmt_time(blocker.get('until'))}; to wake it "
                f"now: {_cmd('signal', eid, name, '{}')}"
            )
        elif kind == "child":
            child = str(blocker.get("child_id"))
            out.append(f"it resumes when child {child} finishes: {_cmd('inspect', child)}")
    # Several calls may wait on the same kind of thing; say each command once.
    return list(dict.fromkeys(out))


def render_change(change: Mapping[str, Any]) -> str:
    """One drift change (from ``diff_definitions``) in words."""
    what = change.get("what")
    subject = f"tool {change.get('tool')!r} {change.get('field')}" if what == "tool" else what
    if "before" not in change:
        return str(subject)
    before, after = change.get("before"), change.get("after")
    if before is None and after is None:
        return f"{subject} changed (too long to show)"
    return f"{subject}: {fmt_json(before, 120)} -> {fmt_json(after, 120)}"


_CLIP = 160


def _text(value: Any, limit: int = _CLIP) -> str:
    """A plain value from the log (a name, a reason, who acted) for one table cell."""
    return clip(str(value), limit)


def render_entry(e: Mapping[str, Any]) -> tuple[str, str, str]:
    """A timeline entry as (step, kind, detail) cells."""
    kind = str(e["kind"])
    step = "" if e.get("step") in (None, 0) or kind == "suspended" else str(e["step"])
    detail = _DETAIL.get(kind, _other)(e)
    return step, kind, detail


def _started(e: Mapping[str, Any]) -> str:
    parent = e.get("parent")
    of = f" (child of {parent.get('execution_id')})" if parent else ""
    return f"agent {e['agent']}{of}: {fmt_json(e['prompt'], _CLIP)}"


def _llm(e: Mapping[str, Any]) -> str:
    who = "/".join(str(p) for p in (e.get("provider"), e.get("model")) if p)
    cost = fmt_dollars(e.get("cost"))
    head = (
        f"{who or '?'}  {e['input_tokens']}+{e['output_tokens']} tokens  {cost}  "
        f"{e['latency_ms']:.1f} ms"
    )
    calls = e.get("tool_calls") or []
    if calls:
        names = ", ".join(f"{c['name']}@{c['step']}" for c in calls)
        answer = f"calls {names}"
        if e.get("text"):
            answer = f"{fmt_json(e['text'], 60)}, {answer}"
    else:
        answer = fmt_json(e.get("text") or "", _CLIP)
    return f"{head}  -> {answer}"


def _tool(e: Mapping[str, Any]) -> str:
    call = f"{e['tool']} {fmt_json(e.get('arguments'), 80)}"
    status = e.get("status")
    if status == "ok":
        outcome = f"ok {fmt_json(e.get('output'), 80)}"
    elif status in ("error", "rejected"):
        err = e.get("error") or {}
        outcome = f"{status} {_text(err.get('type', 'Error'))}: {_text(err.get('message', ''), 80)}"
    elif status == "started":
        outcome = "started, no outcome recorded (running, or in doubt after a crash)"
    else:
        outcome = str(status)
    notes = []
    if e.get("key"):
        notes.append(f"key {e['key']}")
    attempts = e.get("attempts")
    if attempts:
        # Each wake-up (a signal or a child's outcome arrived) starts a new attempt on
        # the record; shown apart, so that only re-runs after a crash read as attempts.
        woken = int(e.get("wakeups") or 0)
        runs = max(attempts - woken, 1)
        notes.append("attempt 1" if runs == 1 else f"{runs} attempts")
        if woken:
            notes.append("woken 1 time" if woken == 1 else f"woken {woken} times")
    if e.get("idempotent") is False:
        notes.append("not idempotent")
    if e.get("latency_ms") is not None and status not in ("started", "planned"):
        notes.append(f"{e['latency_ms']:.1f} ms")
    tail = f"  ({', '.join(notes)})" if notes else ""
    return f"{call} -> {outcome}{tail}"


def _approval(e: Mapping[str, Any]) -> str:
    gate = e.get("gate")
    why = f"contract {e.get('contract')!r}: {e.get('message')}" if gate == "contract" else gate
    decided = e.get("decision") or "pending"
    if e.get("expires") is not None:
        decided += f"; rejected if undecided at {fmt_time(e['expires'])}"
    args = fmt_json(e.get("arguments"), 80)
    return f"{e['tool']} {args} needs {why}; confirmation {e['confirmation_id']} ({decided})"


def _approved(e: Mapping[str, Any]) -> str:
    note = f", note {fmt_json(e['note'], 80)}" if e.get("note") else ""
    what = "override of" if e.get("override") else ""
    return f"{what} {e['confirmation_id']} by {_text(e['by'])}{note}".strip()


def _rejected(e: Mapping[str, Any]) -> str:
    return f"{e['confirmation_id']} by {_text(e['by'])}: {_text(e.get('reason', ''))}"


def _waiting(e: Mapping[str, Any]) -> str:
    if e.get("wait") == "child":
        return f"for child execution {(e.get('detail') or {}).get('child_id', '?')}"
    if e.get("wait") == "timer":
        until = (e.get("detail") or {}).get("until")
        return f"for timer {_text(repr(e.get('name')))} until {fmt_time(until)}"
    detail = e.get("detail") or {}
    if detail.get("timer"):
        until = fmt_time(detail.get("until"))
        return f"for signal {_text(repr(e.get('name')))}, or its timeout at {until}"
    return f"for signal {_text(repr(e.get('name')))}"


def _suspended(e: Mapping[str, Any]) -> str:
    reason = e.get("reason") or {}
    kind = reason.get("kind")
    if kind in ("approval", "contract"):
        ids = ", ".join(str(p.get("confirmation_id")) for p in reason.get("pending") or [reason])
        return f"{kind} {ids}"
    if kind == "budget":
        return (
            f"budget: {reason.get('limit')} {reason.get('limit_value')} reached "
            f"(used {reason.get('used')})"
        )
    if kind == "unknown_outcome":
        return (
            f"unknown_outcome: tool {reason.get('tool')!r} step {reason.get('step')} started "
            f"but never finished (key {reason.get('key')})"
        )
    if kind == "drift":
        return f"drift: {clip(str(reason.get('message', '')), _CLIP)}"
    if kind == "signal":
        return f"signal {reason.get('name')!r}"
    if kind == "timer":
        return f"timer {reason.get('name')!r} until {fmt_time(reason.get('until'))}"
    if kind == "child":
        return f"child {reason.get('child_id')}"
    return fmt_json(reason, _CLIP)


def _drift(e: Mapping[str, Any]) -> str:
    changes = "; ".join(render_change(c) for c in e.get("changes") or [])
    return f"{e.get('action')}: {clip(changes, _CLIP)}"


def _failed(e: Mapping[str, Any]) -> str:
    err = e.get("error") or {}
    return f"{e.get('failure')}: {_text(err.get('type', 'Error'))}: {_text(err.get('message'))}"


def _resolved(e: Mapping[str, Any]) -> str:
    if e.get("action") == "complete":
        return f"complete with {fmt_json(e.get('output'), 80)} by {_text(e['by'])}"
    if e.get("action") == "fail":
        err = e.get("error") or {}
        return f"fail ({_text(err.get('message', ''), 80)}) by {_text(e['by'])}"
    return f"{e.get('action')} by {_text(e['by'])}"


def _other(e: Mapping[str, Any]) -> str:
    rest = {k: v for k, v in e.items() if k not in ("seq", "time", "kind", "step")}
    return fmt_json(rest, _CLIP)


_DETAIL = {
    "started": _started,
    "llm": _llm,
    "tool": _tool,
    "approval": _approval,
    "approved": _approved,
    "rejected": _rejected,
    "waiting": _waiting,
    "signal": lambda e: f"{_text(e['name'])} {fmt_json(e.get('payload'), 80)} by {_text(e['by'])}",
    "signal_ignored": lambda e: f"{_text(e['name'])} by {_text(e['by'])}: {_text(e['reason'])}",
    "budget_raised": lambda e: f"to {fmt_json(e.get('budget'))} by {_text(e['by'])}",
    "budget_inherited": lambda e: f"{fmt_json(e.get('budget'))} left by {_text(e['parent'])}",
    "charged": lambda e: (
        f"{_text(e['child'])} used {(e.get('usage') or {}).get('llm_calls', 0)} LLM calls, "
        f"{(e.get('usage') or {}).get('tool_calls', 0)} tool calls, "
        f"{fmt_dollars((e.get('usage') or {}).get('dollars', 0.0))}"
    ),
    "resolved": _resolved,
    "drift": _drift,
    "drift_accepted": lambda e: f"by {_text(e['by'])}",
    "suspended": _suspended,
    "resumed": lambda e: f"by {_text(e['by'])}",
    "completed": lambda e: fmt_json(e.get("output"), _CLIP),
    "failed": _failed,
    "cancelled": lambda e: (
        f"by {_text(e['by'])}" + (f": {_text(e['reason'])}" if e.get("reason") else "")
    ),
}
