"""The run directory as files: typed, versioned records (schema: Env, Summary, Point) on a small record base,
atomic writes and metrics.jsonl (io), environment capture (env) and loading run directories for reports (run)."""

__all__: list[str] = []
