"""Figures that cannot be true: the one place that says which, and why (report, bench and study all ask here).

Each rule takes a figure as the records state it and returns a reason (one short phrase, for a footnote) or None
when the figure passes. A figure that fails is shown as "suspect" with that reason, never printed as fact.

- a **share** (a fraction of the step or of the training time) outside [0, 1];
- an **efficiency** above :data:`EFFICIENCY_LIMIT` at N > 1: more than linear scaling by more than noise explains
  (a cache effect can give a few percent, not 15);
- an **MFU** above 100% (a fraction above 1: the peak it is measured against is wrong, or the FLOPs are);
- a negative **time** (seconds or milliseconds).

A value that is not a finite number is not judged here (None: nothing to say); the reader shows it as n/a.
Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["check_share", "check_efficiency", "check_mfu", "check_time", "check", "EFFICIENCY_LIMIT", "KINDS"]

EFFICIENCY_LIMIT = 1.15
"""Above this efficiency at N > 1 a figure is suspect."""


def _number(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def check_share(x: object) -> str | None:
    """A share outside [0, 1] (``x`` a fraction)."""
    v = _number(x)
    if v is None or 0.0 <= v <= 1.0:
        return None
    return f"share {100 * v:.1f}% is outside 0-100%"


def check_efficiency(x: object, world_size: object) -> str | None:
    """An efficiency above :data:`EFFICIENCY_LIMIT` at more than one process (and a negative one anywhere)."""
    v, n = _number(x), _number(world_size)
    if v is None:
        return None
    if v < 0:
        return f"efficiency {v:.2f} is negative"
    if n is not None and n > 1 and v > EFFICIENCY_LIMIT:
        return f"efficiency {v:.2f} is above {EFFICIENCY_LIMIT:.2f} at N={n:g} (more than linear)"
    return None


def check_mfu(x: object) -> str | None:
    """An MFU above 100% (``x`` a fraction), or below zero."""
    v = _number(x)
    if v is None or 0.0 <= v <= 1.0:
        return None
    return f"MFU {100 * v:.1f}% is " + ("above 100% (wrong peak or FLOPs)" if v > 1 else "negative")


def check_time(x: object) -> str | None:
    """A negative time (any unit)."""
    v = _number(x)
    if v is None or v >= 0:
        return None
    return f"time {v:g} is negative"


KINDS: dict[str, Callable[..., str | None]] = {"share": check_share, "efficiency": check_efficiency,
                                               "mfu": check_mfu, "time": check_time}
"""Rule name -> rule. ``efficiency`` also takes the world size."""


def check(kind: str, value: object, world_size: object = None) -> str | None:
    """The rule ``kind`` (one of :data:`KINDS`) applied to ``value``: a reason, or None when it passes."""
    if kind not in KINDS:
        raise ValueError(f"unknown check {kind!r} (choose from: {', '.join(KINDS)})")
    if kind == "efficiency":
        return check_efficiency(value, world_size)
    return KINDS[kind](value)
