"""Run records -> flat rows (one per run; also the CSV/JSON export rows) with speedup, efficiency and prediction.

Throughput is the run's ``img_per_s`` (images over time). Rows are grouped by model, precision, settings variant and
per-worker batch (weak scaling; the global batch for strong scaling); a lab point's network profile (``network``)
keeps its points apart, and all of a curve's profiles share the one N=1 baseline, which has none. Against the
group's smallest world size N0: ``speedup = tput(N) / tput(N0)`` and ``efficiency = tput(N) · N0 / (N · tput(N0))``
(with N0 = 1, the textbook ``tput(N) / (N · tput(1))``). ``pred`` is the scaling model's efficiency
(:mod:`cnnscale.scaling.model`) from N0's measured step time, the gradient bytes (the parameter count the records
state) and the interconnect; ``err`` is pred - measured, in points.

Repeats: every run is a row first, and speedup, efficiency and the prediction are computed per run against the
baseline run of the **same repeat index** (repeat i at N against repeat i at N0; a repeat whose partner at N0 did not
end ok is measured against the median N0 run). :func:`cnnscale.report.points.collapse` then makes one row per point,
each figure the median over its repeats with the interval of the per-run values. Pure: no files beyond what was
loaded, no torch.
"""

from __future__ import annotations

from typing import Any

from cnnscale.records.run import Run
from cnnscale.records.stats import median
from cnnscale.report.load import (
    pick_interconnect,
    run_model,
    run_network,
    run_params,
    run_status,
    run_world_size,
    settings_label,
    status_note,
)
from cnnscale.report.points import INTERVAL_FIGURES, collapse
from cnnscale.scaling import model as scaling

__all__ = ["aggregate", "run_rows", "group_key", "identity", "COLUMNS", "PHASES"]

COLUMNS = ("model", "settings", "precision", "scaling", "world_size", "num_nodes", "micro_batch", "grad_accum",
           "global_batch", "status", "img_per_s", "speedup", "efficiency", "pred_efficiency", "pred_error_pts",
           "step_ms", "sync_share", "peak_mem_bytes", "mem_kind", "util_pct", "util_kind", "mfu", "final_loss",
           "test_acc", "interconnect", "error", "run", "data_share", "compute_share", "optim_share", "comm_share",
           "step_s", "repeats", "test_loss", "steps", "params", "comm_hook", "network",
           *(f"{k}_{b}" for k in INTERVAL_FIGURES for b in ("lo", "hi")), "interval", "within_noise", "suspect")
"""The export columns: one row per point; ``<figure>_lo``/``_hi`` bound the figures of :data:`INTERVAL_FIGURES`
(null when the point ran once), ``interval`` says how (min-max, bootstrap95), ``suspect`` maps a figure to the
reason it is suspect."""

PHASES = ("data", "compute", "comm", "optim")
"""The step-time split: data wait, forward+backward (sync excluded), exposed gradient all-reduce, optimiser."""


def group_key(row: dict[str, Any]) -> tuple:
    """(model, precision, settings, scaling, batch): the rows one efficiency curve is made of; batch is the
    per-worker batch (micro-batch x accumulation) under weak scaling, the global batch under strong scaling."""
    batch = row["global_batch"] if row["scaling"] == "strong" else (row["micro_batch"] or 0) * row["grad_accum"]
    return row["model"], row["precision"], row["settings"], row["scaling"], batch


def _base_key(row: dict[str, Any]) -> tuple:
    """The group whose smallest world size is this row's baseline. A compute_only calibration row is measured
    against the real runs of the same settings, so its efficiency is the co-location loss alone."""
    model, prec, settings, scal, batch = group_key(row)
    stripped = ",".join(p for p in settings.split(",") if p != "compute_only") or "default"
    return model, prec, stripped, scal, batch


def _sort_key(row: dict[str, Any]) -> tuple:
    """Model, then default settings and fp32 first, then batch, network profile (none first) and world size."""
    model, prec, settings, scal, batch = group_key(row)
    return (model, settings != "default", settings, prec != "no", prec, scal, batch or 0, row.get("network") or "",
            row["world_size"], row["run"])


def identity(run: Run) -> str | None:
    """The study point a run repeats: point.json's ``point_id``, else its ``id`` less a repeat's ``-r<k>``; None
    outside a study."""
    p = run.point
    if p is None:
        return None
    pid = getattr(p, "point_id", None)
    if pid:
        return pid
    suffix = f"-r{p.repeat}"
    return p.id[: -len(suffix)] if p.repeat and p.id.endswith(suffix) else p.id


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _base_row(run: Run) -> dict[str, Any]:
    """The row's own figures, from summary.json, the study's point.json and env.json."""
    s, p, env = run.summary, run.point, run.env
    get = (lambda k: getattr(s, k)) if s is not None else (lambda k: None)
    pget = (lambda k: getattr(p, k)) if p is not None else (lambda k: None)
    gpu = get("max_memory_allocated_bytes") is not None
    util = get("gpu_util_pct_mean")
    failed_point = p is not None and p.status != "ok"
    status = run_status(run)
    error = pget("error") if failed_point else _first(get("error"), pget("error"))
    return {
        "model": run_model(run), "settings": settings_label(run),
        "precision": _first(get("mixed_precision"), pget("precision")) or "no",
        "scaling": pget("scaling") or "weak", "world_size": run_world_size(run), "num_nodes": env.num_nodes or 1,
        "micro_batch": _first(get("micro_batch"), pget("micro_batch")),
        "grad_accum": _first(get("grad_accum"), pget("grad_accum")) or 1,
        "global_batch": _first(get("global_batch"), pget("global_batch")), "status": status,
        "img_per_s": get("img_per_s"), "step_ms": get("step_ms_p50"), "sync_share": get("sync_share"),
        "peak_mem_bytes": get("max_memory_allocated_bytes") if gpu else get("peak_rss_bytes"),
        "mem_kind": "gpu" if gpu else "rss", "util_pct": util if util is not None else get("cpu_percent"),
        "util_kind": "gpu" if util is not None else "cpu", "mfu": get("mfu"), "final_loss": get("final_loss"),
        "test_acc": get("test_acc"), "error": error if error is not None else status_note(run, status),
        "run": run.path, "speedup": None, "efficiency": None, "pred_efficiency": None, "pred_error_pts": None,
        "interconnect": None, "pred_calibrated": False, "test_loss": get("test_loss"), "steps": get("steps"),
        "params": run_params(run), "comm_hook": (run.config.get("dist") or {}).get("comm_hook", "none"),
        "comm_source": "hook" if get("comm_timed_hook") else "probe",  # how the exposed communication was timed
        "repeat": p.repeat if p is not None else 0, "identity": identity(run), "repeats": 1, "step_s": None,
        "network": run_network(run),
        **_split(s),
    }


def _split(s: Any) -> dict[str, float | None]:
    """Shares of the training time per phase (:data:`PHASES`) from summary.json's phase totals, over the run's
    train_time_s (so ``comm_share`` is the profiler's ``sync_share``), or over the phases' sum when that is absent
    or smaller; None for a run that recorded no split."""
    none = {f"{p}_share": None for p in PHASES}
    if s is None or s.fwd_bwd_s is None:
        return none
    parts = {"data": s.data_wait_s or 0.0, "compute": s.fwd_bwd_s, "comm": s.sync_s, "optim": s.optim_s or 0.0}
    total = max(s.train_time_s or 0.0, sum(v for v in parts.values() if v is not None))
    if total <= 0:
        return none
    return {f"{k}_share": (v / total if v is not None else None) for k, v in parts.items()}


def _coloc_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["precision"], row["micro_batch"], row["grad_accum"], row["world_size"]


def _colocated_steps(pairs: list[tuple[dict[str, Any], Run]]) -> dict[tuple, dict[int, float]]:
    """Step time (s) of ``dist.compute_only`` calibration runs by repeat: N processes sharing the machine, no
    all-reduce."""
    out: dict[tuple, dict[int, float]] = {}
    for row, run in pairs:
        if row["status"] == "ok" and row["step_s"] and (run.config.get("dist") or {}).get("compute_only"):
            out.setdefault(_coloc_key(row), {}).setdefault(row["repeat"], row["step_s"])
    return out


def _predict(run: Run, params: int, base: dict[str, Any], row: dict[str, Any], ic: scaling.Interconnect,
             coloc_step_s: float | None = None) -> float:
    """Predicted efficiency of ``row`` against ``base`` (see the module docstring). ``coloc_step_s``: the measured
    step time of N processes sharing the machine without communication (a compute_only run); when given, it is the
    compute time at N instead of the single-worker one, so the model predicts only the communication."""
    dist = run.config.get("dist") or {}
    nbytes = scaling.grad_bytes(params, dist.get("comm_hook", "none"))
    bucket = float(dist.get("bucket_mb", 25))
    ipw0 = base["micro_batch"] * base["grad_accum"]
    step0 = base["step_s"]
    # Per-image compute: N0's step time less the communication the model says it exposed there.
    exposed0 = scaling.step_time_s(step0, nbytes, base["world_size"], ic, bucket) - step0
    per_img = max(step0 - exposed0, 0.01 * step0) / ipw0
    n0, n = base["world_size"], row["world_size"]

    def tput(n_: int, ipw: int) -> float:
        compute = coloc_step_s if (coloc_step_s and n_ == n) else per_img * ipw
        return n_ * ipw / scaling.step_time_s(compute, nbytes, n_, ic, bucket)

    return tput(n, row["micro_batch"] * row["grad_accum"]) * n0 / (n * tput(n0, ipw0))


def _step_s(row: dict[str, Any]) -> float | None:
    """Seconds per optimiser step: the global batch over the throughput."""
    batch = row["global_batch"]
    if batch is None and row["micro_batch"] is not None:
        batch = row["micro_batch"] * row["grad_accum"] * row["world_size"]
    return batch / row["img_per_s"] if batch and row["img_per_s"] else None


def _baselines(pairs: list[tuple[dict[str, Any], Run]]) -> dict[tuple, dict[Any, dict[str, Any]]]:
    """Per curve: its baseline runs (the smallest N) by repeat index, and under ``None`` the median one of them. A lab
    point (a network profile) is never a baseline: the lab's baseline is N=1, which has no profile."""
    runs: dict[tuple, list[dict[str, Any]]] = {}
    for row, _ in pairs:
        if (row["status"] == "ok" and row["img_per_s"] and "compute_only" not in row["settings"]
                and not row.get("network")):
            same = runs.setdefault(group_key(row), [])
            if same and row["world_size"] < same[0]["world_size"]:
                same.clear()
            if not same or row["world_size"] == same[0]["world_size"]:
                same.append(row)
    bases: dict[tuple, dict[Any, dict[str, Any]]] = {}
    for key, same in runs.items():
        by_repeat: dict[Any, dict[str, Any]] = {}
        for row in same:
            by_repeat.setdefault(row["repeat"], row)
        ranked = sorted(same, key=lambda r: r["img_per_s"])
        bases[key] = {**by_repeat, None: ranked[(len(ranked) - 1) // 2]}
    return bases


def _fill(row: dict[str, Any], run: Run, base: dict[str, Any], coloc: dict[tuple, dict[int, float]],
          ic: scaling.Interconnect | None, warnings: list[str] | None) -> None:
    """Speedup, efficiency and the prediction of one ok run against its baseline run ``base``."""
    row["speedup"] = row["img_per_s"] / base["img_per_s"]
    row["efficiency"] = row["speedup"] * base["world_size"] / row["world_size"]
    if row["world_size"] <= base["world_size"] or "compute_only" in row["settings"]:
        return
    params = run_params(run)
    why = ("its records state no parameter count" if params is None else
           "its records or its baseline's state no micro-batch" if None in (row["micro_batch"], base["micro_batch"])
           else None)
    if why or ic is None or not base["step_s"]:
        if why and warnings is not None:
            warnings.append(f"{run.path}: {why}; pred n/a")
        return
    row["interconnect"] = ic.name
    calib = coloc.get(_coloc_key(row))
    step = (calib.get(row["repeat"]) or median(list(calib.values()))) if calib else None
    row["pred_efficiency"] = _predict(run, params, base, row, ic, step)
    row["pred_calibrated"] = step is not None
    row["pred_error_pts"] = 100 * (row["pred_efficiency"] - row["efficiency"])


def run_rows(runs: list[Run], fits: dict[str, dict[str, Any]] | None = None, interconnect: str | None = None,
             warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per run (see :data:`COLUMNS`), sorted, with speedup, efficiency and the prediction against the
    baseline run of the same repeat index."""
    pairs = sorted(((_base_row(r), r) for r in runs), key=lambda p: _sort_key(p[0]))
    for row, _ in pairs:
        if row["status"] == "ok" and row["img_per_s"]:
            row["step_s"] = _step_s(row)
    coloc = _colocated_steps(pairs)
    bases = _baselines(pairs)
    for row, run in pairs:
        base_runs = bases.get(_base_key(row))
        if base_runs is None and row.get("network"):  # a lab variant (a hook, a bucket size) without its own N=1:
            base_runs = bases.get((*_base_key(row)[:2], "default", *_base_key(row)[3:]))  # at N=1 there is no comm
        if row["status"] != "ok" or not row["img_per_s"] or base_runs is None:
            continue
        base = base_runs.get(row["repeat"]) or base_runs[None]
        ic = pick_interconnect(run, fits or {}, interconnect) if row["world_size"] > base["world_size"] else None
        _fill(row, run, base, coloc, ic, warnings)
    return [row for row, _ in pairs]


def aggregate(runs: list[Run], fits: dict[str, dict[str, Any]] | None = None, interconnect: str | None = None,
              warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per point (see :data:`COLUMNS` and :mod:`cnnscale.report.points`), sorted: each figure the median
    over the point's repeats with its interval, the suspect figures named.

    A run whose records do not state its parameter count (or micro-batch) gets no prediction, and one line in
    ``warnings``.
    """
    return collapse(run_rows(runs, fits, interconnect, warnings))
