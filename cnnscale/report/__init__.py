"""Reports: run records -> rows (load, aggregate) -> rich tables and verdicts, predictions from the scaling model,
plots and CSV/JSON/HTML exports. Reads only run directories: no torch, never builds a model."""

__all__: list[str] = []
