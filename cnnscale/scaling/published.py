"""The scaling model beside published multi-GPU scaling tables (docs/published.md is this module's output).

Each :class:`Row` holds what one published table states: the per-GPU batch, the single-GPU throughput, the N-GPU
throughput or scaling factor, the model (its parameter count from a cited model page), the precision of the
all-reduce and the hardware. From those inputs alone:

    compute_s = batch / (1-GPU img/s)                 the single-GPU time of one optimiser step
    nbytes    = grad_bytes(params, hook)              fp32 gradients unless the source says otherwise
    predicted = predict_efficiency(compute_s, nbytes, N, link)   with the model's defaults (25 MiB buckets,
                                                      backward 2/3 of the step, overlap 1 as on every GPU)
    published = stated speed-up / N  (or N-GPU img/s / (N x 1-GPU img/s) where no speed-up is stated)
    error     = predicted - published, in points

The links (:data:`LINKS`) are new :class:`~cnnscale.scaling.model.Interconnect` objects built from the NVLink or
Ethernet rate their source states, per GPU and per direction, times :data:`ACHIEVABLE` (the model's convention
that a bus all-reduce reaches about 80% of the line rate; no preset matches a DGX-1, DGX-2 or DGX A100); the per-step
latency α is the preset's named in ``latency_from``. Nothing here is fitted to a table: :func:`sensitivity` shows
how little the predictions move with a quarter of the bandwidth.

Run ``python -m cnnscale.scaling.published`` to print the tables as markdown, ``--update docs/published.md`` to
rewrite the generated block of that page. Pure arithmetic (no torch); cost: milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnscale.errors import UserError, run_cli
from cnnscale.scaling.model import PRESETS, Interconnect, grad_bytes, predict_efficiency

__all__ = ["Source", "Link", "Row", "Comparison", "SOURCES", "LINKS", "ROWS", "ACHIEVABLE", "compute_s",
           "published_efficiency", "compare", "summary", "sensitivity", "compute_for_efficiency", "horovod_break_even",
           "render_markdown", "update_doc", "BEGIN", "END", "main"]

ACHIEVABLE = 0.8
"""Share of a link's per-direction line rate that a bus all-reduce reaches (the model's convention, as PRESETS)."""
BEGIN, END = "<!-- published:begin -->", "<!-- published:end -->"
"""Markers around the generated block of docs/published.md."""


@dataclass(frozen=True)
class Source:
    """A cited source: who, what, when, and the address of the stored text the numbers were read from."""

    key: str
    title: str
    authors: str
    year: int
    url: str


@dataclass(frozen=True)
class Link:
    """An interconnect as a source states it, per GPU and per direction, and the model's Interconnect built from it."""

    key: str
    stated: str
    per_direction_Bps: float
    source: str
    latency_from: str = "nvlink"

    def interconnect(self, bandwidth_scale: float = 1.0) -> Interconnect:
        """The model's Interconnect: ACHIEVABLE x the stated rate (x ``bandwidth_scale``), the preset's α, overlap 1."""
        bw = ACHIEVABLE * self.per_direction_Bps * bandwidth_scale
        return Interconnect(self.key, bw, PRESETS[self.latency_from].latency_s, 1.0, self.stated)


@dataclass(frozen=True)
class Row:
    """One published measurement: a model on N GPUs against the same model on one GPU (weak scaling)."""

    key: str
    source: str
    setup: str
    model: str
    params: int
    params_from: str
    batch: int
    img_s_1: float
    img_s_n: float
    n: int
    nodes: int
    link: str
    hook: str = "none"
    stated_speedup: float | None = None
    design: str = "ring"
    """``ring``: the gradients are all-reduced GPU to GPU (NCCL, Horovod, DDP); ``ps-cpu``: parameter server on the
    host CPU, a design the model does not describe (predicted as a ring all the same, and reported apart)."""
    data: str = "real"


@dataclass(frozen=True)
class Comparison:
    """A row's inputs turned into the model's prediction and the published figure."""

    row: Row
    compute_s: float
    nbytes: float
    predicted: float
    published: float

    @property
    def error_pts(self) -> float:
        """Predicted minus published efficiency, in points."""
        return 100 * (self.predicted - self.published)


_DLE = "https://github.com/NVIDIA/DeepLearningExamples/blob/"
SOURCES: dict[str, Source] = {s.key: s for s in (
    Source("dle-tf", "ResNet-50 v1.5 for TensorFlow (README, training performance)", "NVIDIA", 2020,
           _DLE + "1d4211fe9d94550d7bc72bb9b0ac4f576533ca52/TensorFlow/Classification/ConvNets/resnet50v1.5/README.md"),
    Source("dle-pt", "ResNet50 v1.5 for PyTorch (README, training performance; batch from configs.yml at 097c7ff)",
           "NVIDIA", 2021,
           _DLE + "291f0d02e815b148fa5c2b81bf07aa3552142895/PyTorch/Classification/ConvNets/resnet50v1.5/README.md"),
    Source("tf-bench", "TensorFlow Benchmarks (performance guide, DGX-1 P100, May 2017)", "Google, TensorFlow team",
           2017, "https://github.com/tensorflow/docs/blob/62da04c02d67fdcabb7bc64633f217f073fa5f63/site/en/r1/guide/"
           "performance/benchmarks.md"),
    Source("horovod", "Horovod: fast and easy distributed deep learning in TensorFlow (arXiv:1802.05799); "
           "figures from the Horovod docs' Benchmarks page", "A. Sergeev, M. Del Balso (Uber)", 2018,
           "https://github.com/horovod/horovod/blob/27743d08ca7a59290b52154c8cddc807006436d3/docs/benchmarks.rst"),
    Source("tv", "torchvision.models.resnet50 (ResNet V1.5), num_params 25557032", "PyTorch", 2024,
           "https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet50.html"),
    Source("tv-vgg", "torchvision.models.vgg16, num_params 138357544", "PyTorch", 2024,
           "https://pytorch.org/vision/stable/models/generated/torchvision.models.vgg16.html"),
    Source("keras", "Keras Applications, available models (parameters)", "Keras team", 2024,
           "https://keras.io/api/applications"),
    Source("nv-nvlink", "NVLink (A100: up to 12 third-generation links, 600 GB/s in total)", "NVIDIA", 2020,
           "https://www.nvidia.com/de-de/data-center/nvlink/"),
    Source("nv-a100-notes", "A100 white paper, notes (NVSwitch GPU-to-GPU: 300 GB/s gen 1, 600 GB/s gen 2)",
           "J. Zhang", 2020, "https://jingchaozhang.github.io/A100-white-paper/"),
    Source("ali-v100", "Topology-aware GPU scheduling (V100 hybrid cube-mesh: 6 NVLinks, 25 GB/s each way)",
           "Alibaba Cloud", 2026, "https://www.alibabacloud.com/help/es/ack/ack-managed-and-ack-dedicated/user-guide/"
           "overview-of-topology-aware-gpu-scheduling/"),
    Source("mw-p100", "Tesla P100 NVLink GPUs (NVLink 80 GB/s, 160 GB/s bidirectional)", "Microway", 2016,
           "https://www.microway.com/hpc-tech-tips/nvidia-tesla-p100-nvlink-16gb-gpu-accelerator-pascal-gp100-sxm2-"
           "close/"),
)}

LINKS: dict[str, Link] = {k.key: k for k in (
    Link("a100-nvsw", "A100 NVLink 3 via NVSwitch: 600 GB/s total, 300 GB/s each way", 300e9, "nv-nvlink"),
    Link("v100-nvsw", "DGX-2 NVSwitch gen 1: 300 GB/s GPU to GPU, 150 GB/s each way", 150e9, "nv-a100-notes"),
    Link("v100-mesh", "DGX-1 V100 cube mesh: 6 NVLinks x 25 GB/s each way", 150e9, "ali-v100"),
    Link("p100-mesh", "DGX-1 P100 cube mesh: NVLink 80 GB/s each way", 80e9, "mw-p100"),
    Link("25gbe", "25 Gbit/s RoCE per 4-GPU server (ring: one NIC per server)", 25e9 / 8, "horovod", "100gbe"),
)}

RN50, VGG16 = 25_557_032, 138_357_544


def _dle(key: str, src: str, setup: str, batch: int, one: float, many: float, n: int, speedup: float,
         link: str) -> Row:
    return Row(key, src, setup, "RN50v1.5", RN50, "tv", batch, one, many, n, 1, link, stated_speedup=speedup)


def _tfb(key: str, model: str, params: float, one: float, eight: float, design: str, data: str = "synthetic") -> Row:
    src = "tv-vgg" if model == "VGG16" else "keras"
    short = {"ResNet-50": "RN50", "InceptionV3": "IncV3", "ResNet-152": "RN152"}.get(model, model)
    return Row(key, "tf-bench", f"P100 {short} {data[:5]}", model, int(params), src, 64, one, eight, 8, 1, "p100-mesh",
               design=design, data=data)


ROWS: tuple[Row, ...] = (
    _dle("T1", "dle-tf", "A100 TF32", 256, 909, 7000, 8, 7.70, "a100-nvsw"),
    _dle("T2", "dle-tf", "A100 AMP", 256, 2375, 17400, 8, 7.32, "a100-nvsw"),
    _dle("T3", "dle-tf", "DGX-1 V100 FP32", 128, 412, 3170, 8, 7.69, "v100-mesh"),
    _dle("T4", "dle-tf", "DGX-1 V100 AMP", 256, 1270, 9510, 8, 7.48, "v100-mesh"),
    _dle("T5", "dle-tf", "DGX-2 V100 FP32", 128, 432, 6500, 16, 15.05, "v100-nvsw"),
    _dle("T6", "dle-tf", "DGX-2 V100 AMP", 256, 1300, 17250, 16, 13.27, "v100-nvsw"),
    _dle("P1", "dle-pt", "A100 TF32", 256, 938, 7248, 8, 7.72, "a100-nvsw"),
    _dle("P2", "dle-pt", "A100 AMP", 256, 2470, 16621, 8, 6.72, "a100-nvsw"),
    _dle("P3", "dle-pt", "DGX-1 16G FP32", 112, 367, 2855, 8, 7.76, "v100-mesh"),
    _dle("P4", "dle-pt", "DGX-1 16G AMP", 256, 1200, 8322, 8, 6.93, "v100-mesh"),
    _dle("P5", "dle-pt", "DGX-1 32G FP32", 112, 356, 2766, 8, 7.75, "v100-mesh"),
    _dle("P6", "dle-pt", "DGX-1 32G AMP", 256, 1156, 8056, 8, 6.96, "v100-mesh"),
    _tfb("G1", "VGG16", VGG16, 154, 1081, "ring"),
    _tfb("G2", "VGG16", VGG16, 154, 898, "ring", "real"),
    _tfb("G3", "ResNet-50", 25.6e6, 219, 1734, "ps-cpu"),
    _tfb("G4", "ResNet-50", 25.6e6, 218, 1630, "ps-cpu", "real"),
    _tfb("G5", "InceptionV3", 23.9e6, 142, 1131, "ps-cpu"),
    _tfb("G6", "ResNet-152", 60.4e6, 91.8, 716, "ps-cpu"),
)
"""Every row's numbers as its source states them (ResNet-50 rows: fp32 all-reduce; AMP keeps fp32 gradients)."""


def compute_s(row: Row) -> float:
    """Single-GPU time of one optimiser step: the per-GPU batch over the stated single-GPU throughput."""
    return row.batch / row.img_s_1


def published_efficiency(row: Row) -> float:
    """The source's weak-scaling efficiency: its stated speed-up over N, else the throughput ratio over N."""
    if row.stated_speedup is not None:
        return row.stated_speedup / row.n
    return row.img_s_n / (row.n * row.img_s_1)


def _predict(row: Row, bandwidth_scale: float = 1.0) -> float:
    ic = LINKS[row.link].interconnect(bandwidth_scale)
    return predict_efficiency(compute_s(row), grad_bytes(row.params, row.hook), row.n, ic)


def compare(rows: Sequence[Row] = ROWS) -> list[Comparison]:
    """Each row's prediction beside its published efficiency."""
    return [Comparison(r, compute_s(r), grad_bytes(r.params, r.hook), _predict(r), published_efficiency(r))
            for r in rows]


def summary(comps: Sequence[Comparison]) -> dict[str, float]:
    """Median and worst |error| in points over all rows, and over the ring-design rows alone."""
    out: dict[str, float] = {}
    for label, part in (("all", comps), ("ring", [c for c in comps if c.row.design == "ring"])):
        errs = [abs(c.error_pts) for c in part]
        out[f"{label}_n"], out[f"{label}_median"], out[f"{label}_worst"] = len(errs), statistics.median(errs), max(errs)
    return out


def sensitivity(rows: Sequence[Row] = ROWS, bandwidth_scale: float = 0.25) -> float:
    """Largest change of any prediction, in points, when every link delivers ``bandwidth_scale`` of its bandwidth."""
    return max(abs(100 * (_predict(r, bandwidth_scale) - _predict(r))) for r in rows)


def compute_for_efficiency(target: float, nbytes: float, n: int, ic: Interconnect, hi: float = 1e3) -> float:
    """The single-GPU step time (s) at which the model gives ``target`` efficiency at ``n`` (bisection, 200 steps)."""
    if not 0 < target < 1:
        raise UserError(f"target efficiency must be in (0, 1), got {target}")
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if predict_efficiency(mid, nbytes, n, ic) >= target else (mid, hi)
    return hi


def horovod_break_even() -> list[tuple[str, float, float]]:
    """Horovod's 512-GPU figures (no per-GPU throughput stated): the per-GPU img/s (batch 64) that the model needs
    to give the published efficiency on 25 Gbit/s. Returns (model, published efficiency, img/s per GPU)."""
    ic = LINKS["25gbe"].interconnect()
    cases = (("Inception V3", 23.9e6, 0.90), ("ResNet-101", 44.7e6, 0.90), ("VGG-16", 138.4e6, 0.68))  # keras params
    return [(m, eff, 64 / compute_for_efficiency(eff, grad_bytes(int(p)), 512, ic)) for m, p, eff in cases]


def _results_table(comps: Sequence[Comparison]) -> list[str]:
    lines = ["| row | setup | N | step ms | grad MB | link | pred | pub | err |",
             "|---|---|--:|--:|--:|---|--:|--:|--:|"]
    for c in comps:
        r = c.row
        ps = " (ps)" if r.design != "ring" else ""
        lines.append(f"| {r.key} | {r.setup}{ps} | {r.n} | {1e3 * c.compute_s:.0f} | {c.nbytes / 1e6:.0f} | "
                     f"{r.link} | {100 * c.predicted:.1f} | {100 * c.published:.1f} | {c.error_pts:+.1f} |")
    return lines


def _inputs_table(rows: Sequence[Row]) -> list[str]:
    lines = ["| row | model | batch | img/s 1 | img/s N | stated x | params | from | nodes |",
             "|---|---|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        speed = f"{r.stated_speedup:.2f}" if r.stated_speedup is not None else "-"
        lines.append(f"| {r.key} | {r.model} | {r.batch} | {r.img_s_1:g} | {r.img_s_n:g} | {speed} | "
                     f"{r.params / 1e6:.1f}M | {r.params_from} | {r.nodes} |")
    return lines


def _item(text: str) -> list[str]:
    """A markdown list item wrapped at 80 columns (a URL longer than that stays whole on its own line)."""
    return textwrap.wrap(text, 80, initial_indent="- ", subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def render_markdown(rows: Sequence[Row] = ROWS) -> str:
    """The generated block of docs/published.md: results, inputs, links, figures, citations (80 columns, but for
    URLs)."""
    comps = compare(rows)
    s = summary(comps)
    out = ["Efficiency in %; err = predicted - published, in points; (ps): a", "parameter-server design, not a ring "
           "all-reduce. step ms: the 1-GPU step.", ""]
    out += _results_table(comps)
    out += ["", f"Over all {s['all_n']:.0f} rows: median |error| {s['all_median']:.1f} points, worst "
            f"{s['all_worst']:.1f}.", f"Ring rows only ({s['ring_n']:.0f}): median {s['ring_median']:.1f}, worst "
            f"{s['ring_worst']:.1f}. With a quarter of every", f"link's bandwidth no prediction moves by more than "
            f"{sensitivity(rows):.1f} points.", "",
            "Inputs as each source states them (all-reduce in fp32 everywhere: AMP", "keeps fp32 gradients, and "
            "no source enables compression):", ""]
    out += _inputs_table(rows)
    out += ["", f"Links (model bandwidth = {ACHIEVABLE} x the stated rate each way; α from a preset):", ""]
    for link in LINKS.values():
        ic = link.interconnect()
        out += _item(f"`{link.key}`: {link.stated} [{link.source}]; model: {ic.bandwidth_Bps / 1e9:.1f} GB/s, "
                     f"α {ic.latency_s * 1e6:.0f} µs (preset {link.latency_from}), overlap {ic.overlap:g}")
    out += ["", "Horovod, 512 GPUs on 25 Gbit/s (no per-GPU throughput is stated): the", "per-GPU img/s (batch 64) "
            "at or below which the model gives the published", "efficiency:", ""]
    out += [f"- {m}: {100 * eff:.0f}% needs <= {ips:.0f} img/s per GPU" for m, eff, ips in horovod_break_even()]
    out += ["", "Sources:", ""]
    for src in SOURCES.values():
        out += _item(f"[{src.key}] {src.authors}, {src.year}. {src.title}. <{src.url}>")
    return "\n".join(out) + "\n"


def update_doc(path: Path, block: str) -> None:
    """Replace the text between BEGIN and END in ``path`` with ``block``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    if BEGIN not in text or END not in text:
        raise UserError(f"{path} has no {BEGIN} ... {END} block to update")
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{block}{END}{rest.split(END, 1)[1]}")


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnscale.scaling.published", description=__doc__.split("\n")[0])
    parser.add_argument("--update", type=Path, metavar="MD", help="rewrite the generated block of this file")
    args = parser.parse_args(argv)
    block = render_markdown()
    if args.update is None:
        sys.stdout.write(block)
    else:
        update_doc(args.update, block)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison as markdown, or ``--update FILE`` its generated block."""
    return run_cli(_main, argv, prog="python -m cnnscale.scaling.published")


if __name__ == "__main__":
    sys.exit(main())
