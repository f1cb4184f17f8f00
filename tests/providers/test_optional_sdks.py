"""The vendor SDKs are optional: importing perdure.providers never needs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perdure.providers import Anthropic, OpenAI, TerminalProviderError


def test_importing_the_package_imports_no_vendor_sdk() -> None:
    code = (
        "import sys, perdure.providers; "
        "print(sorted(m for m in ('openai', 'anthropic', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_anthropic_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)  # makes "import anthropic" fail
    with pytest.raises(TerminalProviderError, match=r"pip install 'perdure\[anthropic\]'"):
        Anthropic("claude-test", api_key="k")


def test_missing_openai_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(TerminalProviderError, match=r"pip install 'perdure\[openai\]'"):
        OpenAI("gpt-test", api_key="k")
