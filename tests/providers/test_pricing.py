"""Pricing: exact and prefix matches, overrides, unknown models."""

from __future__ import annotations

import pytest

from perdure.providers import Price, Pricing, Usage


def test_exact_match_and_cost() -> None:
    pricing = Pricing.default()
    assert pricing.price("gpt-4o-mini") == Price(0.15, 0.60)
    cost = pricing.cost("gpt-4o-mini", Usage(1_000_000, 500_000))
    assert cost == pytest.approx(0.15 + 0.30)


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # not "gpt-4o"
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),  # not "claude-opus-4"
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("o3-mini-2025-01-31", "o3-mini"),
    ],
)
def test_dated_names_match_the_longest_known_prefix(model: str, family: str) -> None:
    pricing = Pricing.default()
    assert pricing.price(model) == pricing.price(family)
    assert pricing.price(model) is not None


def test_prefix_must_end_at_a_separator() -> None:
    pricing = Pricing({"gpt-4": Price(30, 60)})
    assert pricing.price("gpt-4-0613") == Price(30, 60)
    assert pricing.price("gpt-4o") is None  # "gpt-4o" is not a "gpt-4"
    assert pricing.price("gpt-4.5-preview") is None
    assert Pricing({"llama3": Price(0, 0)}).price("llama3:8b") == Price(0, 0)


def test_a_gateways_vendor_qualified_name_finds_the_models_price() -> None:
    pricing = Pricing.default()
    assert pricing.price("openai/gpt-4o-mini") == pricing.price("gpt-4o-mini")
    assert pricing.price("anthropic/claude-sonnet-4-5-20250929") == pricing.price(
        "claude-sonnet-4-5"
    )
    assert pricing.price("openai/my-local-model") is None
    # a price listed under the qualified name itself wins (a gateway's own price)
    own = pricing.with_prices({"openrouter/gpt-4o-mini": Price(1, 2)})
    assert own.price("openrouter/gpt-4o-mini") == Price(1, 2)


def test_unknown_model_costs_none() -> None:
    pricing = Pricing.default()
    assert pricing.price("my-local-model") is None
    assert pricing.cost("my-local-model", Usage(10, 10)) is None
    assert "my-local-model" not in pricing
    assert "gpt-4o" in pricing


def test_with_prices_extends_and_overrides_a_copy() -> None:
    base = Pricing.default()
    custom = base.with_prices({"my-model": Price(1.0, 2.0), "gpt-4o": Price(0.0, 0.0)})
    assert custom.cost("my-model-v2", Usage(2_000_000, 1_000_000)) == pytest.approx(4.0)
    assert custom.cost("gpt-4o", Usage(1000, 1000)) == 0.0
    # The original is untouched.
    assert base.price("my-model") is None
    assert base.price("gpt-4o") == Price(2.50, 10.00)
    assert len(custom) == len(base) + 1


def test_prices_are_validated() -> None:
    with pytest.raises(ValueError):
        Price(-1.0, 1.0)
    with pytest.raises(TypeError, match="must be a Price"):
        Pricing({"m": (1.0, 2.0)})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        Pricing.default().prices["x"] = Price(1, 1)  # type: ignore[index]
