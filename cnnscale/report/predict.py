"""``cnnscale report --predict``: the scaling model's efficiency at 2..1024 workers per model, and why.

Data-parallel efficiency is set by how many gradient bytes each step must all-reduce per unit of compute in that
step. VGG-16 carries 14.7M parameters (CIFAR head; 134M with the ImageNet head) for ~1.9 GFLOP per image
(fwd+bwd), ResNet-18 11.2M for ~3.3 GFLOP: VGG-16 moves about twice the bytes per FLOP, so on the same interconnect
and the same per-worker batch its communication is a larger share of the step and its efficiency falls first.
The table prints that ratio (MB of gradient per GFLOP of the step) beside the predictions.

Parameters and FLOPs per image come from the run records (env.json's ``params`` and ``train_flops_per_img``, which the
trainer counts); a record without them gives "n/a" for what needs them, with one warning naming the run.
"""

from __future__ import annotations

from typing import Any

from cnnscale.records.run import Run
from cnnscale.report.load import pick_interconnect, run_params, run_train_flops
from cnnscale.scaling import model as scaling

__all__ = ["predict_rows", "PREDICT_AT"]

PREDICT_AT = (2, 8, 64, 1024)


def _baselines(runs: list[Run], rows: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], Run]]:
    """Per model: the ok row at the smallest world size, preferring default settings and fp32 (rows that lack the
    batch or the step time, or whose throughput is suspect, cannot be a baseline)."""
    by_path = {r.path: r for r in runs}
    best: dict[str, tuple[tuple, dict[str, Any], Run]] = {}
    for row in rows:
        if (row["status"] != "ok" or not row["img_per_s"] or row["micro_batch"] is None or not row["step_s"]
                or "img_per_s" in row.get("suspect", {})):
            continue
        rank = (row["settings"] != "default", row["precision"] != "no", row["world_size"])
        if row["model"] not in best or rank < best[row["model"]][0]:
            best[row["model"]] = (rank, row, by_path[row["run"]])
    return {m: (row, run) for m, (_, row, run) in sorted(best.items())}


def _predict_row(model: str, row: dict[str, Any], ic: scaling.Interconnect, params: int, flops: float | None,
                 tflops: float | None) -> dict[str, Any]:
    """Figures of one model's baseline row; compute time from ``tflops`` (needs FLOPs) or the measured step."""
    ipw = row["micro_batch"] * row["grad_accum"]
    flops_step = flops * ipw if flops is not None else None
    nbytes = scaling.grad_bytes(params)
    if tflops:
        compute = flops_step / (tflops * 1e12) if flops_step is not None else None
    else:
        step0 = row["step_s"]
        compute = step0 - (scaling.step_time_s(step0, nbytes, row["world_size"], ic) - step0)
    preds = {n: scaling.predict_efficiency(compute, nbytes, n, ic) if compute is not None else None
             for n in PREDICT_AT}
    sizes = [2 ** k for k in range(max(PREDICT_AT).bit_length())]
    curve = {n: scaling.predict_efficiency(compute, nbytes, n, ic) for n in sizes} if compute is not None else {}
    gflop = flops_step / 1e9 if flops_step is not None else None
    return {"model": model, "params": params, "grad_mb": nbytes / 1e6, "batch": ipw, "gflop_step": gflop,
            "mb_per_gflop": nbytes / 1e6 / gflop if gflop else None,
            "compute_ms": compute * 1000 if compute is not None else None, "interconnect": ic.name, "pred": preds,
            "curve": curve, "settings": row["settings"], "precision": row["precision"],
            "source": f"{tflops:g} TFLOP/s" if tflops else f"measured at N={row['world_size']}"}


def predict_rows(runs: list[Run], rows: list[dict[str, Any]], interconnect: str | None, tflops: float | None,
                 fits: dict[str, dict[str, Any]], warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per model: params, gradient MB, GFLOP per step, MB/GFLOP, compute ms, predicted efficiency at N
    (``pred``, at :data:`PREDICT_AT`; ``curve``, at every power of two up to its largest, for the plots).

    Lowest MB/GFLOP first; models whose records lack FLOPs (or parameters) come last with "n/a" figures and one
    line each in ``warnings``.
    """
    out = []
    for model, (row, run) in _baselines(runs, rows).items():
        params, flops = run_params(run), run_train_flops(run)
        if params is None:
            if warnings is not None:
                warnings.append(f"{run.path}: its records state no parameter count; no prediction for {model}")
            continue
        if flops is None and warnings is not None:
            warnings.append(f"{run.path}: its records state no FLOPs per image; GFLOP/step and MB/GFLOP n/a")
        out.append(_predict_row(model, row, pick_interconnect(run, fits, interconnect), params, flops, tflops))
    return sorted(out, key=lambda r: (r["mb_per_gflop"] is None, r["mb_per_gflop"] or 0.0))
