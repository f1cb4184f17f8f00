"""Record the golden histories: run the examples' agents and export their logs.

    python -m tests.histories.record

Writes one ``perdure-export`` JSON document per execution into this directory. Run it
again only when a change to the log format or to an example is intended; the test
``test_golden_histories.py`` replays these files against the current code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import anyio

# the checkout example's tools keep a ledger file: keep it out of the repo
os.environ.setdefault("PERDURE_LEDGER", os.path.join(tempfile.mkdtemp(), "ledger.jsonl"))

from perdure import Runtime
from perdure.cli_export import export_document
from perdure.events import execution_stream
from tests.histories.agents import AGENTS, SCRIPTS

HERE = Path(__file__).resolve().parent


async def record() -> None:
    with tempfile.TemporaryDirectory() as d:
        async with Runtime(d, agents=list(AGENTS.values()), durability="process") as rt:
            for name, (agent_name, prompt, approve) in SCRIPTS.items():
                r = await rt.run(AGENTS[agent_name], prompt, execution_id=name)
                while approve and r.is_suspended and r.suspend_reason is not None:
                    await rt.approve(name, r.suspend_reason.confirmation_id, by="recorder")
                    r = await rt.wait(name)
                assert r.status == "completed", (name, r.status)
                stream = execution_stream(name)
                info = await rt.log.stream_info(stream)
                assert info is not None
                records = [rec async for rec in rt.log.read(stream)]
                doc = export_document(name, info, records)
                path = HERE / f"{name}.json"
                path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                print(f"wrote {path.name}: {len(records)} records")


if __name__ == "__main__":
    anyio.run(record)
