"""A model's counts on the meta device (FLOPs, parameters, activations), counted once per host and cached.

MFU needs a model's FLOPs per training image (:func:`cnnscale.profile.flops.count_flops`: forward and backward on
the meta device under ``FlopCounterMode``), and the memory check before a run needs its parameters and activation
elements per image (:func:`cnnscale.data.fits.model_bytes`: a meta forward). On the meta device every element-wise
op goes through torch's Python reference kernels, so these cost CPU time: for MobileNetV2 about 1.4 s (FLOPs) and
0.5 s (activations), for ResNet-18 0.4 s and 0.15 s, on a 2-core box; paid by every rank of every run, the two
ranks of a point at once, competing for the cores. The counts are a pure function of the model's code and
configuration, so they are cached:

- under the cache directory (:func:`cnnscale.profile.peakcache.cache_dir`), in ``counts/``, one strict JSON file
  per key, replaced atomically (a reader never sees half of it; two ranks that miss at once both count and write
  the same numbers);
- keyed by what is counted, model name, ``num_classes``, ``width_mult``, input shape, torch version and a digest
  of the source files the counts depend on (the model's own module, every module of :mod:`cnnscale.models`,
  :mod:`cnnscale.profile.flops` and :mod:`cnnscale.data.fits`), so that editing a model or a counter counts again.
  A model whose source cannot be read (defined in ``__main__`` or a notebook) is counted every time;
- a cache that cannot be read or written (read-only home) costs only the count.

No torch here: the counting itself is the caller's (``count``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnscale.profile.peakcache import cache_dir, torch_version
from cnnscale.records.io import write_json

__all__ = ["COUNTS_DIR", "count_key", "cached_counts", "source_digest"]

COUNTS_DIR = "counts"
"""The cache directory's sub-directory for model counts."""
_PACKAGE = Path(__file__).resolve().parent.parent  # cnnscale/
_COUNTERS = ("profile/flops.py", "profile/layers.py", "data/fits.py")  # the code that counts, beside the models' own


@functools.lru_cache(maxsize=64)
def source_digest(model_file: str | None) -> str | None:
    """sha1 of the source files a model's counts depend on: ``model_file`` (its builder's module), every
    ``cnnscale/models/*.py`` and the counters; None when ``model_file`` is None or a file cannot be read. Costs
    reading about ten small files, once per process."""
    if model_file is None:
        return None
    files = sorted({Path(model_file).resolve(), *(_PACKAGE / "models").glob("*.py"),
                    *(_PACKAGE / f for f in _COUNTERS)})
    digest = hashlib.sha1()
    try:
        for f in files:
            digest.update(str(f.relative_to(_PACKAGE) if f.is_relative_to(_PACKAGE) else f).encode() + b"\0")
            digest.update(f.read_bytes() + b"\0")
    except OSError:
        return None
    return digest.hexdigest()


def count_key(what: str, name: str, num_classes: int | None, width_mult: float | None, shape: tuple[int, ...],
              builder: Callable[..., Any]) -> dict[str, Any] | None:
    """The cache key (a JSON-able dict) of counting ``what`` for model ``name`` built by ``builder``; None when
    the builder's source file cannot be found (then nothing is cached)."""
    try:
        model_file = inspect.getsourcefile(builder)
    except TypeError:  # a builtin or C-defined callable
        model_file = None
    digest = source_digest(model_file)
    if digest is None:
        return None
    return {"what": what, "model": name, "num_classes": num_classes, "width_mult": width_mult,
            "input_shape": list(shape), "torch": torch_version(), "source_sha1": digest}


def _path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{key['model']}-{key['what']}")[:60]
    return cache_dir() / COUNTS_DIR / f"{safe}-{digest}.json"


def _read(key: dict[str, Any], names: set[str] | None) -> dict[str, float] | None:
    try:
        entry = json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None
    counts = entry.get("counts") if isinstance(entry, dict) and entry.get("key") == key else None
    if not isinstance(counts, dict) or (names is not None and set(counts) != names):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in counts.values()):
        return None
    return {k: float(v) for k, v in counts.items()}


def cached_counts(key: dict[str, Any] | None, count: Callable[[], dict[str, float]],
                  names: tuple[str, ...] | None = None) -> dict[str, float]:
    """The counts of ``key``: the cached entry (which must hold exactly ``names``, when given), else ``count()``,
    written for the next process (a key of None: always ``count()``). A corrupt or foreign entry is counted again
    and replaced; counts that are not all positive (a model the meta device cannot run) are not cached; a cache
    that cannot be written still returns the count."""
    if key is None:
        return count()
    hit = _read(key, set(names) if names is not None else None)
    if hit is not None:
        return hit
    counts = count()
    if counts and all(v > 0 for v in counts.values()):
        try:
            write_json(_path(key), {"key": key, "counts": counts})
        except OSError:
            pass
    return counts
