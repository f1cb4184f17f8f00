"""perdure.actors."""

__all__: list[str] = []
