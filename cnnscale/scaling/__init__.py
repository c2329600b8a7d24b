"""scaling: see the modules of this package."""
