"""``perdure replay``: recorded executions against current agent code; nothing is called."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

from tests.cli.conftest import Store, perdure, perdure_here

CHANGED = textwrap.dedent(
    '''
    """The agents of tests.cli.agents after an edit: new instructions, a new tool text.

    Their model and tool code write MARKER if anything ever calls them.
    """
    from pathlib import Path

    from perdure import Agent, Tool
    from perdure.providers import CallableProvider
    from tests.cli import agents as before

    MARKER = Path(__file__).with_name("called")


    def model(*args, **kwargs):
        MARKER.write_text("the model was called")
        raise AssertionError("replay called the model")


    def get_weather(city: str) -> dict:
        MARKER.write_text("a tool was called")
        return {}


    weather = Agent(
        "weather",
        instructions="You report the weather, briefly.",
        tools=[before.get_weather],
        llm=CallableProvider(model, model="scripted"),
    )
    budgeted = Agent(
        "budgeted",
        instructions=before.budgeted.instructions,
        tools=[Tool(get_weather, name="get_weather", description="Look up the weather")],
        llm=CallableProvider(model, model="scripted"),
        budget=before.budgeted.budget,
    )
    '''
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replay_against_unchanged_code_finds_no_drift(store: Store) -> None:
    ran = perdure(store.path, "replay", "--agent", "tests.cli.agents:ALL", "--json")
    assert ran.code == 0, ran.out
    doc = ran.json()
    assert doc["ok"] is True and doc["replayed"] == 11 and doc["drifted"] == 0
    assert all(e["ok"] and not e["drift"] for e in doc["executions"])
    one = perdure_here(store.path, "replay", "--agent", "tests.cli.agents:weather", "weather-1")
    assert one.code == 0 and one.out.splitlines()[-1] == "no drift"
    assert "weather-1  weather  completed      3  ok" in one.out


def test_replay_reports_drift_per_step_and_calls_and_writes_nothing(
    store: Store, tmp_path: Path
) -> None:
    (tmp_path / "agents_next.py").write_text(CHANGED)
    before = digest(store.path / "data.mdb"), (store.path / "owner.lock").read_text()
    args = ("replay", "--agent", "agents_next:weather", "--agent", "agents_next:budgeted")
    ran = perdure(store.path, *args, "--json", cwd=tmp_path)  # the module imports from cwd
    assert ran.code == 1, ran.out
    doc = ran.json()
    assert doc["ok"] is False and doc["replayed"] == 2 and doc["drifted"] == 2
    reports = {e["execution_id"]: e for e in doc["executions"]}

    weather = reports["weather-1"]["drift"]
    assert [(d["step"], d["kind"]) for d in weather] == [(1, "llm"), (3, "llm")]
    assert weather[0]["changes"] == [
        {
            "what": "instructions",
            "before": "You report the weather.",
            "after": "You report the weather, briefly.",
        }
    ]
    tool = next(d for d in reports["budget-1"]["drift"] if d["kind"] == "tool")
    assert tool["step"] == 2 and tool["tool"] == "get_weather"
    description = next(c for c in tool["changes"] if c["field"] == "description")
    assert description["before"] == "Get the current weather for a city"
    assert description["after"] == "Look up the weather"
    assert any(c["field"] == "code" for c in tool["changes"])

    text = perdure(store.path, *args, cwd=tmp_path)
    assert text.code == 1
    assert 'instructions: "You report the weather." -> "You report the weather, briefly."' in (
        text.out
    )
    assert "step 2 (tool get_weather): fingerprint " in text.out
    assert (
        "tool 'get_weather' description: \"Get the current weather for a city\" -> "
        '"Look up the weather"' in text.out
    )
    assert text.out.splitlines()[-1].startswith("2 of 2 executions drifted")

    assert not (tmp_path / "called").exists()  # no model, no tool
    assert (digest(store.path / "data.mdb"), (store.path / "owner.lock").read_text()) == before


def test_replay_of_an_execution_whose_agent_was_not_given(store: Store) -> None:
    ran = perdure_here(
        store.path, "replay", "--agent", "tests.cli.agents:weather", "pay-1", "--json"
    )
    assert ran.code == 1
    [report] = ran.json()["executions"]
    assert report["execution_id"] == "pay-1"
    assert "agent 'banker' is not among the agents given to replay" in report["error"]
