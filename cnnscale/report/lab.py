"""The lab comparison: every lab point's measured efficiency beside the scaling model's prediction on the fitted
terms, and the error figures (``cnnscale report DIR --predict``).

A lab point is an ok point row (:func:`cnnscale.report.aggregate.aggregate`) with a network profile, N > 1 and
not a compute_only calibration. Its measured efficiency (median and interval) is the row's: repeat i at N over
repeat i of the N=1 baseline, which has no profile (:mod:`cnnscale.records.stats`). For the model it becomes a
:class:`cnnscale.scaling.fit.Case`: the N=1 step time (median over repeats) as the compute time, the compute_only
calibration at the same N (median step), the gradient bytes (parameters x 4, x 2 under an fp16/bf16 hook), the
bucket size from config.yaml, and the interconnect of its own profile and N: ``fitted`` from the lab's
``allreduce-<profile>-ws<N>.json`` (in the ring form and in gloo's), else ``preset`` (the profile's measured link
or its rate; :func:`cnnscale.report.load.profile_preset`).

The terms (:mod:`cnnscale.scaling.terms`: a gloo ring, b DDP buckets, c overlap, d straggler, e contention, f comm
CPU) are fitted on one part of the matrix and checked on the other (:class:`cnnscale.scaling.fit.Split`, by default
N in {2, 4} fitted and N=3 checked): f to the forward+backward's growth against the compute_only calibration (median
compute share x median step of each), b, c and e to the exposed communication DDP's hook timed (the median comm
share x the median step) where it timed it, d to the efficiency (:func:`cnnscale.scaling.fit.fit_terms`). The ablation
refits without each term in turn, so each line shows what that term buys; the cross-checks refit on other splits.
Points ruled by the scheduler (:func:`cnnscale.scaling.fit.scheduler_ruled`) are in every figure and also apart.
Pure: rows and runs in, a result out. Cost: about 0.1 s per fit (nine fits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records.run import Run
from cnnscale.report.aggregate import group_key
from cnnscale.report.columns import variant_label
from cnnscale.report.load import LAB_WEIGHT_POWER, lab_fit, pick_interconnect, profile_order, run_params
from cnnscale.scaling import fit as fitting
from cnnscale.scaling import model as scaling
from cnnscale.scaling import terms as T

__all__ = ["LabResult", "lab_cases", "compare", "lab_result", "parse_split", "parse_terms", "ALL_TERMS",
           "DEFAULT_SPLIT", "LAB_COLUMNS"]

ALL_TERMS = T.Terms(algorithm="gloo", first_bucket=True, overlap=0.0, straggler=True, contention=0.0,
                    comm_cpu_s_per_byte=0.0, layer_timing=True)
"""Every term on, before fitting (overlap, bucket cost, straggler share, contention and comm CPU start at 0)."""
DEFAULT_SPLIT = fitting.Split("n", (2, 4))
LAB_COLUMNS = ("model", "settings", "network", "world_size", "repeats", "efficiency", "efficiency_lo",
               "efficiency_hi", "pred", "pred_base", "error_pts", "within_noise", "interconnect", "ic_source",
               "part", "ruled_by", "compute1_ms", "computeN_ms", "grad_mb", "bucket_mb", "exposed_ms",
               "pred_exposed_ms", "fwd_bwd_ms", "calib_fwd_bwd_ms")
"""The lab export's columns (CSV/JSON), one row per lab point; ``exposed_ms``: the exposed communication per step
that DDP's hook measured (the median comm share x the median step), beside the model's (``pred_exposed_ms``);
``fwd_bwd_ms`` and ``calib_fwd_bwd_ms``: the forward+backward per step of the point and of its compute_only run
(term f's fit: the growth between them)."""


@dataclass
class LabResult:
    """Per point (:data:`LAB_COLUMNS`), the fitted terms, the split, the error figures and the ablation."""

    points: list[dict[str, Any]]
    terms: T.Terms
    split: fitting.Split
    figures: dict[str, dict[str, Any]]
    ablation: list[tuple[str, T.Terms, dict[str, dict[str, Any]]]]
    fits: list[dict[str, Any]] = field(default_factory=list)
    fit_target: str = "efficiency"
    """What the communication's values were fitted to: ``hook`` (DDP's hook timing) or ``efficiency``."""
    cross: list[tuple[fitting.Split, T.Terms, dict[str, Any]]] = field(default_factory=list)
    """Other splits (:func:`other_splits`), each refitted: its terms and the error figures of its checked part."""


def parse_terms(text: str) -> T.Terms:
    """``--terms``: letters of :data:`cnnscale.scaling.terms.TERM_NAMES` (``abcdefg``, ``ad``) or ``none``."""
    if text == "none":
        return T.BASE
    if not text or any(c not in T.TERM_NAMES for c in text):
        raise UserError(f"--terms {text!r}: letters of {''.join(T.TERM_NAMES)} (choose from: "
                        + ", ".join(f"{k} {v}" for k, v in T.TERM_NAMES.items()) + ") or none")
    terms = ALL_TERMS
    for c in T.TERM_NAMES:
        if c not in text:
            terms = T.without(terms, c)
    return terms


def parse_split(text: str) -> fitting.Split:
    """``--fit-on``: ``n=2,4`` or ``profile=10gbit,1gbit`` (the fitted part; the rest is checked)."""
    kind, _, values = text.partition("=")
    if kind not in fitting.SPLIT_KINDS or not values:
        raise UserError(f"--fit-on {text!r}: KIND=V1,V2 (choose from: {', '.join(fitting.SPLIT_KINDS)}), "
                        "e.g. n=2,4 or profile=10gbit,1gbit")
    parts = [v for v in values.split(",") if v]
    if kind == "n":
        if not all(v.isdigit() for v in parts):
            raise UserError(f"--fit-on {text!r}: N must be whole numbers, e.g. n=2,4")
        return fitting.Split("n", tuple(int(v) for v in parts))
    return fitting.Split("profile", tuple(parts))


def _calibrations(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """compute_only rows (their median step and compute share) by (model, precision, per-worker batch, N)."""
    out = {}
    for r in rows:
        if r["status"] == "ok" and "compute_only" in r["settings"] and r["step_s"]:
            out.setdefault((r["model"], r["precision"], _batch(r), r["world_size"]), r)
    return out


def _compute_s(r: dict[str, Any] | None) -> float | None:
    """The forward+backward time per step of row ``r``: the median compute share x the median step (None when
    either is missing)."""
    if not r or r.get("compute_share") is None or not r.get("step_s"):
        return None
    return r["compute_share"] * r["step_s"]


def _batch(r: dict[str, Any]) -> int:
    return (r["micro_batch"] or 0) * r["grad_accum"]


def _baselines(rows: list[dict[str, Any]]) -> dict[tuple, float]:
    """N=1 step (s) by curve (group key), and by (model, precision, batch) for a settings variant without one."""
    out: dict[tuple, float] = {}
    for r in rows:
        if r["status"] == "ok" and r["world_size"] == 1 and r["step_s"] and "compute_only" not in r["settings"]:
            out.setdefault(group_key(r), r["step_s"])
            if r["settings"] == "default":
                out.setdefault((r["model"], r["precision"], _batch(r)), r["step_s"])
    return out


def _hook_exposed_s(r: dict[str, Any]) -> float | None:
    """The exposed communication per step DDP's hook timed: the median comm share x the median step (None when the
    no_sync probe, not the hook, timed it)."""
    if r.get("comm_source") != "hook" or r.get("comm_share") is None or not r.get("step_s"):
        return None
    return r["comm_share"] * r["step_s"]


def _interconnects(run: Run, fits: dict[str, dict[str, Any]], profile: str, n: int
                   ) -> tuple[dict[str, scaling.Interconnect], str]:
    """The point's interconnect in the ring and the gloo form, and ``fitted`` or ``preset``."""
    ring = pick_interconnect(run, fits, None)
    fit = lab_fit(run, fits, profile, n)
    if fit is None:
        return {"ring": ring, "gloo": ring}, "preset"
    gloo = T.fit_gloo(fit["sizes_bytes"], fit["times_s"], int(fit.get("world_size") or n), name=ring.name,
                      weight_power=LAB_WEIGHT_POWER)
    return {"ring": ring, "gloo": gloo}, "fitted"


def lab_cases(runs: list[Run], rows: list[dict[str, Any]], fits: dict[str, dict[str, Any]],
              warnings: list[str] | None = None) -> list[tuple[dict[str, Any], fitting.Case, str]]:
    """(row, case, ic source) per lab point (see the module docstring); a point the model cannot take (no N=1
    baseline, no parameter count) is left out with one warning."""
    by_path = {r.path: r for r in runs}
    calib, bases = _calibrations(rows), _baselines(rows)
    out, missing = [], set()
    for r in rows:
        if (r["status"] != "ok" or not r.get("network") or r["world_size"] <= 1 or "compute_only" in r["settings"]
                or r["efficiency"] is None):
            continue
        run = by_path[r["run"]]
        step1 = bases.get(group_key(r)) or bases.get((r["model"], r["precision"], _batch(r)))
        params = run_params(run)
        if not step1 or not params:
            if warnings is not None:
                warnings.append(f"{run.path}: no N=1 baseline or no parameter count; left out of the lab comparison")
            continue
        dist = run.config.get("dist") or {}
        ics, source = _interconnects(run, fits, r["network"], r["world_size"])
        ckey = (r["model"], r["precision"], _batch(r), r["world_size"])
        if ckey not in calib and ckey not in missing:
            missing.add(ckey)
            if warnings is not None:
                warnings.append(f"{r['model']} N={r['world_size']}: no compute_only calibration; term (d) takes the "
                                "compute time at N from N=1 there")
        hook = dist.get("comm_hook", "none")
        crow = calib.get(ckey)
        case = fitting.Case(f"{r['model']} {variant_label(r)} N={r['world_size']}", r["world_size"], r["network"],
                            scaling.grad_bytes(params, hook), float(dist.get("bucket_mb", 25)), step1,
                            crow["step_s"] if crow else None, ics, r["efficiency"], scaling.grad_bytes(params) /
                            scaling.grad_bytes(params, hook), 4.0 * (run.env.largest_layer_params or 0),
                            _hook_exposed_s(r), _compute_s(r), _compute_s(crow),
                            tuple(tuple(float(v) for v in row) for row in (run.env.layers or ())))
        out.append((r, case, source))
    return out


def _figures(points: list[dict[str, Any]], key: str = "error_pts") -> dict[str, dict[str, Any]]:
    """Error figures over all points, the checked and the fitted part, the link- and the scheduler-ruled."""
    parts = {"all": points, "check": [p for p in points if p["part"] == "check"],
             "fit": [p for p in points if p["part"] == "fit"],
             "link": [p for p in points if p["ruled_by"] == "link"],
             "scheduler": [p for p in points if p["ruled_by"] == "scheduler"]}
    return {k: fitting.error_figures([p[key] for p in v]) for k, v in parts.items()}


def _point(row: dict[str, Any], case: fitting.Case, source: str, terms: T.Terms, split: fitting.Split
           ) -> dict[str, Any]:
    pred = fitting.predict(case, terms)
    lo, hi = row.get("efficiency_lo"), row.get("efficiency_hi")
    return {"model": row["model"], "settings": variant_label({**row, "network": ""}), "network": row["network"],
            "world_size": row["world_size"], "repeats": row["repeats"], "efficiency": row["efficiency"],
            "efficiency_lo": lo, "efficiency_hi": hi, "pred": pred, "pred_base": fitting.predict(case, T.BASE),
            "error_pts": 100 * (pred - row["efficiency"]),
            "within_noise": bool(lo is not None and hi is not None and lo <= pred <= hi),
            "interconnect": case.ics["ring"].name, "ic_source": source,
            "part": "fit" if split.fits(case) else "check",
            "ruled_by": "scheduler" if fitting.scheduler_ruled(case) else "link",
            "compute1_ms": 1000 * case.compute1_s,
            "computeN_ms": 1000 * case.computeN_s if case.computeN_s else None,
            "grad_mb": case.nbytes / 1e6, "bucket_mb": case.bucket_mb, "run": row["run"],
            "exposed_ms": 1000 * case.measured_exposed_s if case.measured_exposed_s is not None else None,
            "pred_exposed_ms": 1000 * fitting.predict_exposed_s(case, terms),
            "fwd_bwd_ms": _ms(case.measured_compute_s), "calib_fwd_bwd_ms": _ms(case.calib_compute_s)}


def _ms(s: float | None) -> float | None:
    return 1000 * s if s is not None else None


def _ordered(entries: list[tuple[dict[str, Any], fitting.Case, str]]
             ) -> list[tuple[dict[str, Any], fitting.Case, str]]:
    """Model and settings in the report's order, then the profiles fastest first, then N."""
    first: dict[tuple, int] = {}
    for i, (r, _, _) in enumerate(entries):
        first.setdefault((r["model"], r["settings"], r["precision"]), i)
    rank = {p: i for i, p in enumerate(profile_order({c.profile for _, c, _ in entries}))}
    return sorted(entries, key=lambda e: (first[e[0]["model"], e[0]["settings"], e[0]["precision"]],
                                          rank[e[1].profile], e[1].n))


def compare(entries: list[tuple[dict[str, Any], fitting.Case, str]], terms: T.Terms = ALL_TERMS,
            split: fitting.Split = DEFAULT_SPLIT) -> LabResult:
    """Fit ``terms`` on ``split``, predict every point, and the ablation: the base model, every term, and every
    term but one (each refitted), each with its error figures."""
    entries = _ordered(entries)
    cases = [c for _, c, _ in entries]
    fitted = fitting.fit_terms(cases, terms, split)
    points = [_point(r, c, s, fitted, split) for r, c, s in entries]
    ablation = []
    variants = [("base model (no term)", T.BASE), (f"terms {terms.label()}", terms)]
    variants += [(f"without ({k}) {T.TERM_NAMES[k]}", T.without(terms, k)) for k in T.TERM_NAMES
                 if T.without(terms, k) != terms]
    for name, v in variants:
        vt = fitted if v == terms else fitting.fit_terms(cases, v, split)
        errs = [{**p, "e": 100 * (fitting.predict(c, vt) - p["efficiency"])} for p, c in zip(points, cases)]
        ablation.append((name, vt, _figures(errs, "e")))
    cross = []
    for other in other_splits(cases, split):
        ot = fitting.fit_terms(cases, terms, other)
        errs = [100 * (fitting.predict(c, ot) - c.measured) for c in cases if not other.fits(c)]
        cross.append((other, ot, fitting.error_figures(errs)))
    return LabResult(points, fitted, split, _figures(points), ablation, fit_target=fitting.fit_target(cases, split),
                     cross=cross)


def other_splits(cases: list[fitting.Case], split: fitting.Split) -> list[fitting.Split]:
    """Cross-checks beside ``split``: fit on every profile but the slowest (then but the fastest), and fit on N in
    {2, 4}; only those that leave both a fitted and a checked part, and not ``split`` itself."""
    profiles = profile_order({c.profile for c in cases})
    ns = {c.n for c in cases}
    found = []
    if len(profiles) > 1:
        found += [fitting.Split("profile", tuple(profiles[:-1])), fitting.Split("profile", tuple(profiles[1:]))]
    if len(ns) > 1:
        found.append(fitting.Split("n", tuple(n for n in (2, 4) if n in ns)))
    return [s for s in found if s != split and any(s.fits(c) for c in cases) and not all(s.fits(c) for c in cases)]


def _fit_rows(runs: list[Run], fits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The lab's all-reduce fits (profile, N, α and bandwidth in both forms, the measured link)."""
    out, seen = [], set()
    for key, fit in sorted(fits.items()):
        name = Path(key).name
        if not (name.startswith("allreduce-") and "-ws" in name) or not fit.get("sizes_bytes"):
            continue
        n = int(fit.get("world_size") or name.rsplit("-ws", 1)[1].split(".")[0])
        profile = fit.get("profile") or name[len("allreduce-"):].rsplit("-ws", 1)[0]
        if (profile, n) in seen:
            continue
        seen.add((profile, n))
        ring = scaling.fit_alpha_beta(fit["sizes_bytes"], fit["times_s"], n, weight_power=LAB_WEIGHT_POWER)
        gloo = T.fit_gloo(fit["sizes_bytes"], fit["times_s"], n, weight_power=LAB_WEIGHT_POWER)
        link = fit.get("link") if isinstance(fit.get("link"), dict) else {}
        out.append({"profile": profile, "world_size": n, "ring_alpha_us": ring.latency_s * 1e6,
                    "ring_MBps": ring.bandwidth_Bps / 1e6, "gloo_alpha_us": gloo.latency_s * 1e6,
                    "gloo_MBps": gloo.bandwidth_Bps / 1e6, "link_MBps": (link.get("bandwidth_Bps") or 0) / 1e6
                    or None, "sizes": len(fit["sizes_bytes"])})
    return sorted(out, key=lambda r: (r["profile"], r["world_size"]))


def lab_result(runs: list[Run], rows: list[dict[str, Any]], fits: dict[str, dict[str, Any]],
               terms: T.Terms = ALL_TERMS, split: fitting.Split = DEFAULT_SPLIT,
               warnings: list[str] | None = None) -> LabResult | None:
    """The comparison of every lab point under ``runs`` (None when there is none)."""
    entries = lab_cases(runs, rows, fits, warnings)
    if not entries:
        return None
    result = compare(entries, terms, split)
    result.fits = _fit_rows(runs, fits)
    return result
