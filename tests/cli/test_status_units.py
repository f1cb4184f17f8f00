"""In-process units: status words, finding the owner, and the export JSON codec."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perdure import status
from perdure.cli_export import ExportFormatError, from_json_value, to_json_value
from perdure.status import describe, owner_pid


@pytest.mark.parametrize(
    ("meta", "owned", "pending", "text"),
    [
        ({"status": "completed"}, True, 0, "completed"),
        ({"status": "running"}, True, 0, "running"),
        ({"status": "running"}, False, 0, "running (no owner: resumes at next start)"),
        ({"status": "running"}, None, 0, "running"),
        ({"status": "queued"}, False, 0, "queued (no owner: resumes at next start)"),
        (
            {"status": "suspended", "reason": "approval", "confirmations": ["c-1", "c-2"]},
            True,
            0,
            "suspended (approval c-1, c-2)",
        ),
        (
            {"status": "suspended", "reason": "contract", "confirmations": ["c-9"]},
            True,
            1,
            "suspended (contract c-9; 1 signal pending)",
        ),
        (
            {"status": "suspended", "reason": "budget", "confirmations": []},
            False,
            2,
            "suspended (budget; 2 signals pending, delivered at next start)",
        ),
        ({"status": "suspended", "reason": None}, True, 0, "suspended (unknown reason)"),
        (
            # The reason is the first blocker; a decision waiting beside it is named too.
            {"status": "suspended", "reason": "signal", "confirmations": ["c-3"]},
            True,
            0,
            "suspended (signal; confirmation c-3)",
        ),
        (
            {"status": "suspended", "reason": "budget", "confirmations": ["c-4", "c-5"]},
            True,
            1,
            "suspended (budget; confirmations c-4, c-5; 1 signal pending)",
        ),
        ({}, None, 0, "unknown"),
    ],
)
def test_describe(meta: dict[str, Any], owned: bool | None, pending: int, text: str) -> None:
    assert describe(meta, owned=owned, pending=pending) == text


def test_owner_pid_reads_the_lock_without_taking_it(tmp_path: Path) -> None:
    assert owner_pid(tmp_path) is None  # no lock file
    lock = tmp_path / "owner.lock"
    lock.write_text("4242\n")
    assert owner_pid(tmp_path) is None  # a pid left behind, but nobody holds the lock
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        assert owner_pid(tmp_path) == os.getpid()
        # Asking did not take (or share) the lock: another process can't get it either.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except BlockingIOError: print('held')",
                str(lock),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.stdout.strip() == "held"
    finally:
        os.close(fd)
    assert owner_pid(tmp_path) is None  # released


def test_owner_pid_without_proc_locks_falls_back_to_the_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "_LOCKS", str(tmp_path / "no-proc-locks"))
    lock = tmp_path / "owner.lock"
    lock.write_text(f"{os.getpid()}\n")
    assert owner_pid(tmp_path) == os.getpid()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(dead.stdout)
    assert owner_pid(tmp_path) is None


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
keys = st.text(max_size=4) | st.sampled_from(["$bytes", "$map", "$float", "$cbor", "$x"])
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(keys, inner, max_size=4)
        | st.dictionaries(st.integers(-5, 5), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(values)
def test_export_codec_round_trips_every_log_value(value: Any) -> None:
    text = json.dumps(to_json_value(value), allow_nan=False)  # always valid JSON
    back = from_json_value(json.loads(text))
    # CBOR encodings compare NaN and -0.0 exactly, where == would not.
    assert cbor2.dumps(back) == cbor2.dumps(value)


def test_export_codec_other_cbor_values_and_bad_tags() -> None:
    tagged = cbor2.CBORTag(4242, [1, "x"])
    assert cbor2.dumps(from_json_value(to_json_value(tagged))) == cbor2.dumps(tagged)
    assert math.isinf(from_json_value({"$float": "-inf"}))
    with pytest.raises(ExportFormatError, match=r"stray '\$' key"):
        from_json_value({"$nope": 1})
    with pytest.raises(ExportFormatError, match=r"malformed \$bytes"):
        from_json_value({"$bytes": "***"})


@pytest.mark.parametrize(
    ("budget", "usage", "problem"),
    [
        ({"max_llm_calls": 5}, {"llm_calls": 1}, None),
        ({"max_llm_calls": 5}, None, None),
        ({"max_dollars": 0.5}, {"dollars": 0.25}, None),
        ({"max_llm_calls": 0}, None, "cannot raise max_llm_calls to 0: a raised limit must be"),
        ({"max_dollars": math.nan}, None, "cannot raise max_dollars to nan: a raised limit"),
        ({"max_tokens": math.inf}, None, "cannot raise max_tokens to inf: a raised limit"),
        ({"max_llm_calls": 1}, {"llm_calls": 1}, "it has used 1 LLM call, so the limit"),
        ({"max_tool_calls": 2}, {"tool_calls": 3}, "it has used 3 tool calls, so the limit"),
        ({"max_dollars": 0.25}, {"dollars": 0.25}, "it has used $0.25, so the limit"),
        ({"max_llm_calls": True}, None, "budget max_llm_calls must be a number, got True"),
        # An index entry leaves a zero count out: it reads as zero used.
        ({"max_tool_calls": 0}, {"llm_calls": 1}, "finite number (it has used 0 tool calls)"),
    ],
)
def test_precheck_refuses_a_budget_raise_that_raises_nothing(
    budget: dict[str, Any], usage: dict[str, Any] | None, problem: str | None
) -> None:
    from perdure.signals import precheck

    got = precheck("b1", "suspended", [], "budget", {"budget": budget}, usage=usage)
    if problem is None:
        assert got is None
    else:
        assert got is not None and got.startswith("execution 'b1': ") and problem in got
        assert "perdure resume b1 --max-" in got and "rt.resume('b1', budget=Budget(" in got
