"""Rich rendering of a report that fits the terminal: the scaling, resources and training tables
(:mod:`cnnscale.report.columns`), the verdicts, memory by ZeRO stage, the prediction table, errors and warnings.

Every number is printed whole: cells never wrap or get cut ("…"). A table wider than the console drops its
lowest-priority columns until it fits and says which it dropped (``--width``, ``--csv`` or ``--html`` show them).
Each function prints to a ``rich.console.Console`` (tests use ``Console(record=True)`` and export the text).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from cnnscale.records.run import Run
from cnnscale.report.columns import Column, TableSpec, display_rows, fmt, footnotes, memory_table, table_specs
from cnnscale.report.predict import PREDICT_AT
from cnnscale.report.verdicts import Verdict, verdicts

__all__ = ["render", "render_table", "render_verdicts", "render_memory", "render_predict", "fit_table",
           "predict_cells", "PREDICT_HEADS", "PREDICT_CAPTION", "memory_cells", "MEMORY_HEADS", "MEMORY_CAPTION",
           "TITLE"]

TITLE = "cnnscale scaling report"


GAP = "  "
"""Between columns."""


def _len(s: str) -> int:
    return len(s) if s.isascii() else cell_len(s)


def _widths(heads: list[tuple[str, bool, int]], cells: list[list[str]]) -> list[int]:
    return [max([_len(h) for h in head.split("\n")] + [_len(row[i]) for row in cells])
            for i, (head, _, _) in enumerate(heads)]


def _lines(heads: list[tuple[str, bool, int]], cells: list[list[str]], keep: list[int], widths: list[int]) -> Text:
    """The table as text: headers bottom-aligned (bold), a rule, then the rows, each cell padded to its width; a
    row with nothing but its label (a model's name) in bold. One Text, styled by ranges (cheap for 1,000 rows)."""
    def line(values: list[str]) -> str:
        return GAP.join(v.ljust(widths[i]) if heads[i][1] else v.rjust(widths[i])
                        for i, v in zip(keep, values)).rstrip()

    head_lines = [h.split("\n") for h, _, _ in heads]
    depth = max(len(h) for h in head_lines)
    out = [(line([([""] * (depth - len(head_lines[i])) + head_lines[i])[k] for i in keep]), True)
           for k in range(depth)]
    out.append(("\u2500" * (sum(widths[i] for i in keep) + len(GAP) * (len(keep) - 1)), False))
    out += [(line([row[i] for i in keep]), not any(row[1:])) for row in cells]
    text = Text("\n".join(s for s, _ in out))
    pos = 0
    for s, bold in out:
        if bold:
            text.stylize("bold", pos, pos + len(s))
        pos += len(s) + 1
    return text


def fit_table(console: Console, title: str, caption: str, heads: list[tuple[str, bool, int]],
              cells: list[list[str]], notes: list[str] | None = None) -> None:
    """Print ``title``, a table of ``cells`` under ``heads`` (header with ``\\n`` for two lines, left-aligned,
    priority) that fits ``console.width``, its caption as a paragraph and ``notes`` (footnotes), a line each.
    Columns are dropped, highest priority number first (0: never), until the table fits; the caption names what was
    dropped. Cells never wrap and are
    never cut, so numbers stay whole; a table whose never-dropped columns alone are too wide runs past the edge.

    Laid out here rather than by rich's Table: measuring 1,000 rows of cells through rich costs seconds; this costs
    milliseconds (every cell is plain text of a known width)."""
    widths = _widths(heads, cells)
    keep = list(range(len(heads)))
    dropped: list[str] = []
    while sum(widths[i] for i in keep) + len(GAP) * (len(keep) - 1) > console.width:
        droppable = [i for i in keep if heads[i][2] > 0]
        if not droppable:
            break
        worst = max(droppable, key=lambda i: (heads[i][2], i))
        keep.remove(worst)
        dropped.append(heads[worst][0].replace("\n", " "))
    if dropped:
        caption += f" Not shown at {console.width} columns: {', '.join(dropped)} (see --csv or --html)."
    console.print(title, style="bold", highlight=False)
    console.print(_lines(heads, cells, keep, widths), soft_wrap=True, highlight=False)
    console.print(caption, style="dim", highlight=False)
    for note in notes or []:
        console.print(note, style="yellow", highlight=False)
    console.print()


def render_table(spec: TableSpec, rows: list[dict[str, Any]], console: Console) -> None:
    """One of :func:`cnnscale.report.columns.table_specs`, model name rows above each model's runs."""
    shown = [r for r in rows if spec.failed_rows or r["status"] == "ok"]
    lines = display_rows(shown)
    cols: list[Column] = list(spec.columns)
    heads = [("model", True, 0)] + [(c.header, c.left, c.priority) for c in cols]
    cells = [[label] + (["" for _ in cols] if r is None else [c.cell(r) for c in cols]) for label, r in lines]
    fit_table(console, spec.title, spec.caption, heads, cells, footnotes(spec, rows))


def render_verdicts(found: list[Verdict], console: Console) -> None:
    """The verdicts, one paragraph per model and precision."""
    if not found:
        return
    console.print("[bold]why each model scales as it does[/bold]")
    # wrapped here (at spaces only, so numbers stay whole): rich's wrapping costs ~1 ms a paragraph
    width = max(console.width - 1, 20)
    text = "\n".join(textwrap.fill(f"- {v.text}", width, subsequent_indent="  ", break_long_words=False,
                                    break_on_hyphens=False) for v in found)
    console.print(Text(text), soft_wrap=True, highlight=False)
    console.print()


def render(rows: list[dict[str, Any]], console: Console, warnings: list[str] | None = None) -> None:
    """Print the report's three tables, the verdicts, the failed points' errors and any warnings."""
    console.print(f"[bold]{TITLE}[/bold]")
    for spec in table_specs(rows):
        render_table(spec, rows, console)
    render_verdicts(verdicts(rows), console)
    for row in rows:
        if row["status"] != "ok":
            console.print(f"[red]{row['status']}[/red] {Path(row['run']).name}: {row.get('error') or 'no error line'}",
                          highlight=False)
    for w in warnings or []:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def _gb(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


MEMORY_CAPTION = ("measured: peak per rank (RSS on CPU, which includes ~0.8 GB of framework; allocator peak on "
                  "GPU); predicted: cnnscale/scaling/memory.py.")
MEMORY_HEADS = [("model", True, 0), ("config", True, 0), ("N", False, 0), ("measured per rank GB", False, 0),
                ("predicted\nGB", False, 0), ("model states\nGB", False, 1), ("meas /\npred", False, 0)]


def memory_cells(r: dict[str, Any]) -> list[str]:
    """The cells of one :func:`memory_table` row under :data:`MEMORY_HEADS`."""
    pred = r["predicted_total_bytes"]
    # RSS carries ~0.8 GB of framework: a ratio means something only when the model's share dominates.
    meaningful = pred and (r["mem_kind"] != "rss" or pred >= 1e9)
    ratio = f"{r['max_rank_peak_bytes'] / pred:.2f}" if meaningful else "n/a"
    return [str(r["model"]), r["config"], str(r["world_size"]), " / ".join(_gb(b) for b in r["rank_peak_bytes"]),
            _gb(pred), _gb(r["predicted_model_states_bytes"]), ratio]


def render_memory(runs: list[Run], console: Console) -> None:
    """Per-rank peak memory by ZeRO stage, measured beside zero_memory's prediction (only when a ZeRO run is present;
    DDP runs of the same models are shown with them as the baseline)."""
    rows = memory_table(runs)
    if rows:
        fit_table(console, "memory per rank by ZeRO stage", MEMORY_CAPTION, MEMORY_HEADS,
                  [memory_cells(r) for r in rows])


PREDICT_CAPTION = ("MB/GFLOP = fp32 gradient MB all-reduced per GFLOP of one worker's step (fwd+bwd). The more bytes "
                   "per FLOP, the sooner communication dominates: that is why VGG-16 (many parameters, few FLOPs per "
                   "image) scales worse than ResNet-18 on the same link.")
PREDICT_HEADS = [("model", True, 0), ("params\nM", False, 2), ("grad\nMB", False, 0), ("batch /\nworker", False, 3),
                 ("GFLOP /\nstep", False, 2), ("MB /\nGFLOP", False, 0), ("compute\nms", False, 1),
                 ("interconnect", True, 0), *((f"N={n}", False, 0) for n in PREDICT_AT),
                 ("compute from", True, 4)]


def predict_cells(r: dict[str, Any]) -> list[str]:
    """The cells of one :func:`cnnscale.report.predict.predict_rows` row under :data:`PREDICT_HEADS`."""
    return [r["model"], f"{r['params'] / 1e6:.2f}", f"{r['grad_mb']:.1f}", str(r["batch"]),
            fmt(r["gflop_step"], ".1f"), fmt(r["mb_per_gflop"], ".3f"), fmt(r["compute_ms"], ".1f"),
            r["interconnect"], *(fmt(r["pred"][n], ".2f") for n in PREDICT_AT), r["source"]]


def render_predict(prows: list[dict[str, Any]], console: Console) -> None:
    """Rich table of :func:`cnnscale.report.predict.predict_rows`, lowest communication per FLOP first."""
    fit_table(console, "scaling model: predicted weak-scaling efficiency", PREDICT_CAPTION, PREDICT_HEADS,
              [predict_cells(r) for r in prows])
