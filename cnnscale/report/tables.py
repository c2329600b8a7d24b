"""Rich rendering of a report: the scaling table, memory by ZeRO stage, the prediction table, errors and warnings.

Each function prints to a ``rich.console.Console`` (tests use ``Console(record=True)`` and export the text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cnnscale.records.run import Run
from cnnscale.report.predict import PREDICT_AT
from cnnscale.scaling.memory import memory_rows

__all__ = ["render", "render_memory", "render_predict"]

_SCALING_COLUMNS = (("model", "left"), ("settings", "left"), ("prec", "left"), ("N", "right"), ("batch", "right"),
                    ("img/s", "right"), ("speedup", "right"), ("eff", "right"), ("pred", "right"), ("err", "right"),
                    ("step ms", "right"), ("sync", "right"), ("peak mem", "right"), ("util", "right"),
                    ("MFU", "right"), ("loss", "right"), ("acc", "right"), ("status", "left"))


def _f(x: Any, fmt: str, na: str = "n/a") -> str:
    return na if x is None else format(x, fmt)


def _gb(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GB"


def _pct(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(100 * x, fmt) + "%"


def _cells(row: dict[str, Any]) -> list[str]:
    ok = row["status"] == "ok"
    rate = row["img_per_s"]
    tput = (f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}") if ok and rate else row["status"].upper()
    util = "n/a" if row["util_pct"] is None else f"{row['util_pct']:.0f}% {row['util_kind']}"
    mem = "n/a" if row["peak_mem_bytes"] is None else f"{_gb(row['peak_mem_bytes'])} {row['mem_kind']}"
    base = [row["model"], row["settings"], row["precision"], str(row["world_size"]), str(row["global_batch"]), tput]
    if not ok:
        return base + [""] * 11 + [f"[red]{row['status']}[/red]"]
    return base + [
        _f(row["speedup"], ".2f", "") + ("x" if row["speedup"] is not None else ""), _f(row["efficiency"], ".2f", ""),
        _f(row["pred_efficiency"], ".2f", "") + ("*" if row.get("pred_calibrated") else ""),
        _f(row["pred_error_pts"], "+.1f", ""), _f(row["step_ms"], ",.1f"),
        _pct(row["sync_share"], ".1f"), mem, util, _pct(row["mfu"], ".2f"), _f(row["final_loss"], ".3f"),
        _pct(row["test_acc"], ".1f"), "ok"]


def _caption(rows: list[dict[str, Any]]) -> str:
    ics = sorted({r["interconnect"] for r in rows if r["interconnect"]})
    calibrated = any(r.get("pred_calibrated") for r in rows)
    return ("eff = img/s(N) x N0 / (N x img/s(N0)), N0 = smallest world size of the same model, precision, settings "
            "and per-worker batch; pred = scaling model (cnnscale/scaling/model.py)"
            + (f" on {', '.join(ics)}" if ics else "") + "; err = pred - eff in points; step ms = median step; "
            "loss = last logged training loss; acc = test accuracy"
            + ("; pred* = compute time at N taken from the compute_only run (N processes sharing the machine, no "
               "all-reduce), the model predicting the communication" if calibrated else "") + ".")


def render(rows: list[dict[str, Any]], console: Console, warnings: list[str] | None = None) -> None:
    """Print the scaling table (one section per model), the failed points' errors and any warnings."""
    table = Table(title="cnnscale scaling report", caption=_caption(rows), caption_justify="left")
    for col, just in _SCALING_COLUMNS:
        table.add_column(col, justify=just, no_wrap=col in ("model", "settings"))
    last = None
    for row in rows:
        if last is not None and row["model"] != last:
            table.add_section()
        last = row["model"]
        table.add_row(*_cells(row))
    console.print(table)
    for row in rows:
        if row["status"] != "ok":
            console.print(f"[red]{row['status']}[/red] {Path(row['run']).name}: {row.get('error') or 'no error line'}",
                          highlight=False)
    for w in warnings or []:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def render_memory(runs: list[Run], console: Console) -> None:
    """Per-rank peak memory by ZeRO stage, measured beside zero_memory's prediction (only when a ZeRO run is present;
    DDP runs of the same models are shown with them as the baseline)."""
    rows = memory_rows({"path": r.path, "summary": r.summary.to_dict() if r.summary else {}, "env": r.env.to_dict()}
                       for r in runs)
    zero_models = {r["model"] for r in rows if r["zero_stage"]}
    rows = [r for r in rows if r["model"] in zero_models]
    if not rows:
        return
    table = Table(title="memory per rank by ZeRO stage", caption="measured: peak per rank (RSS on CPU, which includes "
                  "~0.8 GB of framework; allocator peak on GPU); predicted: cnnscale/scaling/memory.py",
                  caption_justify="left")
    for col in ("model", "config", "N", "measured per rank", "predicted", "model states", "meas/pred"):
        table.add_column(col, justify="left" if col in ("model", "config") else "right")
    for r in rows:
        pred = r["predicted_total_bytes"]
        # RSS carries ~0.8 GB of framework: a ratio means something only when the model's share dominates.
        meaningful = pred and (r["mem_kind"] != "rss" or pred >= 1e9)
        ratio = f"{r['max_rank_peak_bytes'] / pred:.2f}" if meaningful else "n/a"
        table.add_row(str(r["model"]), r["config"], str(r["world_size"]),
                      " / ".join(_gb(b) for b in r["rank_peak_bytes"]), _gb(pred),
                      _gb(r["predicted_model_states_bytes"]), ratio)
    console.print(table)


def render_predict(prows: list[dict[str, Any]], console: Console) -> None:
    """Rich table of :func:`cnnscale.report.predict.predict_rows`, lowest communication per FLOP first."""
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
                      _f(r["gflop_step"], ".1f"), _f(r["mb_per_gflop"], ".3f"), _f(r["compute_ms"], ".1f"),
                      r["interconnect"], *(_f(r["pred"][n], ".2f") for n in PREDICT_AT), r["source"])
    console.print(table)
