"""Helpers for property-testing your own agents' replay behaviour (perdure.testing)."""

__all__: list[str] = []
