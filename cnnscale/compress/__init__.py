"""compress: see the modules of this package."""
