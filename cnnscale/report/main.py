"""``cnnscale report RUNS...``: run directories -> rows -> rich tables, PNG plots, HTML/SVG/CSV/JSON exports.

The pipeline: :func:`cnnscale.report.load.load_records` (the records, nothing else: no model is built, torch is
never imported) -> :func:`cnnscale.report.aggregate.aggregate` (flat rows) -> :mod:`cnnscale.report.tables` (rich)
and :mod:`cnnscale.report.plots`, :mod:`cnnscale.report.exports`. Nothing is written into the run directories.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from cnnscale.config.argv import CommandParser
from cnnscale.errors import UserError
from cnnscale.report.aggregate import aggregate
from cnnscale.report.exports import write_csv, write_html, write_json_rows, write_svg
from cnnscale.report.load import find_fits, load_records
from cnnscale.report.plots import write_plots
from cnnscale.report.predict import predict_rows
from cnnscale.report.tables import render, render_memory, render_predict
from cnnscale.scaling import model as scaling

__all__ = ["main", "parser"]

INTERCONNECTS = (*scaling.PRESETS, "measured")


def parser() -> CommandParser:
    """The argument parser of ``cnnscale report``."""
    ap = CommandParser(prog="cnnscale report", description="Scaling report from run directories.")
    ap.add_argument("runs", nargs="+", help="run directories or folders holding them (searched recursively)")
    ap.add_argument("--html", help="write the report as HTML (rich export)")
    ap.add_argument("--svg", help="write the report as SVG (rich export)")
    ap.add_argument("--csv", help="write flat rows as CSV (for pandas)")
    ap.add_argument("--json", help="write flat rows as JSON")
    ap.add_argument("--plots", help="write PNG plots into this directory")
    ap.add_argument("--interconnect", help=f"scaling-model interconnect: {', '.join(INTERCONNECTS)} "
                    "(default: the study's all-reduce fit on CPU, else a preset for the hardware)")
    ap.add_argument("--predict", action="store_true", help="also show predicted efficiency at 2..1024 workers")
    ap.add_argument("--tflops", type=float, help="--predict: assume each worker sustains this many TFLOP/s "
                    "(compute time from the records' FLOPs) instead of the measured step time")
    ap.add_argument("--width", type=int, help="console width (default: the terminal's)")
    return ap


def main(argv: list[str]) -> int:
    """Render the report of the runs under ``argv``'s directories; exit 0, or UserError for bad input."""
    args = parser().parse_args(argv)
    if args.interconnect and args.interconnect not in INTERCONNECTS:
        raise UserError(f"unknown interconnect {args.interconnect!r} (choose from: {', '.join(INTERCONNECTS)})")
    runs, warns = load_records(args.runs)
    fits = find_fits(args.runs, runs)
    rows = aggregate(runs, fits, args.interconnect, warns)
    width = args.width or (None if sys.stdout.isatty() else 170)  # logs and pipes: wide enough for one line a row
    console = Console(record=True, width=width)
    prows = predict_rows(runs, rows, args.interconnect, args.tflops, fits, warns) if args.predict else None
    for w in warns:
        print(f"cnnscale report: warning: {w}", file=sys.stderr)
    render(rows, console, warns)
    render_memory(runs, console)
    if prows is not None:
        render_predict(prows, console)
    if args.html:
        write_html(console, args.html)
    if args.svg:
        write_svg(console, args.svg)
    if args.csv:
        write_csv(rows, args.csv)
    if args.json:
        write_json_rows(rows, args.json)
    if args.plots:
        for p in write_plots(rows, Path(args.plots)):
            print(f"wrote {p}", file=sys.stderr)
    return 0
