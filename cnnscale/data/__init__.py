"""data: see the modules of this package."""
