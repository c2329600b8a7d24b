"""``cnnscale report RUNS...``: run directories -> rows -> rich tables, PNG plots, HTML/SVG/CSV/JSON exports.

Pure functions of the run records (read through :func:`cnnscale.records.io.find_runs` / ``load_run``), so a report can
be made anywhere the files are. The pipeline is ``load_records`` -> ``aggregate`` (flat dict rows, also the CSV/JSON
rows) -> ``render`` (rich) and :mod:`cnnscale.report.plots`.

Throughput is the run's ``img_per_s`` (images over time). Rows are grouped by model, precision, settings variant
and per-worker batch (weak scaling; the global batch for strong scaling). Against the group's smallest world size
N0: ``speedup = tput(N) / tput(N0)`` and ``efficiency = tput(N) · N0 / (N · tput(N0))`` (with N0 = 1, the
textbook ``tput(N) / (N · tput(1))``). ``pred`` is the scaling model's efficiency (:mod:`cnnscale.scaling.model`) from
N0's measured step time, the gradient bytes and the interconnect; ``err`` is pred - measured, in points.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.scaling import model as scaling

__all__ = ["load_records", "aggregate", "render", "main", "settings_label", "pick_interconnect", "find_fits",
           "COLUMNS"]

COLUMNS = ("model", "settings", "precision", "scaling", "world_size", "num_nodes", "micro_batch", "grad_accum",
           "global_batch", "status", "img_per_s", "speedup", "efficiency", "pred_efficiency", "pred_error_pts",
           "step_ms", "sync_share", "peak_mem_bytes", "mem_kind", "util_pct", "util_kind", "mfu", "final_loss",
           "test_acc", "interconnect", "error", "run")


def load_records(roots: list[str | Path]) -> tuple[list[records.RunRecord], list[str]]:
    """Every readable run under ``roots`` and a warning per skipped (corrupt or partial) directory."""
    recs, warns = [], []
    for path in records.find_runs(roots):
        try:
            rec = records.load_run(path)
        except ValueError as exc:
            warns.append(f"skipped {exc}")
            continue
        s = rec.summary
        if not isinstance(s.get("model"), str) or not isinstance(s.get("world_size"), int):
            warns.append(f"skipped {path}: summary.json lacks model/world_size")
            continue
        if (s.get("point") or {}).get("settings") == "probe":
            continue  # max_batch search probes are not points of the study
        recs.append(rec)
    if not recs:
        raise UserError(f"no runs found in {', '.join(map(str, roots))}")
    return recs, warns


def settings_label(rec: records.RunRecord) -> str:
    """The study's settings variant name, else one derived from non-default DDP settings in config.yaml."""
    point = rec.summary.get("point") or {}
    if point.get("settings"):
        return str(point["settings"])
    if rec.summary.get("runner") == "bench_ddp_bare":
        return "bare_ddp"
    dist = (rec.config or {}).get("dist") or {}
    parts = [f"zero{rec.env['zero_stage']}"] if rec.env.get("zero_stage") is not None else []
    if dist.get("comm_hook", "none") != "none":
        parts.append(f"hook={dist['comm_hook']}")
    if dist.get("bucket_mb", 25) != 25:
        parts.append(f"bucket={dist['bucket_mb']}MB")
    if dist.get("static_graph"):
        parts.append("static_graph")
    if dist.get("compute_only"):
        parts.append("compute_only")
    return ",".join(parts) or "default"


def find_fits(roots: list[str | Path], recs: list[records.RunRecord]) -> dict[str, dict]:
    """``allreduce.json`` benchmark fits by directory: in each root and in each run's parent (a study directory)."""
    fits: dict[str, dict] = {}
    for d in {Path(r) for r in roots} | {Path(rec["path"]).parent for rec in recs}:
        f = d / "allreduce.json"
        if f.is_file():
            try:
                fits[str(d.resolve())] = records.read_json(f)
            except (OSError, ValueError):
                continue
    return fits


def pick_interconnect(rec: records.RunRecord, fits: dict[str, dict], name: str | None) -> scaling.Interconnect:
    """``name`` if given; else the run's study fit on CPU ("measured"), else a preset for the run's hardware."""
    fit = fits.get(str(Path(rec["path"]).parent.resolve()))
    if name == "measured" or (name is None and fit and fit.get("device_type", "cpu") == rec.env.get("device_type")):
        if not fit:
            raise UserError(f"--interconnect measured: no allreduce.json beside {rec['path']}")
        return scaling.interconnect_from_fit(fit)
    if name:
        return scaling.get_interconnect(name)
    if rec.env.get("device_type", "cpu") != "cuda":
        return scaling.PRESETS["cpu-shm"]
    return scaling.PRESETS["ib-hdr" if (rec.env.get("num_nodes") or 1) > 1 else "nvlink"]


def _group_key(row: dict[str, Any]) -> tuple:
    batch = row["global_batch"] if row["scaling"] == "strong" else row["micro_batch"] * row["grad_accum"]
    return row["model"], row["precision"], row["settings"], row["scaling"], batch


def _base_key(row: dict[str, Any]) -> tuple:
    """The group whose smallest world size is this row's baseline. A compute_only calibration row is measured
    against the real runs of the same settings, so its efficiency is the co-location loss alone."""
    model, prec, settings, scal, batch = _group_key(row)
    stripped = ",".join(p for p in settings.split(",") if p != "compute_only") or "default"
    return model, prec, stripped, scal, batch


def _sort_key(row: dict[str, Any]) -> tuple:
    """Model, then default settings and fp32 first, then batch and world size."""
    model, prec, settings, scal, batch = _group_key(row)
    return (model, settings != "default", settings, prec != "no", prec, scal, batch or 0, row["world_size"],
            row["run"])


def _base_row(rec: records.RunRecord) -> dict[str, Any]:
    s, env = rec.summary, rec.env
    gpu = s.get("max_memory_allocated_bytes") is not None
    util = s.get("gpu_util_pct_mean")
    return {
        "model": s["model"], "settings": settings_label(rec), "precision": s.get("mixed_precision") or "no",
        "scaling": (s.get("point") or {}).get("scaling", "weak"), "world_size": s["world_size"],
        "num_nodes": env.get("num_nodes", 1), "micro_batch": s.get("micro_batch"), "grad_accum": s.get("grad_accum", 1),
        "global_batch": s.get("global_batch"), "status": s.get("status", "unknown"), "img_per_s": s.get("img_per_s"),
        "step_ms": s.get("step_ms_p50"), "sync_share": s.get("sync_share"),
        "peak_mem_bytes": s.get("max_memory_allocated_bytes") if gpu else s.get("peak_rss_bytes"),
        "mem_kind": "gpu" if gpu else "rss", "util_pct": util if util is not None else s.get("cpu_percent"),
        "util_kind": "gpu" if util is not None else "cpu", "mfu": s.get("mfu"), "final_loss": s.get("final_loss"),
        "test_acc": s.get("test_acc"), "error": s.get("error"), "run": rec["path"],
        "speedup": None, "efficiency": None, "pred_efficiency": None, "pred_error_pts": None, "interconnect": None,
        "pred_calibrated": False,
    }


def _params(rec: records.RunRecord) -> int:
    s = rec.summary
    return int(s.get("params") or (s.get("point") or {}).get("params") or scaling.model_params(s["model"]))


def _coloc_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["precision"], row["micro_batch"], row["grad_accum"], row["world_size"]


def _colocated_steps(pairs: list[tuple[dict[str, Any], records.RunRecord]]) -> dict[tuple, float]:
    """Step time (s) of ``dist.compute_only`` calibration runs: N processes sharing the machine, no all-reduce."""
    out = {}
    for row, rec in pairs:
        if row["status"] == "ok" and row["img_per_s"] and ((rec.config or {}).get("dist") or {}).get("compute_only"):
            out[_coloc_key(row)] = row["global_batch"] / row["img_per_s"]
    return out


def _predict(rec: records.RunRecord, base: dict[str, Any], row: dict[str, Any], ic: scaling.Interconnect,
             coloc_step_s: float | None = None) -> float:
    """Predicted efficiency of ``row`` against ``base`` (see the module docstring). ``coloc_step_s``: the measured
    step time of N processes sharing the machine without communication (a compute_only run); when given, it is the
    compute time at N instead of the single-worker one, so the model predicts only the communication."""
    dist = (rec.config or {}).get("dist") or {}
    nbytes = scaling.grad_bytes(_params(rec), dist.get("comm_hook", "none"))
    bucket = float(dist.get("bucket_mb", 25))
    ipw0 = base["micro_batch"] * base["grad_accum"]
    step0 = base["global_batch"] / base["img_per_s"]
    # Per-image compute: N0's step time less the communication the model says it exposed there.
    exposed0 = scaling.step_time_s(step0, nbytes, base["world_size"], ic, bucket) - step0
    per_img = max(step0 - exposed0, 0.01 * step0) / ipw0

    n0, n = base["world_size"], row["world_size"]

    def tput(n_: int, ipw: int) -> float:
        compute = coloc_step_s if (coloc_step_s and n_ == n) else per_img * ipw
        return n_ * ipw / scaling.step_time_s(compute, nbytes, n_, ic, bucket)

    return tput(n, row["micro_batch"] * row["grad_accum"]) * n0 / (n * tput(n0, ipw0))


def aggregate(recs: list[records.RunRecord], fits: dict[str, dict] | None = None,
              interconnect: str | None = None) -> list[dict[str, Any]]:
    """Flat rows (see :data:`COLUMNS`), sorted, with speedup, efficiency and the model's prediction filled in."""
    pairs = sorted(((_base_row(r), r) for r in recs), key=lambda p: _sort_key(p[0]))
    coloc = _colocated_steps(pairs)
    bases: dict[tuple, dict[str, Any]] = {}
    for row, _ in pairs:
        if row["status"] == "ok" and row["img_per_s"] and "compute_only" not in row["settings"]:
            key = _group_key(row)
            if key not in bases or row["world_size"] < bases[key]["world_size"]:
                bases[key] = row
    for row, rec in pairs:
        base = bases.get(_base_key(row))
        if row["status"] != "ok" or not row["img_per_s"] or base is None:
            continue
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        row["efficiency"] = row["speedup"] * base["world_size"] / row["world_size"]
        if row["world_size"] > base["world_size"] and "compute_only" not in row["settings"]:
            ic = pick_interconnect(rec, fits or {}, interconnect)
            row["interconnect"] = ic.name
            calib = coloc.get(_coloc_key(row))
            row["pred_efficiency"] = _predict(rec, base, row, ic, calib)
            row["pred_calibrated"] = calib is not None
            row["pred_error_pts"] = 100 * (row["pred_efficiency"] - row["efficiency"])
    return [row for row, _ in pairs]


def _f(x: Any, fmt: str, na: str = "n/a") -> str:
    return na if x is None else format(x, fmt)


def _gb(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GB"


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


def _pct(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(100 * x, fmt) + "%"


def render(rows: list[dict[str, Any]], console: Any, warnings: list[str] | None = None) -> None:
    """Print the scaling table (one section per model), the failed points' errors and any warnings."""
    from rich.table import Table

    ics = sorted({r["interconnect"] for r in rows if r["interconnect"]})
    caption = ("eff = img/s(N) x N0 / (N x img/s(N0)), N0 = smallest world size of the same model, precision, settings "
               "and per-worker batch; pred = scaling model (cnnscale/scaling/model.py)"
               + (f" on {', '.join(ics)}" if ics else "") + "; err = pred - eff in points; step ms = median step; "
               "loss = last logged training loss; acc = test accuracy"
               + ("; pred* = compute time at N taken from the compute_only run (N processes sharing the machine, no "
                  "all-reduce), the model predicting the communication" if any(r.get("pred_calibrated") for r in rows)
                  else "") + ".")
    table = Table(title="cnnscale scaling report", caption=caption, caption_justify="left")
    for col, just in (("model", "left"), ("settings", "left"), ("prec", "left"), ("N", "right"), ("batch", "right"),
                      ("img/s", "right"), ("speedup", "right"), ("eff", "right"), ("pred", "right"), ("err", "right"),
                      ("step ms", "right"), ("sync", "right"), ("peak mem", "right"), ("util", "right"),
                      ("MFU", "right"), ("loss", "right"), ("acc", "right"), ("status", "left")):
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


def render_memory(recs: list[records.RunRecord], console: Any) -> None:
    """Per-rank peak memory by ZeRO stage, measured beside zero_memory's prediction (only when a ZeRO run is present;
    DDP runs of the same models are shown with them as the baseline)."""
    from rich.table import Table

    from cnnscale.scaling.memory import memory_rows

    rows = memory_rows(recs)
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


def _write_flat(rows: list[dict[str, Any]], csv_path: str | None, json_path: str | None) -> None:
    flat = [{c: r.get(c) for c in COLUMNS} for r in rows]
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(flat)
    if json_path:
        records.atomic_write_text(json_path, json.dumps(flat, indent=2) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cnnscale report", description="Scaling report from run directories.")
    ap.add_argument("runs", nargs="+", help="run directories or folders holding them (searched recursively)")
    ap.add_argument("--html", help="write the report as HTML (rich export)")
    ap.add_argument("--svg", help="write the report as SVG (rich export)")
    ap.add_argument("--csv", help="write flat rows as CSV (for pandas)")
    ap.add_argument("--json", help="write flat rows as JSON")
    ap.add_argument("--plots", help="write PNG plots into this directory")
    ap.add_argument("--interconnect", help=f"scaling-model interconnect: {', '.join(scaling.PRESETS)}, measured "
                    "(default: the study's all-reduce fit on CPU, else a preset for the hardware)")
    ap.add_argument("--predict", action="store_true", help="also show predicted efficiency at 2..1024 workers")
    ap.add_argument("--tflops", type=float, help="--predict: assume each worker sustains this many TFLOP/s "
                    "(compute time from FLOPs) instead of the measured step time")
    ap.add_argument("--width", type=int, help="console width (default: the terminal's)")
    args = ap.parse_args(argv)
    if args.interconnect and args.interconnect not in (*scaling.PRESETS, "measured"):
        raise UserError(f"unknown interconnect {args.interconnect!r} (choose from: "
                        f"{', '.join([*scaling.PRESETS, 'measured'])})")
    from rich.console import Console

    recs, warns = load_records(args.runs)
    rows = aggregate(recs, find_fits(args.runs, recs), args.interconnect)
    width = args.width or (None if sys.stdout.isatty() else 170)  # logs and pipes: wide enough for one line a row
    console = Console(record=True, width=width)
    for w in warns:
        print(f"cnnscale report: warning: {w}", file=sys.stderr)
    render(rows, console, warns)
    render_memory(recs, console)
    if args.predict:
        from cnnscale.report.predict import predict_rows, render_predict

        render_predict(predict_rows(recs, rows, args.interconnect, args.tflops, find_fits(args.runs, recs)), console)
    if args.html:
        records.atomic_write_text(args.html, console.export_html(clear=False))
    if args.svg:
        records.atomic_write_text(args.svg, console.export_svg(title="cnnscale report", clear=False))
    _write_flat(rows, args.csv, args.json)
    if args.plots:
        from cnnscale.report.plots import write_plots

        for p in write_plots(rows, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0
