"""Run rows -> point rows: the repeats of one study point collapsed into one row that carries their spread, and
every figure judged by the suspect rules.

A point is what the study repeated: the same model, precision, settings, scaling, per-worker batch and world size,
and the same point identity (point.json's ``point_id``, else its ``id`` less the ``-r<k>`` of a repeat). Of its ok
runs, each figure of :data:`INTERVAL_FIGURES` becomes the median over the repeats with an interval
(:func:`cnnscale.records.stats.interval`: min-max below 5 repeats, a bootstrap 95% interval of the median from 5 on),
as ``<figure>``, ``<figure>_lo`` and ``<figure>_hi``; the other figures are the median alone. Speedup, efficiency and
the prediction error were computed per run against the baseline run of the same repeat index
(:mod:`cnnscale.report.aggregate`), so their intervals are the ratio's own. A point measured once keeps its figure
and gets no interval (``interval`` None). A run that did not end ok stays a row of its own, with its status.

``within_noise``: the prediction lies inside the measured efficiency interval. ``suspect``: figure -> the reason a
rule of :mod:`cnnscale.records.checks` gives (a share outside [0, 1], an efficiency above 1.15 at N > 1, MFU above
100%, a negative time). Pure: rows in, rows out.
"""

from __future__ import annotations

from typing import Any

from cnnscale.records import checks
from cnnscale.records.stats import finite_values, interval, median

__all__ = ["collapse", "point_key", "suspects", "INTERVAL_FIGURES", "MEDIAN_FIGURES", "SHARES"]

INTERVAL_FIGURES = ("img_per_s", "speedup", "efficiency", "step_ms", "comm_share", "pred_error_pts")
"""Figures reported as median with bounds (``_lo``, ``_hi``) over the repeats."""
MEDIAN_FIGURES = ("pred_efficiency", "step_s", "sync_share", "data_share", "compute_share", "optim_share",
                  "peak_mem_bytes", "util_pct", "mfu", "final_loss", "test_loss", "test_acc")
"""Figures reported as the median over the repeats alone."""
SHARES = ("data_share", "compute_share", "comm_share", "optim_share", "sync_share")


def point_key(row: dict[str, Any]) -> tuple:
    """What makes runs repeats of one point: the curve (model, precision, settings, scaling, batch), the network
    profile, N, identity."""
    from_batch = row["global_batch"] if row["scaling"] == "strong" else (row["micro_batch"] or 0) * row["grad_accum"]
    return (row["model"], row["precision"], row["settings"], row["scaling"], from_batch, row.get("network") or "",
            row["world_size"], row.get("identity"))


def suspects(row: dict[str, Any]) -> dict[str, str]:
    """Figure -> reason, for each figure of ``row`` that a rule of :mod:`cnnscale.records.checks` rejects."""
    found = {}
    for key in SHARES:
        why = checks.check_share(row.get(key))
        if why:
            found[key] = why
    for key, why in (("efficiency", checks.check_efficiency(row.get("efficiency"), row.get("world_size"))),
                     ("mfu", checks.check_mfu(row.get("mfu"))), ("step_ms", checks.check_time(row.get("step_ms"))),
                     ("img_per_s", checks.check_time(row.get("step_s")))):
        if why:
            found[key] = why
    for key in ("efficiency", "img_per_s"):  # what is computed from a suspect figure is suspect too
        if key in found:
            for derived in ("speedup", "efficiency", "pred_error_pts"):
                found.setdefault(derived, found[key])
    return found


def _middle(group: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose efficiency (else img/s) is the median one (the lower middle for an even count)."""
    key = "efficiency" if any(r["efficiency"] is not None for r in group) else "img_per_s"
    ranked = sorted(group, key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0.0, r["repeat"]))
    return ranked[(len(ranked) - 1) // 2]


def _point(group: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the ok runs of one point (see the module docstring)."""
    row = dict(_middle(group))
    row["repeats"] = len(group)
    row["runs"] = [r["run"] for r in group]
    kinds, eff_iv = [], None
    for key in INTERVAL_FIGURES:
        iv = interval([r[key] for r in group])
        row[key] = iv.median if iv else None
        shown = iv is not None and iv.kind != "single"
        row[f"{key}_lo"], row[f"{key}_hi"] = (iv.lo, iv.hi) if shown else (None, None)
        if shown and key == "img_per_s":
            kinds.append(iv.kind)
        if key == "efficiency":
            eff_iv = iv
    for key in MEDIAN_FIGURES:
        vals = finite_values([r[key] for r in group])
        row[key] = median(vals) if vals else None
    row["interval"] = kinds[0] if kinds else None
    pred = row["pred_efficiency"]
    row["within_noise"] = bool(pred is not None and eff_iv is not None and eff_iv.contains(pred))
    return row


def _single(row: dict[str, Any]) -> dict[str, Any]:
    out = {**row, "repeats": 1, "runs": [row["run"]], "interval": None, "within_noise": False}
    out.update({f"{k}_{b}": None for k in INTERVAL_FIGURES for b in ("lo", "hi")})
    return out


def collapse(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point of the ok runs (in the place of its first run), one per run that did not end ok; each
    with ``suspect`` filled in."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(point_key(row), []).append(row)
    out, done = [], set()
    for row in rows:
        if row["status"] != "ok":
            out.append(_single(row))
            continue
        key = point_key(row)
        if key in done:
            continue
        done.add(key)
        group = groups[key]
        out.append(_point(group) if len(group) > 1 else _single(row))
    for row in out:
        row["suspect"] = suspects(row)
    return out
