"""records: see the modules of this package."""

__all__: list[str] = []
