"""JSON Schema for tool arguments: derived from type hints, and checked before a tool runs.

Only the subset of JSON Schema that :func:`schema_for` produces is validated (types,
``required``, ``properties``, ``additionalProperties``, ``items``, ``enum``, ``anyOf``
for optionals). That is deliberate: the model sees exactly the schema we can check, and
every argument error names the offending path so the model can correct itself.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from perdure.errors import AgentDefinitionError, ToolArgumentsError

__all__ = [
    "callable_doc",
    "callable_function",
    "doc_summary",
    "param_docs",
    "schema_for",
    "schema_for_callable",
    "validate",
]

_PRIMITIVES: dict[type, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
}


def schema_for(hint: Any, *, where: str = "argument") -> dict[str, Any]:
    """The JSON Schema for one type hint; raises AgentDefinitionError if unsupported."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint is type(None) or hint is None:
        return {"type": "null"}
    if hint in _PRIMITIVES:
        return dict(_PRIMITIVES[hint])
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is typing.Annotated:
        schema = schema_for(args[0], where=where)
        for extra in args[1:]:
            if isinstance(extra, str):
                schema["description"] = extra
        return schema
    if origin is Literal:
        values = list(args)
        schema: dict[str, Any] = {"enum": values}
        kinds = {type(v) for v in values}
        if len(kinds) == 1 and (kind := kinds.pop()) in _PRIMITIVES:
            schema.update(_PRIMITIVES[kind])
        return schema
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        optional = len(members) != len(args)
        inner = [schema_for(m, where=where) for m in members]
        schema = inner[0] if len(inner) == 1 else {"anyOf": inner}
        if optional:
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema
    if origin in (list, Sequence, tuple, set, frozenset) or hint in (list, tuple, set):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": schema_for(args[0], where=where)}
        if origin is tuple and args:
            return {
                "type": "array",
                "prefixItems": [schema_for(a, where=where) for a in args],
                "minItems": len(args),
                "maxItems": len(args),
            }
        return {"type": "array", "items": schema_for(args[0], where=where) if args else {}}
    if origin in (dict, Mapping) or hint is dict:
        if args and args[0] is not str:
            raise AgentDefinitionError(f"{where}: dict keys must be str for JSON, got {args[0]}")
        return {
            "type": "object",
            "additionalProperties": schema_for(args[1], where=where) if args else {},
        }
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _object_schema(
            {f.name: f.type for f in dataclasses.fields(hint)},
            {f.name for f in dataclasses.fields(hint) if _has_default(f)},
            hint,
            where,
        )
    if isinstance(hint, type) and typing.is_typeddict(hint):
        return _object_schema(
            typing.get_type_hints(hint, include_extras=True),
            set(getattr(hint, "__optional_keys__", ())),
            hint,
            where,
        )
    raise AgentDefinitionError(
        f"{where}: type {hint!r} cannot be described as JSON Schema; use str, int, float, "
        f"bool, list, dict, Literal, Enum, Optional, a dataclass or a TypedDict"
    )


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _object_schema(
    hints: Mapping[str, Any], optional: set[str], owner: type, where: str
) -> dict[str, Any]:
    resolved = typing.get_type_hints(owner, include_extras=True)
    props = {
        name: schema_for(resolved.get(name, hint), where=f"{where}.{name}")
        for name, hint in hints.items()
    }
    schema: dict[str, Any] = {
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }
    required = [n for n in props if n not in optional]
    if required:
        schema["required"] = required
    return schema


_PARAM_LINE = re.compile(r"^\s*(?::param\s+)?(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def doc_summary(doc: str | None) -> str:
    """The first paragraph of a docstring, joined into one line."""
    if not doc:
        return ""
    paragraph: list[str] = []
    for line in inspect.cleandoc(doc).splitlines():
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    return " ".join(paragraph)


def param_docs(doc: str | None) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` section or ``:param x:`` lines."""
    if not doc:
        return {}
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    in_args = False
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(":param"):
            m = _PARAM_LINE.match(stripped)
            if m:
                current = m.group(1)
                out[current] = m.group(2).strip()
            continue
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            current = None
            continue
        if in_args:
            if not stripped:
                current = None
                continue
            if stripped.endswith(":") and not line.startswith((" ", "\t")):
                in_args = False  # the next section (Returns:, Raises:, ...)
                continue
            m = _PARAM_LINE.match(line)
            indent = len(line) - len(line.lstrip())
            if m and (current is None or indent <= _arg_indent(lines, current)):
                current = m.group(1)
                out[current] = m.group(2).strip()
            elif current is not None:
                out[current] = f"{out[current]} {stripped}".strip()
    return out


def _arg_indent(lines: list[str], name: str) -> int:
    for line in lines:
        if line.strip().startswith(f"{name}") and ":" in line:
            return len(line) - len(line.lstrip())
    return 0


def callable_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function whose code, hints and docstring ``fn`` runs.

    ``fn`` itself for a function or a (bound) method, decorators unwrapped; the function
    of a ``functools.partial``; the ``__call__`` of a callable instance (as found on its
    class, like the call itself does).
    """
    target = inspect.unwrap(fn)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if inspect.isroutine(target) or inspect.isclass(target):
        return target
    call = getattr(type(target), "__call__", None)  # noqa: B004 - the method itself
    return inspect.unwrap(call) if inspect.isfunction(inspect.unwrap(call)) else target


def callable_doc(fn: Callable[..., Any]) -> str | None:
    """The docstring that describes calling ``fn``.

    A partial's ``__doc__`` is ``functools.partial``'s own: its function's is used. A
    callable instance is described by its ``__call__``'s docstring, else its class's.
    """
    doc = callable_function(fn).__doc__
    instance = inspect.unwrap(fn)
    while isinstance(instance, functools.partial):
        instance = inspect.unwrap(instance.func)
    if not doc and not (inspect.isroutine(instance) or inspect.isclass(instance)):
        doc = type(instance).__doc__
    return doc


def schema_for_callable(fn: Callable[..., Any], *, tool_name: str) -> dict[str, Any]:
    """The arguments object schema of a function, from its hints, defaults and docstring.

    ``fn`` may also be a ``functools.partial`` (its bound arguments are not asked for)
    or a callable instance (described by its ``__call__``).
    """
    try:
        # From the function itself: a partial or an instance has no annotations of its
        # own (a dataclass instance has its fields', which are not the call's).
        hints = typing.get_type_hints(callable_function(fn), include_extras=True)
    except Exception as exc:  # unresolvable forward references and the like
        raise AgentDefinitionError(f"tool {tool_name!r}: cannot read type hints: {exc}") from exc
    descriptions = param_docs(callable_doc(fn))
    bound = _bound_keywords(fn)
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if name in bound:
            # Bound by a partial: the tool's configuration (a client, a key), not an
            # argument for the model -- nor something to put in the schema it is sent.
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise AgentDefinitionError(
                f"tool {tool_name!r}: *args/**kwargs cannot be described to a model; "
                f"name every parameter"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise AgentDefinitionError(
                f"tool {tool_name!r}: parameter {name!r} is positional-only; the model passes "
                f"arguments by name"
            )
        hint = hints.get(name, param.annotation)
        schema = schema_for(hint, where=f"tool {tool_name!r} parameter {name!r}")
        if name in descriptions and "description" not in schema:
            schema["description"] = descriptions[name]
        if param.default is param.empty:
            required.append(name)
        elif _json_literal(param.default):
            schema["default"] = param.default
        props[name] = schema
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def _bound_keywords(fn: Callable[..., Any]) -> set[str]:
    names: set[str] = set()
    target = inspect.unwrap(fn)
    while isinstance(target, functools.partial):
        names.update(target.keywords)
        target = inspect.unwrap(target.func)
    return names


def _json_literal(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def validate(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> None:
    """Raise ToolArgumentsError naming the first place ``value`` breaks ``schema``."""
    problems = list(_problems(value, schema, path))
    if problems:
        raise ToolArgumentsError("; ".join(problems[:5]))


def _problems(value: Any, schema: Mapping[str, Any], path: str) -> typing.Iterator[str]:
    if not schema:
        return
    if "anyOf" in schema:
        options = schema["anyOf"]
        if any(not list(_problems(value, s, path)) for s in options):
            return
        yield f"{path}: {_show(value)} matches none of the allowed forms"
        return
    expected = schema.get("type")
    if expected is not None:
        check = _JSON_TYPES.get(expected)
        if check is not None and not check(value):
            yield f"{path}: expected {expected}, got {_json_kind(value)} {_show(value)}"
            return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_show(v) for v in schema["enum"])
        yield f"{path}: {_show(value)} is not one of {allowed}"
        return
    if isinstance(value, dict) and (expected == "object" or "properties" in schema):
        props: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                yield f"{path}: missing required {name!r}"
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                yield from _problems(item, props[key], f"{path}.{key}")
            elif extra is False:
                known = ", ".join(props) or "none"
                yield f"{path}: unexpected {key!r} (known: {known})"
            elif isinstance(extra, Mapping):
                yield from _problems(item, extra, f"{path}.{key}")
    if isinstance(value, list):
        if "prefixItems" in schema:
            items = schema["prefixItems"]
            if len(value) != len(items):
                yield f"{path}: expected {len(items)} items, got {len(value)}"
                return
            for i, (item, sub) in enumerate(zip(value, items, strict=True)):
                yield from _problems(item, sub, f"{path}[{i}]")
        elif "items" in schema:
            for i, item in enumerate(value):
                yield from _problems(item, schema["items"], f"{path}[{i}]")


def _json_kind(value: Any) -> str:
    for name, check in _JSON_TYPES.items():
        if name != "number" and check(value):
            return name
    if isinstance(value, float):
        return "number"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
