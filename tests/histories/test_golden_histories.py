"""Golden histories, recorded from the examples, replayed against the current code.

Replay calls no model and no tool; it rebuilds each execution from its recorded events
and compares every step's fingerprint with what the current agent definition would
produce (Temporal's replayer is the model for this test). A change to an example that
would change what its executions do fails here until the histories are re-recorded
with ``python -m tests.histories.record``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perdure import Agent, Replayer
from perdure.cli_export import records_from_export
from perdure.events import Event, decode
from perdure.providers import Scripted
from tests.histories.agents import AGENTS

HERE = Path(__file__).resolve().parent
HISTORIES = sorted(HERE.glob("*.json"))


def events_of(path: Path) -> list[Event]:
    return [decode(r) for r in records_from_export(json.loads(path.read_text()))]


def test_there_are_golden_histories() -> None:
    assert {p.stem for p in HISTORIES} == {
        "quickstart",
        "checkout",
        "refund-approval",
        "fleet-refund",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
def test_a_golden_history_replays_without_drift(path: Path) -> None:
    report = Replayer(list(AGENTS.values())).replay(events_of(path))
    assert report.ok, report.to_dict()
    assert report.status == "completed" and report.steps > 0


def test_a_drifted_agent_is_caught() -> None:
    original = AGENTS["assistant"]
    changed = Agent(
        original.name,
        original.instructions + " Always answer in French.",
        tools=list(original.tools.values()),
        llm=Scripted(["unused"]),
    )
    report = Replayer([changed]).replay(events_of(HERE / "quickstart.json"))
    assert not report.ok
    changes = [c for d in report.drift if d["kind"] == "llm" for c in d["changes"]]
    assert changes and changes[0]["what"] == "instructions"
    assert "French" in changes[0]["after"]
