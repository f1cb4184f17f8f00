"""perdure.providers."""

__all__: list[str] = []
