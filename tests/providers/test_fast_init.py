"""fast_init builds the same objects as the dataclass's own __init__, only cheaper."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest

from perdure.providers import LLMRequest, Message, ToolCall
from perdure.providers.fast_init import fast_init, fast_new


@dataclass(frozen=True, slots=True)
class Plain:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)
    d: int = field(default=7, init=False)
    e: list[int] = field(default_factory=lambda: [1], init=False)


@fast_init
@dataclass(frozen=True, slots=True)
class Fast:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)
    d: int = field(default=7, init=False)
    e: list[int] = field(default_factory=lambda: [1], init=False)


def as_tuple(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1,), {}), ((1, "x"), {}), ((1, "x", [2]), {}), ((), {"a": 1, "c": [3]}), ((1,), {"b": "y"})],
)
def test_same_fields_as_the_generated_init(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    assert as_tuple(Fast(*args, **kwargs)) == as_tuple(Plain(*args, **kwargs))


def test_default_factories_give_each_object_its_own_value() -> None:
    one, two = Fast(1), Fast(2)
    assert one.c == [] and one.c is not two.c
    assert one.e == [1] and one.e is not two.e


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, "x", [], 4), {}), ((1,), {"d": 3}), ((1,), {"bogus": 1}), ((1,), {"a": 2})],
)
def test_bad_arguments_fail_like_the_generated_init(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        Plain(*args, **kwargs)
    with pytest.raises(TypeError):
        Fast(*args, **kwargs)


def test_the_class_stays_a_frozen_dataclass() -> None:
    m = Message("tool", "out", (), "call_1", "noop")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.content = "changed"  # type: ignore[misc]
    assert m == Message(role="tool", content="out", tool_call_id="call_1", name="noop")
    assert hash(m) == hash(Message("tool", "out", (), "call_1", "noop"))
    assert dataclasses.replace(m, content="new").content == "new"
    assert pickle.loads(pickle.dumps(m)) == m
    request = LLMRequest(messages=(m,), tools=(), model="x")
    assert request.params == {} and copy.deepcopy(request) == request
    assert ToolCall("c", "t", {"i": 1}).to_dict() == {"id": "c", "name": "t", "arguments": {"i": 1}}


def test_classes_it_cannot_serve_are_refused() -> None:
    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        a: int

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        scale: InitVar[int] = 1

    for cls in (NotFrozen, NoSlots, PostInit, KeywordOnly, WithInitVar):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)


@dataclass(frozen=True, slots=True)
class Built:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)


@pytest.mark.parametrize(
    "args",
    [(1,), (1, "x"), (1, "x", [2])],
)
def test_fast_new_builds_what_the_constructor_builds(args: tuple[Any, ...]) -> None:
    built = fast_new(Built)(*args)
    assert type(built) is Built and built == Built(*args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.a = 2  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(built)) == built
    assert dataclasses.replace(built, a=5) == Built(5, *args[1:])
    # a default factory runs per object, as the constructor's does
    assert fast_new(Built)(1).c is not fast_new(Built)(1).c
    message = fast_new(Message)("tool", "out", (), "call_1", "noop", True)
    assert message == Message("tool", "out", (), "call_1", "noop", True)
    assert repr(message) == repr(Message("tool", "out", (), "call_1", "noop", True))
    assert hash(message) == hash(Message("tool", "out", (), "call_1", "noop", True))


def test_fast_new_refuses_what_it_cannot_build() -> None:
    @dataclass(frozen=True, slots=True)
    class NotInInit:
        a: int
        b: int = field(default=0, init=False)

    @dataclass(frozen=True, slots=True, weakref_slot=True)
    class WeakReferable:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    for cls in (NotInInit, WeakReferable, NoSlots):
        with pytest.raises(TypeError, match="fast_new"):
            fast_new(cls)
