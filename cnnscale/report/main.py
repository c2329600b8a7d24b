"""``cnnscale report RUNS...``: run directories -> rows -> rich tables and verdicts, PNG plots, an HTML page,
SVG/CSV/JSON exports.

The pipeline: :func:`cnnscale.report.load.load_records` (the records, nothing else: no model is built, torch is
never imported) -> :func:`cnnscale.report.aggregate.aggregate` (flat rows) -> :mod:`cnnscale.report.tables` (rich,
with :mod:`cnnscale.report.verdicts`), :mod:`cnnscale.report.plots`, :mod:`cnnscale.report.html` and
:mod:`cnnscale.report.exports`. With ``--predict``, lab points (a network profile) also go through
:mod:`cnnscale.report.lab` (the model on its fitted terms against every point; :mod:`cnnscale.report.lab_render`,
:mod:`cnnscale.report.lab_plot`). Nothing is written into the run directories. Cost: about 1 ms of reading per run
directory, about 20 ms per lab point for the fits; matplotlib (about 0.5 s to import) only when ``--plots`` or
``--html`` asks for figures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from cnnscale.config.argv import CommandParser
from cnnscale.errors import UserError
from cnnscale.records.run import Run
from cnnscale.report.aggregate import aggregate
from cnnscale.report.columns import memory_table
from cnnscale.report.exports import write_csv, write_json_rows, write_svg
from cnnscale.report.html import write_page
from cnnscale.report.lab import LabResult, lab_result, parse_split, parse_terms
from cnnscale.report.lab_render import lab_paths, render_lab, write_lab_csv, write_lab_json
from cnnscale.report.load import find_fits, load_records
from cnnscale.report.predict import predict_rows
from cnnscale.report.tables import render, render_memory, render_predict
from cnnscale.scaling import model as scaling

__all__ = ["main", "parser"]

INTERCONNECTS = (*scaling.PRESETS, "measured")


def parser() -> CommandParser:
    """The argument parser of ``cnnscale report``."""
    ap = CommandParser(prog="cnnscale report", description="Scaling report from run directories.")
    ap.add_argument("runs", nargs="+", help="run directories or folders holding them (searched recursively)")
    ap.add_argument("--html", help="write the report as one self-contained web page (tables, verdicts, plots, "
                    "config and environment)")
    ap.add_argument("--svg", help="write the report as SVG (rich export)")
    ap.add_argument("--csv", help="write flat rows as CSV (for pandas)")
    ap.add_argument("--json", help="write flat rows as JSON")
    ap.add_argument("--plots", help="write PNG plots into this directory (efficiency, throughput, step-time "
                    "breakdown, memory)")
    ap.add_argument("--interconnect", help=f"scaling-model interconnect: {', '.join(INTERCONNECTS)} "
                    "(default: the study's all-reduce fit on CPU, else a preset for the hardware)")
    ap.add_argument("--predict", action="store_true", help="also show predicted efficiency at 2..1024 workers and, "
                    "for lab points (a network profile), predicted vs measured on the fitted terms (with --csv/--json "
                    "also NAME-lab.csv/.json; with --plots also lab_efficiency.png)")
    ap.add_argument("--terms", default="abcdefg", help="--predict, lab: the model's terms, letters of a (gloo "
                    "ring), b (DDP buckets), c (overlap), d (straggler), e (contention), f (comm CPU), g (layer "
                    "timing), or none (default: abcdefg)")
    ap.add_argument("--fit-on", default="n=2,4", help="--predict, lab: the part of the matrix the terms are fitted "
                    "on, n=N1,N2 or profile=P1,P2; the rest checks them (default: n=2,4)")
    ap.add_argument("--tflops", type=float, help="--predict: assume each worker sustains this many TFLOP/s "
                    "(compute time from the records' FLOPs) instead of the measured step time")
    ap.add_argument("--width", type=int, help="console width (default: the terminal's)")
    return ap


def main(argv: list[str]) -> int:
    """Render the report of the runs under ``argv``'s directories; exit 0, or UserError for bad input."""
    args = parser().parse_args(argv)
    if args.interconnect and args.interconnect not in INTERCONNECTS:
        raise UserError(f"unknown interconnect {args.interconnect!r} (choose from: {', '.join(INTERCONNECTS)})")
    terms, split = parse_terms(args.terms), parse_split(args.fit_on)
    runs, warns = load_records(args.runs)
    fits = find_fits(args.runs, runs)
    rows = aggregate(runs, fits, args.interconnect, warns)
    lab = lab_result(runs, rows, fits, terms, split, warns) if args.predict else None
    width = args.width or (None if sys.stdout.isatty() else 170)  # logs and pipes: wide enough for one line a row
    console = Console(record=True, width=width)
    prows = predict_rows(runs, rows, args.interconnect, args.tflops, fits, warns) if args.predict else None
    for w in warns:
        print(f"cnnscale report: warning: {w}", file=sys.stderr)
    render(rows, console, warns)
    render_memory(runs, console)
    if prows is not None:
        render_predict(prows, console)
    if lab is not None:
        render_lab(lab, console)
    if args.svg:
        write_svg(console, args.svg)
    _exports(args, rows, lab)
    if args.plots or args.html:
        _figures(args, runs, rows, fits, prows, warns, lab)
    return 0


def _exports(args: Any, rows: list[dict[str, Any]], lab: LabResult | None) -> None:
    """--csv and --json: the rows, and the lab comparison beside them (NAME-lab.csv, NAME-lab.json)."""
    if args.csv:
        write_csv(rows, args.csv)
        if lab is not None:
            write_lab_csv(lab, lab_paths(args.csv))
            print(f"wrote {lab_paths(args.csv)}", file=sys.stderr)
    if args.json:
        write_json_rows(rows, args.json)
        if lab is not None:
            write_lab_json(lab, lab_paths(args.json))
            print(f"wrote {lab_paths(args.json)}", file=sys.stderr)


def _figures(args: Any, runs: list[Run], rows: list[dict[str, Any]], fits: dict[str, Any],
             prows: list[dict[str, Any]] | None, warns: list[str], lab: LabResult | None = None) -> None:
    """--plots and --html: the figures (with each model's predicted curve, and the lab's) as files and inline in
    the page."""
    from cnnscale.report import lab_plot, plots  # lazy: matplotlib costs ~0.5 s, and only --plots / --html need it

    curve_rows = prows if prows is not None else predict_rows(runs, rows, args.interconnect, args.tflops, fits)
    curves = {p["model"]: p["curve"] for p in curve_rows}
    figs = plots.figures(rows, curves, memory_table(runs))
    if lab is not None:
        figs[lab_plot.LAB_PNG] = lab_plot.plot_lab(lab)
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            fig.savefig(out / name, dpi=plots.DPI)
            print(f"wrote {out / name}", file=sys.stderr)
    if args.html:
        write_page(args.html, rows, runs, {n: plots.png_bytes(f) for n, f in figs.items()}, prows, warns)
