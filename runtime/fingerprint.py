"""Stable digests of what an agent is made of, for drift detection.

A digest is 16 hex characters of BLAKE2b over a canonical encoding (JSON with sorted
keys), so it does not change between processes, machines or Python versions. Tool code
is digested from its syntax tree with decorators, comments and formatting removed: a
reformatted tool is not drift, a changed expression is.

Code, not configuration: a callable instance is digested as its class's ``__call__``
(its attributes are left out), and a ``functools.partial`` as its function plus the
*names* of its bound keywords and the *number* of its bound positionals (those change
which parameters the model may pass), never the bound values. Binding a client, an API
key or a base URL with either shape is therefore not drift when the value changes:
rotating a key is not a code change, and a digest of a secret is not recorded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import re
import textwrap
import types
from collections.abc import Callable
from typing import Any

__all__ = ["code_digest", "digest", "short", "short_json"]

#: Values up to this many characters are kept verbatim in drift reports.
SHORT = 120
#: The same for a JSON value such as a tool's schema (compact, keys sorted).
SHORT_JSON = 500


def digest(value: Any) -> str:
    """16 hex characters identifying ``value`` (any JSON-encodable value)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()


def short(text: str | None, limit: int = SHORT) -> str | None:
    """``text`` if it is short enough to show in a drift report, else None."""
    if text is None or len(text) > limit:
        return None
    return text


def short_json(value: Any) -> str | None:
    """``value`` as compact JSON (keys sorted) if that is short enough for a report."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return short(text, SHORT_JSON)


def code_digest(fn: Callable[..., Any]) -> str:
    """A digest of a function's code that ignores comments, formatting and decorators.

    It must be the same in every process that runs the same code, so nothing in it may
    depend on a memory address: a ``functools.partial`` is digested as its function, the
    names of its bound keywords and the number of its bound positionals (not their
    values, which are configuration, like an instance's attributes), a callable
    instance as its class's ``__call__``, and code without source from its bytecode
    (nested code objects included).
    """
    target = inspect.unwrap(fn)
    if isinstance(target, functools.partial):
        return digest(
            ["partial", code_digest(target.func), len(target.args), sorted(target.keywords)]
        )
    if not (inspect.isroutine(target) or inspect.isclass(target)):
        # A callable instance: its behaviour is its class's __call__ (its attributes are
        # configuration such as clients and keys, which are not code).
        call = getattr(type(target), "__call__", None)  # noqa: B004 - the method itself
        if inspect.isfunction(inspect.unwrap(call)):
            kind = type(target)
            return digest(["instance", kind.__qualname__, code_digest(call)])
    if getattr(target, "__name__", None) == "<lambda>":
        node = _lambda_node(target)
        if node is not None:
            return digest(["lambda", ast.dump(node, annotate_fields=False)])
    try:
        source = textwrap.dedent(inspect.getsource(target))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        code = getattr(target, "__code__", None)
        if isinstance(code, types.CodeType):
            return digest(_bytecode(code))
        return digest(_ADDRESS.sub("", repr(target)))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            # The tool's name is fingerprinted on its own; renaming the Python function
            # behind it changes no behaviour.
            node.name = "_"
            node.decorator_list = []
            _drop_docstring(node)
            break
    return digest(ast.dump(tree, annotate_fields=False, include_attributes=False))


# " at 0x7f3a..." in reprs such as <function f at 0x7f3a...>: different in every process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _lambda_node(fn: Any) -> ast.Lambda | None:
    """The lambda's own node in its file, or None if its source cannot be found.

    ``inspect.getsource`` gives the whole line(s) a lambda is on, so a digest of that
    would change with the code around it (moved into a call spread over lines, or a
    sibling lambda on the same line edited): drift where the lambda did not change.
    Its node is found by the position of its body, which the code object records.
    """
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    try:
        lines, _ = inspect.findsource(fn)
        tree = ast.parse("".join(lines))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    spans = [
        (line, col, end_line, end_col)
        for line, end_line, col, end_col in code.co_positions()
        if line is not None and col is not None and end_line is not None and end_col
    ]
    if not spans:
        return None
    line, col, end_line, end_col = spans[0]
    best: ast.Lambda | None = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Lambda):
            continue
        body = node.body
        start = (body.lineno, body.col_offset)
        end = (body.end_lineno or body.lineno, body.end_col_offset or 0)
        # The innermost lambda whose body holds the code's first expression.
        inside = start <= (line, col) and (end_line, end_col) <= end
        if inside and (best is None or _size(body) < _size(best.body)):
            best = node
    return best


def _size(node: ast.expr) -> tuple[int, int]:
    return (
        (node.end_lineno or node.lineno) - node.lineno,
        (node.end_col_offset or 0) - node.col_offset,
    )


def _bytecode(code: types.CodeType) -> list[Any]:
    consts = [_bytecode(c) if isinstance(c, types.CodeType) else _stable(c) for c in code.co_consts]
    return [code.co_code.hex(), consts, list(code.co_names)]


def _stable(value: Any) -> Any:
    """``value`` as JSON-encodable data that is the same in every process."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple | set | frozenset):
        items = [_stable(v) for v in value]
        if isinstance(value, set | frozenset):
            items.sort(key=repr)
        return items
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items()}
    if inspect.isroutine(value) or isinstance(value, functools.partial):
        return ["callable", code_digest(value)]
    # Anything else (a client, a lock, ...) by its type only: its repr may hold an
    # address, and its state is not the tool's code.
    kind = type(value)
    return [f"{kind.__module__}.{kind.__qualname__}"]


def _drop_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
    # The docstring feeds the tool's description, which is fingerprinted on its own; a
    # reworded docstring is description drift, not code drift.
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        node.body = body[1:] or [ast.Pass()]
