"""The report's three tables as data: which columns, their headers (with units), cells and priorities.

Split by concern, so that each fits a terminal: **scaling** (N, batch, img/s, speedup, efficiency and its range
over repeats, the scaling model's prediction and error), **resources** (step time and its split, memory,
utilisation, MFU) and **training** (steps, loss, accuracy). Units go in the header; a cell holds a number only.
Rows are grouped by model: a model's name is a row of its own, its runs are indented below it, labelled by settings
variant (and precision when not fp32). Both renderers use these specs: rich (:mod:`cnnscale.report.tables`) and
HTML (:mod:`cnnscale.report.html`). Pure: no rich, no files.

``priority``: the order in which a renderer that runs out of width drops columns (highest first; 0 is never
dropped), naming what it dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cnnscale.records.run import Run
from cnnscale.scaling.memory import memory_rows

__all__ = ["Column", "TableSpec", "table_specs", "variant_label", "display_rows", "memory_table", "fmt", "rate",
           "footnotes", "SUSPECT"]

SUSPECT = "suspect"
"""The cell of a figure that a rule of :mod:`cnnscale.records.checks` rejects; a footnote under the table says why."""

Cell = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Column:
    """One column: header (``\\n`` splits it over two lines), right-aligned unless ``left``, a cell function;
    ``key``: the row's figure it shows (for the suspect footnotes)."""

    header: str
    cell: Cell
    priority: int = 0
    left: bool = False
    key: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """A table: its name (``scaling``, ``resources``, ``training``), title, columns, caption, and whether failed
    runs appear in it (only the scaling table shows them, as their status)."""

    name: str
    title: str
    columns: tuple[Column, ...]
    caption: str
    failed_rows: bool = False


def fmt(x: Any, spec: str, na: str = "n/a") -> str:
    """``format(x, spec)``, or ``na`` for None."""
    return na if x is None else format(x, spec)


def rate(x: float | None) -> str:
    """img/s: whole images from 100 up, one decimal below."""
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def variant_label(row: dict[str, Any]) -> str:
    """Settings variant, with the precision when not fp32, and ``@profile`` for a lab point's network."""
    label = row["settings"]
    if row["precision"] != "no":
        label = row["precision"] if label == "default" else f"{label} {row['precision']}"
    return f"{label} @{row['network']}" if row.get("network") else label


def display_rows(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None]]:
    """(label, row) per line: a model's name with None before its points, then each point (a row of
    :func:`cnnscale.report.aggregate.aggregate`) labelled by :func:`variant_label`, indented by two spaces."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    last = None
    for row in rows:
        if row["model"] != last:
            out.append((row["model"], None))
            last = row["model"]
        out.append(("  " + variant_label(row), row))
    return out


def _kind(rows: list[dict[str, Any]], key: str) -> str | None:
    """The one kind (rss/gpu, cpu/gpu) every measured row shares, or None when they differ."""
    kinds = {r[key] for r in rows if r["status"] == "ok"}
    return next(iter(kinds)) if len(kinds) == 1 else None


def _kind_column(rows: list[dict[str, Any]], key: str, kind_key: str, heads: dict[str, str], other: str, spec: str,
                 scale: float, width: int) -> Column:
    """A measured figure whose kind (rss/gpu, cpu/gpu) goes in the header when every row shares it, else beside
    each value."""
    kind = _kind(rows, kind_key)
    head = heads.get(kind or "", other)

    def cell(r: dict[str, Any]) -> str:
        if r[key] is None:
            return "n/a"
        return f"{r[key] / scale:{spec}}" + ("" if kind else f" {r[kind_key]}")

    return Column(head, cell, width)


def _mem_column(rows: list[dict[str, Any]]) -> Column:
    heads = {"rss": "RSS\nGB", "gpu": "GPU\nGB"}
    return _kind_column(rows, "peak_mem_bytes", "mem_kind", heads, "peak\nGB", ".2f", 1e9, 4)


def _util_column(rows: list[dict[str, Any]]) -> Column:
    return _kind_column(rows, "util_pct", "util_kind", {"cpu": "CPU\n%", "gpu": "GPU\n%"}, "util\n%", ".0f", 1.0, 5)


def _fig(key: str, show: Callable[[Any], str], na: str = "n/a") -> Cell:
    """The figure ``key`` shown by ``show``; "suspect" when a rule rejects it, ``na`` when it is None."""
    return lambda r: SUSPECT if key in r.get("suspect", {}) else (na if r[key] is None else show(r[key]))


def _bounds(key: str, show: Callable[[Any], str]) -> Column:
    """The interval column of figure ``key``: ``lo..hi``, empty for a point measured once or a suspect figure."""
    def cell(r: dict[str, Any]) -> str:
        lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
        return "" if lo is None or hi is None or key in r.get("suspect", {}) else f"{show(lo)}..{show(hi)}"
    return Column("", cell, key=key)


def _interval_head(rows: list[dict[str, Any]]) -> str:
    kinds = {r["interval"] for r in rows if r.get("interval")}
    return {frozenset({"min-max"}): "range", frozenset({"bootstrap95"}): "95% CI"}.get(frozenset(kinds), "interval")


def _pred(r: dict[str, Any]) -> str:
    return (fmt(r["pred_efficiency"], ".2f", "") + ("*" if r.get("pred_calibrated") else "")
            + ("~" if r.get("within_noise") else ""))


def _status_or(cell: Cell) -> Cell:
    """``cell`` for an ok row; a row that did not end ok shows its status in capitals instead."""
    return lambda r: cell(r) if r["status"] == "ok" else r["status"].upper()


def _with(col: Column, header: str, priority: int) -> Column:
    return Column(header, col.cell, priority, col.left, col.key)


def _scaling(rows: list[dict[str, Any]]) -> TableSpec:
    ics = sorted({r["interconnect"] for r in rows if r["interconnect"]})
    repeated = any(r["repeats"] > 1 for r in rows)
    head = _interval_head(rows)
    two = lambda x: f"{x:.2f}"  # noqa: E731
    pts = lambda x: f"{x:+.1f}"  # noqa: E731
    cols = [Column("N", lambda r: str(r["world_size"])),
            Column("batch", lambda r: fmt(r["global_batch"], "d"), 4),
            Column("img/s", _status_or(_fig("img_per_s", rate)), key="img_per_s")]
    if repeated:
        cols.append(_with(_bounds("img_per_s", rate), f"img/s\n{head}", 2))
    cols += [Column("speedup", _fig("speedup", two, ""), 3, key="speedup"),
             Column("eff", _fig("efficiency", two, ""), key="efficiency")]
    if repeated:
        cols += [_with(_bounds("efficiency", two), f"eff\n{head}", 1),
                 Column("n", lambda r: str(r["repeats"]) if r["status"] == "ok" else "")]
    cols += [Column("pred", _pred, 1), Column("err\npts", _fig("pred_error_pts", pts, ""), 2, key="pred_error_pts")]
    if repeated:
        cols.append(_with(_bounds("pred_error_pts", pts), f"err\n{head}", 6))
    caption = ("batch = global batch; eff = img/s(N) x N0 / (N x img/s(N0)), N0 = smallest N of the same model, "
               "precision, settings and per-worker batch; pred = scaling model (cnnscale/scaling/model.py)"
               + (f" on {', '.join(ics)}" if ics else "") + "; err = pred - eff in points")
    if any(r.get("pred_calibrated") for r in rows):
        caption += ("; pred* = compute time at N taken from the compute_only run (N processes sharing the machine, "
                    "no all-reduce), the model predicting the communication")
    if repeated:
        caption += ("; every figure is the median over the point's n repeats, with its range (min..max) below 5 "
                    "repeats and a bootstrap 95% interval of the median (95% CI) from 5 on; eff pairs repeat i at N "
                    "with repeat i at N0, so its interval is the ratio's own; ~ = within noise: the prediction lies "
                    "inside the measured interval")
    return TableSpec("scaling", "scaling", tuple(cols), caption + ".", failed_rows=True)


def _resources(rows: list[dict[str, Any]]) -> TableSpec:
    repeated = any(r["repeats"] > 1 for r in rows)
    head = _interval_head(rows)
    share = lambda x: _pct(x)  # noqa: E731
    cols = [Column("N", lambda r: str(r["world_size"])), Column("step\nms", _fig("step_ms", _ms), key="step_ms")]
    if repeated:
        cols.append(_with(_bounds("step_ms", _ms), f"step ms\n{head}", 2))
    cols += [Column("data\n%", _fig("data_share", share), 3, key="data_share"),
             Column("compute\n%", _fig("compute_share", share), 2, key="compute_share"),
             Column("comm\n%", _fig("comm_share", share), key="comm_share")]
    if repeated:
        cols.append(_with(_bounds("comm_share", share), f"comm %\n{head}", 2))
    cols += [Column("optim\n%", _fig("optim_share", share), 3, key="optim_share"),
             _mem_column(rows), _util_column(rows), Column("MFU\n%", _fig("mfu", lambda x: _pct(x, 2)), 1, key="mfu")]
    caption = ("step ms = median step; data / compute / comm / optim = share of the training time spent waiting for "
               "data, in forward+backward, in gradient all-reduce not hidden by the backward (timed in DDP's "
               "communication hook; runs before it: the no_sync probe), in the optimiser; memory = peak over ranks "
               "(RSS on CPU, allocator peak on GPU); "
               "util = CPU or GPU busy, not efficiency: MFU beside it.")
    return TableSpec("resources", "resources", tuple(cols), caption)


def _training(rows: list[dict[str, Any]]) -> TableSpec:
    cols = (Column("N", lambda r: str(r["world_size"])), Column("steps", lambda r: fmt(r["steps"], ",d"), 2),
            Column("train\nloss", lambda r: fmt(r["final_loss"], ".3f")),
            Column("test\nloss", lambda r: fmt(r["test_loss"], ".3f"), 1),
            Column("test\nacc %", lambda r: _pct(r["test_acc"])))
    caption = "train loss = last logged training loss; test = the run's final evaluation (n/a: none was made)."
    return TableSpec("training", "training", cols, caption)


def table_specs(rows: list[dict[str, Any]]) -> list[TableSpec]:
    """The scaling, resources and training tables for ``rows`` (headers depend on what the rows measured)."""
    return [_scaling(rows), _resources(rows), _training(rows)]


def footnotes(spec: TableSpec, rows: list[dict[str, Any]]) -> list[str]:
    """One line per suspect figure that ``spec`` shows: which point, which figure, and the rule's reason."""
    keys: dict[str, str] = {}
    for c in spec.columns:  # the figure's own column, not its interval's (which comes after it)
        if c.key:
            keys.setdefault(c.key, c.header.replace("\n", " "))
    out = []
    for label, r in display_rows([r for r in rows if spec.failed_rows or r["status"] == "ok"]):
        if r is None:
            continue
        by_reason: dict[str, list[str]] = {}
        for key, why in (r.get("suspect") or {}).items():
            if key in keys:
                by_reason.setdefault(why, []).append(keys[key])
        out += [f"{SUSPECT}: {r['model']} {label.strip()} N={r['world_size']}, {', '.join(heads)}: {why}"
                for why, heads in by_reason.items()]
    return out


def memory_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows of memory per rank by ZeRO stage (only models with a ZeRO run; their DDP runs as the baseline)."""
    zero = {r.env.model or (r.summary.model if r.summary else None) for r in runs if r.env.zero_stage}
    if not zero:  # the common case: no record conversion at all (1,000 runs: ~1 s saved)
        return []
    rows = memory_rows({"path": r.path, "summary": r.summary.to_dict() if r.summary else {}, "env": r.env.to_dict()}
                       for r in runs if (r.env.model or (r.summary.model if r.summary else None)) in zero)
    zero_models = {r["model"] for r in rows if r["zero_stage"]}
    return [r for r in rows if r["model"] in zero_models]
