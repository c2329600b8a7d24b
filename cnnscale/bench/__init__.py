"""``cnnscale bench``: :mod:`.run` (the command), :mod:`.options` (flags, goals), :mod:`.harness` (one model's
cnnscale and bare sides), :mod:`.ratios` (the side-by-side ratios), :mod:`.output` (tables and the JSON document)."""

__all__: list[str] = []
