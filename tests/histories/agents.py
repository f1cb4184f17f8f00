"""The agents behind the golden histories: the examples' own agents.

Each is imported from its example file, so changing an example's prompt, tools or
tool code without re-recording is exactly the drift the golden test must catch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from perdure import Agent

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    # The quickstart picks OpenAI when a key is set; golden histories are scripted.
    os.environ.pop("OPENAI_API_KEY", None)
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def agents() -> dict[str, Agent]:
    """The examples' agents by name."""
    found = [
        _load("quickstart").agent,
        _load("crash_recovery").agent,
        _load("approval").agent,
        _load("fleet").agent,
    ]
    return {a.name: a for a in found}


AGENTS = agents()

#: history name -> (agent, prompt, approve pending confirmations)
SCRIPTS: dict[str, tuple[str, str, bool]] = {
    "quickstart": (
        "assistant",
        "What's the weather in Paris? Then move $50 from checking to savings.",
        True,
    ),
    "checkout": ("checkout", "Check out ada's cart ($42).", False),
    "refund-approval": ("support", "Order A-1001 arrived broken; refund it.", True),
    "fleet-refund": ("refunds", "Refund order 7", False),
}
