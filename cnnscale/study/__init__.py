"""study: see the modules of this package."""
