"""PNG plots of a scaling report (matplotlib's object API: no pyplot, no display, no global state; safe under SLURM).

Each function takes the flat rows of :func:`cnnscale.report.aggregate.aggregate` and writes one PNG of a fixed size
(``FIGSIZE`` x ``DPI``: 900 x 540 pixels), so the files are stable to compare.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["write_plots", "plot_throughput", "plot_efficiency", "plot_memory", "FIGSIZE", "DPI", "PIXELS"]

FIGSIZE = (9.0, 5.4)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def _series(rows: list[dict[str, Any]], value: str) -> dict[str, list[tuple[int, float]]]:
    """Label -> sorted (world size, value) of ok rows; the label is model (+ settings/precision when not default)."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok" or r.get(value) is None:
            continue
        label = r["model"]
        if r["settings"] != "default":
            label += f" [{r['settings']}]"
        if r["precision"] != "no":
            label += f" {r['precision']}"
        if r["scaling"] == "strong":
            label += f" G={r['global_batch']}"
        else:
            label += f" b={r['micro_batch'] * r['grad_accum']}"
        out[label].append((r["world_size"], float(r[value])))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": keep the pixel size fixed
    return path


def _workers_axis(ax: Any, sizes: set[int]) -> None:
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(s) for s in sorted(sizes)])


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> Path:
    """img/s against workers, one line per model, with each model's ideal (linear from its smallest N) dashed."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    sizes: set[int] = set()
    for label, pts in _series(rows, "img_per_s").items():
        xs, ys = zip(*pts)
        sizes.update(xs)
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle="--", color=line.get_color(), alpha=0.5)
    ax.set_yscale("log")
    _workers_axis(ax, sizes)
    return _finish(fig, ax, path, "Throughput vs workers (dashed: ideal linear scaling)", "workers (world size)",
                   "images / s")


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> Path:
    """Measured efficiency per model (solid) and the scaling model's prediction (dotted, same colour)."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    sizes: set[int] = set()
    pred = _series(rows, "pred_efficiency")
    for label, pts in _series(rows, "efficiency").items():
        xs, ys = zip(*pts)
        sizes.update(xs)
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        if label in pred:
            px, py = zip(*pred[label])
            ax.plot(px, py, linestyle=":", marker="x", color=line.get_color(), label=f"{label} (predicted)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylim(0, 1.15)
    _workers_axis(ax, sizes)
    return _finish(fig, ax, path, "Scaling efficiency (solid: measured, dotted: scaling model)",
                   "workers (world size)", "efficiency")


def plot_memory(rows: list[dict[str, Any]], path: Path) -> Path:
    """Peak memory per model (GPU allocator peak, else process RSS), one bar per world size."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    series = _series(rows, "peak_mem_bytes")
    sizes = sorted({n for pts in series.values() for n, _ in pts})
    width = 0.8 / max(len(sizes), 1)
    for i, n in enumerate(sizes):
        xs = [j + i * width for j, pts in enumerate(series.values()) if n in dict(pts)]
        ys = [dict(pts)[n] / 1e9 for pts in series.values() if n in dict(pts)]
        ax.bar(xs, ys, width=width, label=f"N={n}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(series))], list(series), rotation=15, fontsize=7)
    kinds = {r["mem_kind"] for r in rows if r["status"] == "ok" and r.get("peak_mem_bytes") is not None}
    what = "GPU allocator peak" if kinds == {"gpu"} else "peak RSS per process" if kinds == {"rss"} else "peak"
    return _finish(fig, ax, path, f"Peak memory per model ({what})", "model", "GB")


def write_plots(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write throughput.png, efficiency.png and memory.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    return [plot_throughput(rows, out / "throughput.png"), plot_efficiency(rows, out / "efficiency.png"),
            plot_memory(rows, out / "memory.png")]
