"""``lab_efficiency.png``: the lab comparison (:mod:`cnnscale.report.lab`) as small multiples, one panel per model
and settings variant. Per network profile (one colour each): the predicted efficiency on the fitted terms against N
as a line (from 1 at N=1 through every measured N), the base model dotted, and the measured medians with their
intervals as points (hollow: a point ruled by the OS scheduler). matplotlib is imported here only (lazily, by the
report, when --plots or --html asks for figures). Cost: about 0.3 s.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from matplotlib.figure import Figure

from cnnscale.report.lab import LabResult
from cnnscale.report.load import profile_order
from cnnscale.report.plots import _panels, _style

__all__ = ["plot_lab", "LAB_PNG"]

LAB_PNG = "lab_efficiency.png"
_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def plot_lab(result: LabResult) -> Figure:
    """The figure (see the module docstring)."""
    panels: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for p in result.points:
        panels[p["model"], p["settings"]][p["network"]].append(p)
    keys = sorted(panels)
    fig, axes = _panels(len(keys), "Lab: predicted efficiency on the fitted terms (line; dotted: the base model)\n"
                        "measured: median and interval over the repeats (points; hollow: ruled by the OS scheduler)")
    colours = {prof: _COLOURS[i % len(_COLOURS)]
               for i, prof in enumerate(profile_order({p["network"] for p in result.points}))}
    for ax, key in zip(axes, keys):
        sizes = {1}
        for prof in profile_order(set(panels[key])):
            pts = sorted(panels[key][prof], key=lambda p: p["world_size"])
            xs = [1] + [p["world_size"] for p in pts]
            c = colours[prof]
            ax.plot(xs, [1.0] + [p["pred"] for p in pts], color=c, linewidth=1.5, label=f"{prof} predicted")
            ax.plot(xs, [1.0] + [p["pred_base"] for p in pts], color=c, linewidth=0.8, linestyle=":")
            for p in pts:
                lo, hi = p["efficiency_lo"], p["efficiency_hi"]
                yerr = [[p["efficiency"] - lo], [hi - p["efficiency"]]] if lo is not None and hi is not None else None
                hollow = p["ruled_by"] == "scheduler"
                ax.errorbar([p["world_size"]], [p["efficiency"]], yerr=yerr, marker="o", capsize=3, color=c,
                            markerfacecolor="white" if hollow else c, linestyle="none")
            sizes.update(xs)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_ylim(0, 1.15)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])  # a few N: a linear axis reads best
        model, settings = key
        _style(ax, f"{model} ({settings})", "workers (N)", "efficiency")
    return fig
