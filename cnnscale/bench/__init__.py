"""bench: see the modules of this package."""
