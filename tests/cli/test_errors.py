"""Bad input: every error names what is wrong and what to do; ``--json`` errors are JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from tests.cli.conftest import REPO, Ran, Store, cli_env, perdure, perdure_here


def test_unknown_execution(store: Store) -> None:
    message = f"no execution 'nope' in {store.path}; see 'perdure status'"
    ran = perdure(store.path, "inspect", "nope")
    assert (ran.code, ran.out, ran.err) == (1, "", f"perdure: error: {message}\n")
    as_json = perdure(store.path, "steps", "nope", "--json")
    assert as_json.code == 1 and as_json.err == ""
    assert as_json.json() == {"error": {"kind": "not_found", "message": message}}
    for args in (
        ("events", "nope"),
        ("export", "nope"),
        ("approve", "nope", "c-1"),
        ("reject", "nope", "c-1", "--reason", "x"),
        ("signal", "nope", "go"),
        ("resume", "nope"),
        ("resolve", "nope", "--retry"),
        ("cancel", "nope"),
        ("replay", "--agent", "tests.cli.agents:ALL", "nope"),
        ("inspect", "x" * 600),  # not even a name the log could hold
    ):
        ran = perdure_here(store.path, *args, "--json")
        assert ran.code == 1, args
        assert ran.json()["error"]["kind"] == "not_found", args


def test_missing_or_empty_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    ran = perdure(missing, "status")
    assert ran.code == 1
    assert ran.err == (
        f"perdure: error: data dir '{missing}' does not exist; pass --data-dir DIR or set "
        f"PERDURE_DATA_DIR (default ./perdure-data)\n"
    )
    assert perdure(missing, "health", "--json").json()["error"]["kind"] == "no_data_dir"
    empty = perdure_here(tmp_path, "status")
    assert empty.code == 1 and "holds no perdure log (no data.mdb)" in empty.err
    assert not (tmp_path / "data.mdb").exists()  # a reader never creates a log
    foreign = tmp_path / "foreign"  # another program's LMDB data, closed (no lock.mdb)
    env = lmdb.open(str(foreign), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    (foreign / "lock.mdb").unlink()
    ran = perdure(foreign, "status")
    assert ran.code == 1 and "holds no perdure log" in ran.err, ran.err
    assert sorted(p.name for p in foreign.iterdir()) == ["data.mdb"]  # nothing left behind
    a_file = tmp_path / "data.json"
    a_file.write_text("{}")
    ran = perdure(a_file, "status")
    assert ran.code == 1
    assert ran.err == (
        f"perdure: error: data dir '{a_file}' is not a directory; pass --data-dir DIR (the "
        f"directory a Runtime opened) or set PERDURE_DATA_DIR\n"
    )
    assert perdure_here(a_file, "health", "--json").json()["error"]["kind"] == "no_data_dir"


def test_wrong_confirmation_id_is_refused_before_anything_is_sent(store: Store) -> None:
    cid = store.cids["pay-1"]
    ran = perdure(store.path, "approve", "pay-1", "c-wrong")
    assert ran.code == 1
    assert ran.err == (
        f"perdure: error: execution 'pay-1' has no pending confirmation 'c-wrong' "
        f"(pending: {cid}); see 'perdure inspect pay-1'\n"
    )
    rejected = perdure_here(store.path, "reject", "guard-1", cid, "--reason", "x", "--json")
    assert rejected.code == 1 and rejected.json()["error"]["kind"] == "invalid_signal"
    assert perdure_here(store.path, "inspect", "pay-1", "--json").json()["pending_signals"] == []


@pytest.mark.parametrize(
    "args",
    [
        ("signal", "wait-1", "go", "{bad json"),
        ("resolve", "pay-1", "--complete", "{'single': 'quotes'}"),
    ],
)
def test_malformed_json(store: Store, args: tuple[str, ...]) -> None:
    ran = perdure(store.path, *args)
    assert ran.code == 1 and "is not valid JSON" in ran.err and "quote it for the shell" in ran.err
    assert perdure_here(store.path, *args, "--json").json()["error"]["kind"] == "bad_json"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ('{"ratio": NaN}', "NaN is not a JSON value (JSON has no NaN or Infinity)"),
        ("[Infinity]", "Infinity is not a JSON value (JSON has no NaN or Infinity)"),
        ('{"big": 1e999}', "1e999 is too large for a float (it would be Infinity)"),
    ],
)
def test_json_payloads_refuse_nan_and_infinity(store: Store, payload: str, why: str) -> None:
    # Python's json.loads takes these; JSON has none of them, and the payload would be
    # stored as a tagged float ({"$float": "nan"}) that no JSON reader expects.
    ran = perdure(store.path, "signal", "wait-1", "go", payload)
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (
        f"perdure: error: the signal payload is not valid JSON: {why}: {payload!r}; use null, "
        f'a finite number, or a string such as "NaN"\n'
    )
    complete = perdure_here(store.path, "resolve", "pay-1", "--complete", payload, "--json")
    assert complete.code == 1 and complete.json()["error"]["kind"] == "bad_json"
    assert perdure_here(store.path, "inspect", "wait-1", "--json").json()["pending_signals"] == []


def test_usage_errors_exit_2_and_are_json_when_asked(store: Store) -> None:
    ran = perdure(store.path, "reject", "pay-1", "c-1")  # --reason is required
    assert ran.code == 2 and "the following arguments are required: --reason" in ran.err
    assert ran.err.startswith("usage: perdure reject")
    as_json = perdure_here(store.path, "status", "--bogus", "--json")
    assert as_json.code == 2
    assert as_json.json()["error"] == {
        "kind": "usage",
        "message": "perdure: error: unrecognized arguments: --bogus",
    }
    both = perdure_here(store.path, "resolve", "pay-1", "--retry", "--fail")
    assert both.code == 2 and "not allowed with argument" in both.err
    spec = perdure_here(store.path, "replay", "--agent", "no_colon")
    assert spec.code == 2 and "use MODULE:ATTRIBUTE" in spec.err
    budget = perdure_here(store.path, "resume", "budget-1", "--max-dollars", "-1")
    assert budget.code == 2 and "resume budget-1: Budget.max_dollars must be >= 0" in budget.err


def test_version_is_the_installed_one() -> None:
    import tomllib

    from perdure import __version__

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
    ran = perdure(None, "--version")
    assert ran.code == 0 and ran.out == f"perdure {__version__}\n"


def test_signals_that_cannot_apply_say_why_and_what_to_do(store: Store) -> None:
    cid = store.cids["pay-1"]
    resume = perdure_here(store.path, "resume", "pay-1")
    assert resume.code == 1
    assert f"execution 'pay-1' is suspended (approval {cid}); resume does not decide that" in (
        resume.err
    )
    assert f"perdure approve pay-1 {cid}" in resume.err
    done = perdure_here(store.path, "signal", "weather-1", "go")
    assert done.code == 1
    assert "execution 'weather-1' is completed; it takes no more signals" in done.err
    doubt = perdure_here(store.path, "resolve", "pay-1", "--retry")
    assert doubt.code == 1 and "has no tool call in doubt" in doubt.err
    assert perdure_here(store.path, "inspect", "pay-1", "--json").json()["pending_signals"] == []


def test_a_budget_raise_that_raises_nothing_is_refused_before_anything_is_sent(
    store: Store,
) -> None:
    # budget-1 used 1 LLM call (its limit) and 15 tokens.
    fix = (
        "pass a limit above {used} ('perdure resume budget-1 --max-{flag} N' or "
        "rt.resume('budget-1', budget=Budget(max_{limit}=N)))"
    )
    ran = perdure(store.path, "resume", "budget-1", "--max-llm-calls", "0")
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (
        "perdure: error: execution 'budget-1': cannot raise max_llm_calls to 0: a raised "
        "limit must be a positive, finite number (it has used 1 LLM call); "
        + fix.format(used=1, flag="llm-calls", limit="llm_calls")
        + "\n"
    )
    at_usage = perdure(store.path, "resume", "budget-1", "--max-llm-calls", "1")
    assert at_usage.code == 1
    assert at_usage.err == (
        "perdure: error: execution 'budget-1': cannot raise max_llm_calls to 1: it has used "
        "1 LLM call, so the limit would be reached at once; "
        + fix.format(used=1, flag="llm-calls", limit="llm_calls")
        + "\n"
    )
    tokens = perdure_here(store.path, "resume", "budget-1", "--max-tokens", "15", "--json")
    assert tokens.code == 1 and tokens.json()["error"] == {
        "kind": "invalid_signal",
        "message": "execution 'budget-1': cannot raise max_tokens to 15: it has used 15 tokens, "
        "so the limit would be reached at once; "
        + fix.format(used=15, flag="tokens", limit="tokens"),
    }
    for value in ("inf", "0"):
        dollars = perdure_here(store.path, "resume", "budget-1", "--max-dollars", value)
        assert dollars.code == 1, value
        assert f"cannot raise max_dollars to {float(value)!r}: a raised limit must be a " in (
            dollars.err
        )
    # NaN is no budget at all (Budget refuses it when made, as it does -1): a usage error.
    nan = perdure_here(store.path, "resume", "budget-1", "--max-dollars", "nan")
    assert nan.code == 2 and "Budget.max_dollars must be >= 0 or None, got nan" in nan.err
    assert perdure_here(store.path, "inspect", "budget-1", "--json").json()["pending_signals"] == []


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(source)


def test_bad_agent_values_are_usage_errors_that_say_what_is_wrong(
    store: Store, tmp_path: Path
) -> None:
    write_module(
        tmp_path,
        "badmod",
        "import json\n\n\ndef load():\n    raise RuntimeError('config missing: set FOO')\n\n\n"
        "load()\n",
    )
    write_module(tmp_path, "needsdep", "import not_installed_anywhere\n")
    write_module(tmp_path, "fine", "def agent():\n    pass\n")

    def replay(spec: str) -> Ran:
        return perdure(store.path, "replay", "--agent", spec, cwd=tmp_path)

    raised = replay("badmod:agent")
    assert (raised.code, raised.out) == (2, "")
    assert raised.err == (
        "perdure: error: --agent 'badmod:agent': module 'badmod' was found but raised while "
        f"importing: RuntimeError: config missing: set FOO (at {tmp_path / 'badmod.py'}:5 in "
        "load: raise RuntimeError('config missing: set FOO')); fix the module (set "
        "PERDURE_DEBUG=1 for the whole traceback)\n"
    )
    assert "PYTHONPATH" not in raised.err
    dep = replay("needsdep:agent")
    assert dep.code == 2
    assert (
        "module 'needsdep' was found but raised while importing: ModuleNotFoundError: No module "
        "named 'not_installed_anywhere'"
    ) in dep.err
    assert "install what it imports, or fix the module" in dep.err
    missing = replay("no_such_module:agent")
    assert missing.code == 2
    assert missing.err == (
        "perdure: error: --agent 'no_such_module:agent': cannot import 'no_such_module' "
        "(ModuleNotFoundError: No module named 'no_such_module'); run from your project's "
        "directory or set PYTHONPATH\n"
    )
    no_attribute = replay("fine:nothing")
    assert no_attribute.code == 2 and "'fine' has no attribute 'nothing'" in no_attribute.err
    function = replay("fine:agent")
    assert function.code == 2 and "is a function, not an Agent" in function.err
    tool = perdure(store.path, "replay", "--agent", "tests.cli.agents:get_weather")
    assert tool.code == 2 and "is a Tool, not an Agent" in tool.err
    as_json = perdure_here(store.path, "replay", "--agent", "no_such_module:agent", "--json")
    assert as_json.code == 2 and as_json.json()["error"]["kind"] == "import"

    # PERDURE_DEBUG prints the module's own traceback, then the same one-line error.
    argv = ["--data-dir", str(store.path), "replay", "--agent", "badmod:agent"]
    debug = subprocess.run(
        [sys.executable, "-m", "perdure.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=cli_env(PERDURE_DEBUG="1"),
    )
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and 'badmod.py", line 8, in <module>' in debug.stderr
    assert debug.stderr.endswith(raised.err)
