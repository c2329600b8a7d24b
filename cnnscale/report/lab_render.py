"""The lab comparison (:mod:`cnnscale.report.lab`) as text that fits 80 columns, and as CSV/JSON.

Printed by ``cnnscale report DIR --predict`` when DIR holds lab points: the predicted-vs-measured table (model,
settings, N, profile, measured median and interval, predicted, error), the fitted terms and the split, the median
and worst |error| over all points and apart over the checked part and the scheduler-ruled points, the ablation (what
each term buys), and the lab's all-reduce fits per profile and N.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from cnnscale.records.io import atomic_write_text, finite, user_file_mode
from cnnscale.report.columns import fmt
from cnnscale.report.lab import LAB_COLUMNS, LabResult
from cnnscale.report.tables import fit_table
from cnnscale.scaling import fit as fitting
from cnnscale.scaling import terms as T

__all__ = ["render_lab", "lab_cells", "describe_terms", "write_lab_csv", "write_lab_json", "lab_paths", "LAB_HEADS"]

LAB_HEADS = [("point", True, 0), ("N", False, 0), ("link", True, 0), ("eff", False, 0), ("range", False, 0),
             ("pred", False, 0), ("err\npts", False, 0), ("ic", True, 2), ("set", True, 1), ("", True, 0)]
CAPTION = ("eff = measured efficiency, median over the repeats (repeat i at N over repeat i at N=1), range = its "
           "interval (min..max below 5 repeats, bootstrap 95% from 5); pred = the model on the fitted terms; err = "
           "pred - eff in points; ic = the interconnect under the prediction: fit = the all-reduce fit of the "
           "point's own profile and N, pre = preset (the profile's measured link or rate); set = the part of the "
           "split the point is in (fit or chk); ~ = within noise (pred inside the range); S = ruled by the OS "
           f"scheduler, not the link (its compute_only run at N alone loses >= {100 * fitting.COLOC_LOSS_MIN:.0f} "
           f"points and the predicted communication is < {100 * fitting.COMM_SHARE_MAX:.0f}% of the step).")


def _two(x: float | None) -> str:
    return fmt(x, ".2f")


def lab_cells(result: LabResult) -> list[list[str]]:
    """The table's cells: a model's name as a row of its own, then its points labelled by settings."""
    out, last = [], None
    for p in result.points:
        if p["model"] != last:
            out.append([p["model"]] + [""] * (len(LAB_HEADS) - 1))
            last = p["model"]
        lo, hi = p["efficiency_lo"], p["efficiency_hi"]
        flags = ("~" if p["within_noise"] else "") + ("S" if p["ruled_by"] == "scheduler" else "")
        out.append(["  " + p["settings"], str(p["world_size"]), p["network"], _two(p["efficiency"]),
                    f"{lo:.2f}..{hi:.2f}" if lo is not None and hi is not None else "", _two(p["pred"]),
                    f"{p['error_pts']:+.1f}", "fit" if p["ic_source"] == "fitted" else "pre",
                    "fit" if p["part"] == "fit" else "chk", flags])
    return out


def describe_terms(t: T.Terms) -> str:
    """The terms that are on, with their fitted values, in words."""
    parts = []
    if t.algorithm == "gloo":
        parts.append("(a) gloo's segmented ring (1 MiB segments, CPU reduction hidden behind the link)")
    if t.first_bucket or t.bucket_cost_s > 0:
        first = "a 1 MiB first bucket, " if t.first_bucket else ""
        parts.append(f"(b) DDP buckets: {first}{t.bucket_cost_s * 1e3:.2f} ms per bucket")
    if t.overlap is not None:
        parts.append(f"(c) overlap {t.overlap:.2f} of the hideable communication")
    if t.straggler:
        parts.append("(d) straggler: compute at N from the compute_only run at N (rank 0's step, not the slowest: "
                     f"per-rank times are not recorded) + {t.straggler_frac:.2f} x (N-1)/N of it")
    if t.contention is not None:
        parts.append(f"(e) contention: an all-reduce takes {1 + t.contention:.2f}x its benchmark time in training")
    if t.comm_cpu_s_per_byte is not None:
        parts.append(f"(f) comm CPU: the compute at N grows by {t.comm_cpu_s_per_byte * 1e9:.2f} ns per byte a "
                     "rank sends")
    if t.layer_timing:
        parts.append("(g) layer timing: DDP's buckets cut from the model's layers, each ready when the backward has "
                     "done its layers (by their MACs; env.json's layer table)")
    return "; ".join(parts) or "none (the base model)"


def _underdetermined(result: LabResult) -> str:
    """A warning when the fit has fewer link-ruled points than twice the values it fits."""
    free = len(fitting.free_values(result.terms))
    used = sum(p["part"] == "fit" and p["ruled_by"] == "link" for p in result.points)
    return (f"; note: {free} values fitted on {used} link-ruled point{'s' if used != 1 else ''}, too few to "
            "determine them") if free and used < 2 * free else ""


def _values(t: T.Terms) -> str:
    """The fitted values, short."""
    parts = [f"overlap {t.overlap:.2f}" if t.overlap is not None else "",
             f"{t.bucket_cost_s * 1e3:.2f} ms/bucket" if t.first_bucket or t.bucket_cost_s > 0 else "",
             f"straggler {t.straggler_frac:.2f}" if t.straggler else "",
             f"contention {t.contention:.2f}" if t.contention is not None else "",
             f"comm CPU {t.comm_cpu_s_per_byte * 1e9:.2f} ns/B" if t.comm_cpu_s_per_byte is not None else ""]
    return ", ".join(p for p in parts if p) or "nothing fitted"


def _fig(f: dict[str, Any]) -> str:
    if not f["n"]:
        return "no points"
    return f"{f['n']} point{'s' if f['n'] > 1 else ''}: median {f['median']:.1f}, worst {f['worst']:.1f}"


def _paragraph(console: Console, lines: list[str]) -> None:
    width = max(console.width - 1, 20)
    text = "\n".join(textwrap.fill(s, width, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for s in lines)
    console.print(Text(text), soft_wrap=True, highlight=False)
    console.print()


def _num(x: float | None) -> str:
    return fmt(x, ".1f", "-")


def render_lab(result: LabResult, console: Console) -> None:
    """The comparison table, the terms and split, the error figures, the ablation and the fits."""
    cells = lab_cells(result)
    fit_table(console, "lab: predicted vs measured efficiency", CAPTION, LAB_HEADS, cells)
    f = result.figures
    within = sum(p["within_noise"] for p in result.points)
    fitted = sum(p["part"] == "fit" for p in result.points)
    _paragraph(console, [
        f"- terms: {describe_terms(result.terms)}.",
        f"- split: {result.split.describe()} ({fitted} fitted, {len(result.points) - fitted} checked; "
        "scheduler-ruled points are never fitted)" + _underdetermined(result) + ". "
        + ("Fitted: b, c and e to the exposed communication DDP's hook timed, d to the efficiency."
           if result.fit_target == "hook" else "Fitted: every value to the efficiency (no hook timing).")
        + (" f to the forward+backward's growth over the compute_only run at N (where recorded)."
           if result.terms.comm_cpu_s_per_byte is not None else ""),
        f"- |error| in points, all {_fig(f['all'])}; checked {_fig(f['check'])}; fitted {_fig(f['fit'])}.",
        f"- apart: link-ruled {_fig(f['link'])}; scheduler-ruled {_fig(f['scheduler'])}.",
        f"- within noise: {within} of {len(result.points)}.",
        *(f"- cross-check: {o.describe()}: checked {_fig(fg)} (refitted: {_values(t)})."
          for o, t, fg in result.cross),
    ])
    heads = [("model variant", True, 0), ("all\nmedian", False, 0), ("all\nworst", False, 0),
             ("check\nmedian", False, 0), ("check\nworst", False, 0), ("sched\nmedian", False, 1)]
    rows = [[name, _num(fg["all"]["median"]), _num(fg["all"]["worst"]), _num(fg["check"]["median"]),
             _num(fg["check"]["worst"]), _num(fg["scheduler"]["median"])] for name, _, fg in result.ablation]
    fit_table(console, "lab: what each term buys (|error| in points, each variant refitted on the split)",
              "base model = ring α-β on the point's interconnect, compute at N = compute at 1, no overlap.",
              heads, rows)
    if result.fits:
        fheads = [("profile", True, 0), ("N", False, 0), ("ring α\nµs", False, 0), ("ring\nMB/s", False, 0),
                  ("gloo α\nµs/msg", False, 0), ("gloo\nMB/s", False, 0), ("link\nMB/s", False, 1)]
        frows = [[r["profile"], str(r["world_size"]), f"{r['ring_alpha_us']:.1f}", f"{r['ring_MBps']:.1f}",
                  f"{r['gloo_alpha_us']:.1f}", f"{r['gloo_MBps']:.1f}", _num(r["link_MBps"])] for r in result.fits]
        fit_table(console, "lab: all-reduce fits per profile and N",
                  "ring: t = 2(N-1)α + 2(N-1)/N·bytes/bw; gloo: α per 1 MiB-or-less message of gloo's ring; "
                  "link = the shaped link's measured TCP bandwidth.", fheads, frows)


def lab_paths(path: str | Path) -> Path:
    """Where the lab rows go beside the report's ``--csv``/``--json`` file: ``NAME-lab.EXT``."""
    p = Path(path)
    return p.with_name(f"{p.stem}-lab{p.suffix}")


def write_lab_csv(result: LabResult, path: str | Path) -> None:
    """One line per lab point, the columns of :data:`cnnscale.report.lab.LAB_COLUMNS`."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=LAB_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(result.points)
    atomic_write_text(path, buf.getvalue(), mode=user_file_mode())


def _terms_dict(t: T.Terms) -> dict[str, Any]:
    return {"label": t.label(), "algorithm": t.algorithm, "first_bucket": t.first_bucket,
            "bucket_cost_s": t.bucket_cost_s, "overlap": t.overlap, "straggler": t.straggler,
            "straggler_frac": t.straggler_frac, "contention": t.contention,
            "comm_cpu_s_per_byte": t.comm_cpu_s_per_byte}


def write_lab_json(result: LabResult, path: str | Path) -> None:
    """The points, the fitted terms, the split, the error figures, the ablation and the fits as one JSON object."""
    doc = {"points": [{k: p.get(k) for k in LAB_COLUMNS} for p in result.points],
           "cross_checks": [{"kind": o.kind, "fit_on": list(o.values), "terms": _terms_dict(t), "checked": fg}
                            for o, t, fg in result.cross],
           "terms": _terms_dict(result.terms), "split": {"kind": result.split.kind,
                                                         "fit_on": list(result.split.values)},
           "figures": result.figures,
           "ablation": [{"variant": n, "terms": _terms_dict(t), "figures": fg} for n, t, fg in result.ablation],
           "fits": result.fits}
    atomic_write_text(path, json.dumps(finite(doc), indent=2, allow_nan=False) + "\n", mode=user_file_mode())
