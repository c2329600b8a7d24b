"""PNG plots of a scaling report (matplotlib's object API: no pyplot, no display, no global state; safe under SLURM).

Small multiples, one panel per model, so series never pile up in one axes:

- ``efficiency.png``: measured efficiency against N per settings variant (the median over repeats, with the
  repeats' interval as error bars: min-max below 5 repeats, bootstrap 95% from 5; suspect figures not drawn), the
  scaling model's prediction for each point as a cross, and the model's predicted curve
  (:func:`cnnscale.report.predict.predict_rows`) extrapolated to the largest N of ``--predict``;
- ``throughput.png``: img/s against N (error bars likewise) with the ideal linear line dashed;
- ``breakdown.png``: the step time per model, N and variant, stacked: data wait, compute, exposed communication,
  optimiser (and what the profiler did not split, "other");
- ``memory.png``: memory per rank by ZeRO stage where ZeRO runs exist, else the peak memory per model and N.

Every figure has the same pixel size (``FIGSIZE`` x ``DPI``), so files are stable to compare. matplotlib is imported
here only: ``cnnscale report`` imports this module lazily, when plots are asked for. Cost: about 0.1-0.3 s a figure.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cnnscale.report.aggregate import PHASES, group_key
from cnnscale.report.columns import variant_label

__all__ = ["write_plots", "figures", "png_bytes", "plot_throughput", "plot_efficiency", "plot_breakdown",
           "plot_memory", "FIGSIZE", "DPI", "PIXELS"]

FIGSIZE = (10.0, 6.4)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
_PHASE_COLOURS = {"data": "#e6ab02", "compute": "#1b9e77", "comm": "#d95f02", "optim": "#7570b3", "other": "#bbbbbb"}
_PHASE_NAMES = {"data": "data wait", "compute": "compute (fwd+bwd)", "comm": "exposed comm", "optim": "optimiser",
                "other": "other"}


def _ok(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Ok rows that measured ``key``, suspect figures left out (they are never drawn as fact)."""
    return [r for r in rows if r["status"] == "ok" and r.get(key) is not None and key not in r.get("suspect", {})]


def _label(r: dict[str, Any]) -> str:
    label = variant_label(r)
    return label + (f" G={r['global_batch']}" if r["scaling"] == "strong" else "")


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """model -> series label -> N -> the point row. A series is one curve (:func:`group_key`): a variant measured
    at several per-worker batches gets a series per batch, labelled with it (``b=64``)."""
    ok = _ok(rows, key)
    batches: dict[tuple, set] = defaultdict(set)
    for r in ok:
        batches[r["model"], _label(r)].add(group_key(r)[4])
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in ok:
        label = _label(r)
        if len(batches[r["model"], label]) > 1:
            label += f" b={group_key(r)[4] or 'n/a'}"
        out[r["model"]][label].setdefault(r["world_size"], r)
    return out


def _errors(points: list[dict[str, Any]], key: str) -> list[list[float]] | None:
    """matplotlib's yerr (below, above) from the points' ``_lo``/``_hi`` bounds; None when none has an interval."""
    if all(p.get(f"{key}_lo") is None for p in points):
        return None
    below = [p[key] - p[f"{key}_lo"] if p.get(f"{key}_lo") is not None else 0.0 for p in points]
    above = [p[f"{key}_hi"] - p[key] if p.get(f"{key}_hi") is not None else 0.0 for p in points]
    return [below, above]


def _suspect_note(ax: Any, rows: list[dict[str, Any]], model: str, key: str) -> None:
    n = sum(1 for r in rows if r["model"] == model and key in r.get("suspect", {}))
    if n:
        ax.text(0.02, 0.02, f"{n} suspect figure{'s' if n > 1 else ''} not drawn (see the report)",
                transform=ax.transAxes, fontsize=7, color="#b00020")


def _panels(n: int, title: str) -> tuple[Figure, list[Any]]:
    """A figure of ``n`` panels (up to 3 a row), the unused ones hidden."""
    cols = min(max(n, 1), 3)
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig, axes[:n]


def _workers_axis(ax: Any, sizes: set[int]) -> None:
    if sizes:
        ax.set_xscale("log", base=2)
        ticks = sorted(sizes)
        if len(ticks) > 6:  # a long extrapolation: every other power of two
            ticks = [t for t in ticks if round(math.log2(t)) % 2 == 0] or ticks
        ax.set_xticks(ticks, [str(s) for s in ticks])
        ax.minorticks_off()


def plot_efficiency(rows: list[dict[str, Any]], curves: dict[str, dict[int, float]] | None = None) -> Figure:
    """Efficiency against N, a panel per model (see the module docstring)."""
    eff, pred = _series(rows, "efficiency"), _series(rows, "pred_efficiency")
    models = sorted(set(eff) | set(curves or {}))
    fig, axes = _panels(len(models), "Scaling efficiency: measured (median, bars: the repeats' interval), "
                        "scaling model (x: per point, line: extrapolated)")
    for ax, model in zip(axes, models):
        sizes: set[int] = set()
        for label, by_n in sorted(eff.get(model, {}).items()):
            xs = sorted(by_n)
            points = [by_n[n] for n in xs]
            line = ax.errorbar(xs, [p["efficiency"] for p in points], yerr=_errors(points, "efficiency"), marker="o",
                               capsize=3, label=label)
            sizes.update(xs)
            p = pred.get(model, {}).get(label)
            if p:
                ax.plot(sorted(p), [p[n]["pred_efficiency"] for n in sorted(p)], linestyle="none", marker="x",
                        markersize=9, color=line[0].get_color())
        curve = (curves or {}).get(model)
        if curve:
            ax.plot(sorted(curve), [curve[n] for n in sorted(curve)], color="black", linewidth=1.2, alpha=0.7,
                    label="scaling model")
            sizes.update(curve)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_ylim(0, 1.15)
        _workers_axis(ax, sizes)
        _suspect_note(ax, rows, model, "efficiency")
        _style(ax, model, "workers (N)", "efficiency")
    return fig


def plot_throughput(rows: list[dict[str, Any]]) -> Figure:
    """img/s against N (median, bars: the repeats' interval), a panel per model, each series' ideal (linear from
    its smallest N) dashed."""
    tput = _series(rows, "img_per_s")
    fig, axes = _panels(len(tput), "Throughput against workers (bars: the repeats' interval; dashed: ideal linear)")
    for ax, model in zip(axes, sorted(tput)):
        sizes: set[int] = set()
        for label, by_n in sorted(tput[model].items()):
            xs = sorted(by_n)
            points = [by_n[n] for n in xs]
            ys = [p["img_per_s"] for p in points]
            line = ax.errorbar(xs, ys, yerr=_errors(points, "img_per_s"), marker="o", capsize=3, label=label)
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle="--", color=line[0].get_color(), alpha=0.5)
            sizes.update(xs)
        _workers_axis(ax, sizes)
        _suspect_note(ax, rows, model, "img_per_s")
        _style(ax, model, "workers (N)", "images / s")
    return fig


def _step_parts(r: dict[str, Any]) -> dict[str, float]:
    """ms per step of each phase (and "other": what the shares leave of the mean step)."""
    step_ms = 1000 * r["step_s"]
    parts = {p: 1000 * r["step_s"] * (r[f"{p}_share"] or 0.0) for p in PHASES}
    parts["other"] = max(step_ms - sum(parts.values()), 0.0)
    return parts


def plot_breakdown(rows: list[dict[str, Any]]) -> Figure:
    """Stacked bars of the mean step time per model (a panel each), N and variant."""
    ok = [r for r in _ok(rows, "step_s") if r["compute_share"] is not None]
    models = sorted({r["model"] for r in ok})
    fig, axes = _panels(len(models), "Where the step time goes (mean step = per-worker batch x N / img/s)")
    for ax, model in zip(axes, models):
        mine = [r for r in ok if r["model"] == model]
        labels = [f"N={r['world_size']}\n{_label(r)}" for r in mine]
        bottom = [0.0] * len(mine)
        for phase in (*PHASES, "other"):
            heights = [_step_parts(r)[phase] for r in mine]
            ax.bar(range(len(mine)), heights, bottom=bottom, color=_PHASE_COLOURS[phase], label=_PHASE_NAMES[phase],
                   width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.margins(y=0.08)
        _style(ax, model, "", "ms per step", legend=False)
    if axes:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize=8)
    return fig


def plot_memory(rows: list[dict[str, Any]], zero_rows: list[dict[str, Any]] | None = None) -> Figure:
    """Memory per rank by ZeRO stage (``zero_rows``: :func:`cnnscale.report.columns.memory_table`) when there are
    any, a panel per model with a bar per rank; else the peak memory per model, one bar per N."""
    if zero_rows:
        models = sorted({str(r["model"]) for r in zero_rows})
        fig, axes = _panels(len(models), "Peak memory per rank by ZeRO stage (bars: measured per rank)")
        for ax, model in zip(axes, models):
            mine = [r for r in zero_rows if str(r["model"]) == model]
            for i, r in enumerate(mine):
                ranks = r["rank_peak_bytes"]
                w = 0.8 / len(ranks)
                bars = ax.bar([i - 0.4 + w * (k + 0.5) for k in range(len(ranks))], [b / 1e9 for b in ranks],
                              width=w, color="#1b9e77" if r["zero_stage"] else "#7570b3", edgecolor="white")
                for k, (bar, b) in enumerate(zip(bars, ranks)):
                    ax.text(bar.get_x() + w / 2, 0.05, f"rank {k}\n{b / 1e9:.2f}", ha="center", va="bottom",
                            fontsize=7, color="white")
                if r["predicted_total_bytes"]:
                    ax.hlines(r["predicted_total_bytes"] / 1e9, i - 0.45, i + 0.45, color="black",
                              label="predicted per rank" if i == 0 else None)
                if r["predicted_model_states_bytes"]:
                    ax.hlines(r["predicted_model_states_bytes"] / 1e9, i - 0.45, i + 0.45, color="black",
                              linestyle="--", label="of which model states (ZeRO paper)" if i == 0 else None)
            ax.set_xticks(range(len(mine)), [f"{r['config']}\nN={r['world_size']}" for r in mine], fontsize=7)
            _style(ax, model, "", "GB per rank")
        return fig
    mem = _series(rows, "peak_mem_bytes")
    kinds = {r["mem_kind"] for r in _ok(rows, "peak_mem_bytes")}
    what = "GPU allocator peak" if kinds == {"gpu"} else "peak RSS per process" if kinds == {"rss"} else "peak"
    fig, axes = _panels(len(mem), f"Peak memory per model ({what}, max over ranks)")
    for ax, model in zip(axes, sorted(mem)):
        bars = [(f"N={n}\n{label}", p["peak_mem_bytes"]) for label, by_n in sorted(mem[model].items())
                for n, p in sorted(by_n.items())]
        ax.bar(range(len(bars)), [v / 1e9 for _, v in bars], color="#7570b3", width=0.6)
        ax.set_xticks(range(len(bars)), [b for b, _ in bars], fontsize=7)
        _style(ax, model, "", "GB", legend=False)
    return fig


def _style(ax: Any, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def figures(rows: list[dict[str, Any]], curves: dict[str, dict[int, float]] | None = None,
            zero_rows: list[dict[str, Any]] | None = None) -> dict[str, Figure]:
    """File name -> figure, for every plot of the report."""
    return {"efficiency.png": plot_efficiency(rows, curves), "throughput.png": plot_throughput(rows),
            "breakdown.png": plot_breakdown(rows), "memory.png": plot_memory(rows, zero_rows)}


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (fixed pixel size: no bbox_inches="tight")."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def write_plots(rows: list[dict[str, Any]], out_dir: str | Path, curves: dict[str, dict[int, float]] | None = None,
                zero_rows: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write the figures of :func:`figures` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(rows, curves, zero_rows).items():
        fig.savefig(out / name, dpi=DPI)
        paths.append(out / name)
    return paths
