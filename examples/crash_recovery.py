"""Crash an agent with SIGKILL between the payment and the email; it resumes exactly.

    python examples/crash_recovery.py [DATA_DIR]

The script runs the agent in a child process. Inside the payment tool, right after the
charge was written to the bank's ledger but before the tool returned, the child kills
itself with SIGKILL. The script then starts the child again on the same data dir: the
Runtime replays the log, re-invokes the interrupted payment with the SAME idempotency
key (the bank sees the key and does not charge twice), sends the email once, and
finishes. Finally the ledger shows each side effect happened once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from perdure import Agent, Runtime, current_idempotency_key, tool
from perdure.providers import Scripted

LEDGER = Path(os.environ.get("PERDURE_LEDGER", "ledger.jsonl"))


def _ledger() -> list[dict]:
    if not LEDGER.exists():
        return []
    return [json.loads(line) for line in LEDGER.read_text().splitlines() if line.strip()]


def _write(entry: dict) -> None:
    with LEDGER.open("a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


@tool("charge_card", description="Charge the customer's card")
def charge_card(customer: str, amount: float) -> dict:
    key = current_idempotency_key()
    # The "bank": a charge under a key it has seen returns the first result.
    for entry in _ledger():
        if entry["effect"] == "charge" and entry["key"] == key:
            return {"charged": entry["amount"], "deduplicated": True}
    _write({"effect": "charge", "customer": customer, "amount": amount, "key": key})
    if os.environ.get("PERDURE_CRASH_IN_CHARGE") == "1":
        print("  [child] charged the card... and now the process dies (SIGKILL)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return {"charged": amount, "deduplicated": False}


@tool("send_email", description="Email the customer a receipt")
def send_email(customer: str, text: str) -> str:
    _write({"effect": "email", "customer": customer, "key": current_idempotency_key()})
    return "sent"


agent = Agent(
    "checkout",
    instructions="Charge the customer, then email a receipt.",
    tools=[charge_card, send_email],
    llm=Scripted(
        [
            Scripted.call("charge_card", customer="ada", amount=42.0),
            Scripted.call("send_email", customer="ada", text="Thanks for your order of $42."),
            "Charged $42 and emailed the receipt.",
        ]
    ),
)


def child(data_dir: str) -> None:
    # The agent is registered at open: the execution the first run left behind is
    # resumed by recovery itself, before rt.run below finds it already under way.
    with Runtime(data_dir, agents=[agent]) as rt:
        r = rt.run(agent, "Check out ada's cart ($42).", execution_id="order-42")
        print(f"  [child] execution {r.execution_id}: {r.status} — {r.output}", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    data_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="perdure-crash-")
    ledger = Path(data_dir) / "ledger.jsonl"
    env = {**os.environ, "PERDURE_LEDGER": str(ledger)}
    print(f"data dir {data_dir}\n1) first run, which dies inside the payment tool:")
    first = subprocess.run(
        [sys.executable, __file__, "--child", data_dir], env={**env, "PERDURE_CRASH_IN_CHARGE": "1"}
    )
    print(f"  child exit status {first.returncode} (-9 means SIGKILL)")
    print("2) second run on the same data dir:")
    second = subprocess.run([sys.executable, __file__, "--child", data_dir], env=env, check=True)
    assert second.returncode == 0
    global LEDGER
    LEDGER = ledger
    entries = _ledger()
    print("3) the ledger:")
    for entry in entries:
        print(f"  {entry['effect']:6} key={entry['key']}")
    charges = [e for e in entries if e["effect"] == "charge"]
    emails = [e for e in entries if e["effect"] == "email"]
    assert len(charges) == 1 and len(emails) == 1, "a side effect ran twice!"
    print("each side effect happened exactly once.")


if __name__ == "__main__":
    main()
