"""Stable digests of what an agent is made of, for drift detection.

A digest is 16 hex characters of BLAKE2b over a canonical encoding (JSON with sorted
keys), so it does not change between processes, machines or Python versions. Tool code
is digested from its syntax tree with decorators, comments and formatting removed: a
reformatted tool is not drift, a changed expression is.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import textwrap
from collections.abc import Callable
from typing import Any

__all__ = ["code_digest", "digest", "short"]

#: Values up to this many characters are kept verbatim in drift reports.
SHORT = 120


def digest(value: Any) -> str:
    """16 hex characters identifying ``value`` (any JSON-encodable value)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()


def short(text: str | None) -> str | None:
    """``text`` if it is short enough to show in a drift report, else None."""
    if text is None or len(text) > SHORT:
        return None
    return text


def code_digest(fn: Callable[..., Any]) -> str:
    """A digest of a function's code that ignores comments, formatting and decorators."""
    target = inspect.unwrap(fn)
    try:
        source = textwrap.dedent(inspect.getsource(target))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        code = getattr(target, "__code__", None)
        if code is None:
            return digest(repr(target))
        return digest([code.co_code.hex(), repr(code.co_consts), list(code.co_names)])
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            # The tool's name is fingerprinted on its own; renaming the Python function
            # behind it changes no behaviour.
            node.name = "_"
            node.decorator_list = []
            _drop_docstring(node)
            break
    return digest(ast.dump(tree, annotate_fields=False, include_attributes=False))


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
