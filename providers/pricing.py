"""Turning token usage into dollars: a per-model price table users can extend.

``Pricing.default()`` knows common OpenAI and Anthropic models. A model is matched
exactly, then by its longest known prefix ending at a separator (``-``, ``:`` or
``@``), so dated names such as ``gpt-4o-mini-2024-07-18`` or
``claude-sonnet-4-5-20250929`` find their family's price while ``gpt-4o`` never takes
``gpt-4``'s; a gateway's ``vendor/model`` name is looked up as ``model`` if not listed
itself. An unknown model costs ``None``: the runtime decides what that means.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from perdure.providers.types import Usage

__all__ = ["Price", "Pricing"]

# Characters after which a longer model name may continue its family's name.
_SEPARATORS = "-:@"


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million input tokens and per million output tokens."""

    input_per_million: float
    output_per_million: float

    def __post_init__(self) -> None:
        # NaN compares false with everything: a budget priced with it would never run out.
        for value in (self.input_per_million, self.output_per_million):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"a Price must be a finite, non-negative number: {self}")

    def cost(self, usage: Usage) -> float:
        """Dollars for ``usage`` at this price."""
        return (
            usage.input_tokens * self.input_per_million
            + usage.output_tokens * self.output_per_million
        ) / 1_000_000


# List prices in USD per million tokens (standard tier, no caching or batch discounts).
# Taken on 2026-11-22 from summaries of OpenAI's and Anthropic's pricing pages dated
# March 2026 (we could not load the vendors' pages themselves). Prices change: users
# should check them and override with ``Pricing.default().with_prices({...})``.
_DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5.4": Price(2.50, 15.00),
    "gpt-5.1": Price(1.25, 10.00),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-5-pro": Price(15.00, 120.00),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.00, 60.00),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    # Anthropic
    "claude-opus-4-6": Price(5.00, 25.00),
    "claude-opus-4-5": Price(5.00, 25.00),
    "claude-opus-4-1": Price(15.00, 75.00),
    "claude-opus-4": Price(15.00, 75.00),
    "claude-sonnet-4-6": Price(3.00, 15.00),
    "claude-sonnet-4-5": Price(3.00, 15.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-opus": Price(15.00, 75.00),
    "claude-3-haiku": Price(0.25, 1.25),
}


class Pricing:
    """An immutable table of model prices; lookups cost O(len(model name))."""

    __slots__ = ("_prices",)

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        table = dict(prices or {})
        for model, price in table.items():
            if not isinstance(price, Price):
                raise TypeError(
                    f"Pricing: the price for {model!r} must be a Price, got {type(price).__name__}"
                )
        self._prices: Mapping[str, Price] = MappingProxyType(table)

    @classmethod
    def default(cls) -> Pricing:
        """Current list prices for common OpenAI and Anthropic models."""
        return cls(_DEFAULT_PRICES)

    def with_prices(self, prices: Mapping[str, Price]) -> Pricing:
        """A copy extended with ``prices`` (which override entries of the same name)."""
        return Pricing({**self._prices, **prices})

    def price(self, model: str) -> Price | None:
        """The price of ``model``: an exact match, else its longest known prefix.

        A name a gateway qualifies with its vendor (``openai/gpt-4o-mini``, as
        OpenRouter and LiteLLM name models) that is not in the table as such is looked
        up without the qualifier.
        """
        found = self._family(model)
        if found is None and "/" in model:
            found = self._family(model.rsplit("/", 1)[1])
        return found

    def _family(self, model: str) -> Price | None:
        exact = self._prices.get(model)
        if exact is not None:
            return exact
        # Try each prefix that ends just before a separator, longest first.
        for end in range(len(model) - 1, 0, -1):
            if model[end] in _SEPARATORS:
                found = self._prices.get(model[:end])
                if found is not None:
                    return found
        return None

    def cost(self, model: str, usage: Usage) -> float | None:
        """Dollars for ``usage`` on ``model``, or ``None`` if the model is unknown."""
        price = self.price(model)
        return None if price is None else price.cost(usage)

    @property
    def prices(self) -> Mapping[str, Price]:
        """The table (read-only)."""
        return self._prices

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.price(model) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"Pricing({len(self._prices)} models)"
