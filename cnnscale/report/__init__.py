"""report: see the modules of this package."""
