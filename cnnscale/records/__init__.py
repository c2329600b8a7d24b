"""records: see the modules of this package."""
