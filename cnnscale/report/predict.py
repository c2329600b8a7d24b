"""``cnnscale report --predict``: the scaling model's efficiency at 2..1024 workers per model, and why.

Data-parallel efficiency is set by how many gradient bytes each step must all-reduce per unit of compute in that
step. VGG-16 carries 14.7M parameters (CIFAR head; 134M with the ImageNet head) for ~0.94 GFLOP per image
(fwd+bwd), ResNet-18 11.2M for ~1.7 GFLOP: VGG-16 moves about twice the bytes per FLOP, so on the same interconnect
and the same per-worker batch its communication is a larger share of the step and its efficiency falls first.
The table prints that ratio (MB of gradient per GFLOP of the step) beside the predictions.
"""

from __future__ import annotations

import functools
from typing import Any

from cnnscale.records import io as records
from cnnscale.report.main import _params, pick_interconnect
from cnnscale.scaling import model as scaling

__all__ = ["predict_rows", "render_predict", "fwd_bwd_flops", "PREDICT_AT"]

PREDICT_AT = (2, 8, 64, 1024)


@functools.lru_cache(maxsize=64)
def fwd_bwd_flops(model: str) -> float:
    """Forward + backward FLOPs per 32x32 image, counted on the meta device (imports torch, once per model)."""
    import torch

    from cnnscale.models import create_model
    from cnnscale.profile.flops import count_flops

    with torch.device("meta"):
        net = create_model(model)
    return float(count_flops(net, (1, 3, 32, 32), backward=True)["fwd_bwd_flops"])


def _baselines(recs: list[records.RunRecord], rows: list[dict[str, Any]]) -> dict[str, tuple[dict, records.RunRecord]]:
    """Per model: the ok row at the smallest world size, preferring default settings and fp32."""
    by_run = {r["path"]: r for r in recs}
    best: dict[str, tuple[tuple, dict, records.RunRecord]] = {}
    for row in rows:
        if row["status"] != "ok" or not row["img_per_s"]:
            continue
        rank = (row["settings"] != "default", row["precision"] != "no", row["world_size"])
        if row["model"] not in best or rank < best[row["model"]][0]:
            best[row["model"]] = (rank, row, by_run[row["run"]])
    return {m: (row, rec) for m, (_, row, rec) in sorted(best.items())}


def predict_rows(recs: list[records.RunRecord], rows: list[dict[str, Any]], interconnect: str | None,
                 tflops: float | None, fits: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per model: params, gradient MB, GFLOP per step, MB/GFLOP, compute ms, predicted efficiency at N."""
    out = []
    for model, (row, rec) in _baselines(recs, rows).items():
        ic = pick_interconnect(rec, fits, interconnect)
        ipw = row["micro_batch"] * row["grad_accum"]
        flops_step = fwd_bwd_flops(model) * ipw
        nbytes = scaling.grad_bytes(_params(rec))
        if tflops:
            compute = flops_step / (tflops * 1e12)
        else:
            step0 = row["global_batch"] / row["img_per_s"]
            compute = step0 - (scaling.step_time_s(step0, nbytes, row["world_size"], ic) - step0)
        preds = {n: scaling.predict_efficiency(compute, nbytes, n, ic) for n in PREDICT_AT}
        out.append({"model": model, "params": _params(rec), "grad_mb": nbytes / 1e6, "batch": ipw,
                    "gflop_step": flops_step / 1e9, "mb_per_gflop": nbytes / 1e6 / (flops_step / 1e9),
                    "compute_ms": compute * 1000, "interconnect": ic.name, "pred": preds,
                    "source": f"{tflops:g} TFLOP/s" if tflops else f"measured at N={row['world_size']}"})
    return sorted(out, key=lambda r: r["mb_per_gflop"])


def render_predict(prows: list[dict[str, Any]], console: Any) -> None:
    """Rich table of :func:`predict_rows`, lowest communication per FLOP first."""
    from rich.table import Table

    table = Table(title="scaling model: predicted weak-scaling efficiency",
                  caption="MB/GFLOP = fp32 gradient MB all-reduced per GFLOP of one worker's step (fwd+bwd). The "
                          "more bytes per FLOP, the sooner communication dominates: that is why VGG-16 (many "
                          "parameters, few FLOPs per image) scales worse than ResNet-18 on the same link.",
                  caption_justify="left")
    for col in ("model", "params (M)", "grad MB", "batch/worker", "GFLOP/step", "MB/GFLOP", "compute ms",
                "interconnect", *(f"N={n}" for n in PREDICT_AT), "compute from"):
        table.add_column(col, justify="left" if col in ("model", "interconnect", "compute from") else "right")
    for r in prows:
        table.add_row(r["model"], f"{r['params'] / 1e6:.2f}", f"{r['grad_mb']:.1f}", str(r["batch"]),
                      f"{r['gflop_step']:.1f}", f"{r['mb_per_gflop']:.3f}", f"{r['compute_ms']:.1f}",
                      r["interconnect"], *(f"{r['pred'][n]:.2f}" for n in PREDICT_AT), r["source"])
    console.print(table)
