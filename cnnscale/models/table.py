"""``cnnscale models``: the model zoo with params, MACs and FLOPs per 32x32 image, the seed's claims beside them.

Counts are measured, not quoted: each model is built on the ``meta`` device (no memory, no init cost) and run
once under FlopCounterMode (:mod:`cnnscale.profile.flops`). Where the seed's table has a row for a model, its
numbers are shown next to ours with a note saying why they differ, so a mismatch is visible rather than silently
corrected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from cnnscale.config.argv import CommandParser
from cnnscale.errors import UserError, choices_error
from cnnscale.models._registry import create_model, list_models, model_family
from cnnscale.profile.flops import count_flops

__all__ = ["main", "measure", "render", "SeedClaim", "SEED_CLAIMS", "FOOTNOTE"]


@dataclass(frozen=True)
class SeedClaim:
    """One row of the seed's model table, and why it differs from what we measure."""

    label: str
    """The seed's name for the model."""
    params_m: float
    """Parameters, millions, as the seed printed them."""
    flops_m: float
    """The seed's "FLOPs", millions. These are MACs (multiply-accumulates), not FLOPs."""
    note: str
    """Why the seed's numbers differ from ours, or that they match (printed as a footnote)."""


_LENET = SeedClaim(
    "LeNet-5", 0.06, 0.4,
    "params match; 0.4M MACs is LeNet-5 on 1-channel input (416,520). CIFAR's 3 channels triple the first conv.",
)
_ALEXNET = SeedClaim(
    "AlexNet", 61.1, 727,
    "torchvision's ImageNet AlexNet (224x224 input, 1000 classes), which fails on 32x32 input. Ours is the CIFAR "
    "adaptation, 23.3M params as measured for the seed (see cnnscale/models/alexnet.py).",
)
_VGG16 = SeedClaim(
    "VGG-16", 138, 313,
    "138M is ImageNet VGG-16's params (4096-4096 head, 1000 classes); the 313M MACs are the CIFAR conv stack's "
    "and match. vgg16_classic is that head at 10 classes: 134.3M params, +120M MACs (its 7x7 pool copies the 1x1 "
    "map 49 times).",
)
_RESNET18 = SeedClaim(
    "ResNet-18", 11.2, 558,
    "matches (MACs 0.5% lower here: the seed's counter probably also counted some BN, ReLU or adds).",
)
_MOBILENET_V2 = SeedClaim(
    "MobileNetV2", 2.3, 97,
    "not reproduced: the seed's own CIFAR MobileNetV2 (this layout) has 2,236,682 params and 88.0M MACs. "
    "The table's numbers are shown as printed.",
)

# model name -> the seed table's row for it
SEED_CLAIMS: dict[str, SeedClaim] = {
    "lenet5": _LENET,
    "alexnet": _ALEXNET,
    "vgg16": _VGG16,
    "vgg16_bn": _VGG16,
    "vgg16_classic": _VGG16,
    "resnet18": _RESNET18,
    "mobilenet_v2": _MOBILENET_V2,
}

FOOTNOTE = (
    "MACs and FLOPs per 32x32x3 image at 10 classes, forward, counted by torch FlopCounterMode (convolutions and "
    "matmuls only; FLOPs = 2 x MACs). The seed's 'FLOPs' are MACs: compare them with MACs (M). Notes:"
)


def measure(names: list[str], backward: bool = False) -> list[dict[str, Any]]:
    """Params and forward MACs/FLOPs per 32x32 image for each model, with the seed's row.

    ``backward=True`` adds ``fwd_bwd_flops`` (forward + backward, about 3x forward; doubles the time taken).
    """
    rows = []
    for name in names:
        with torch.device("meta"):  # shapes only: no memory, no init time, same op counts
            model = create_model(name)
        counts = count_flops(model, (1, 3, 32, 32), backward=backward)
        claim = SEED_CLAIMS.get(name)
        row = {
            "name": name,
            "family": model_family(name),
            "params": sum(p.numel() for p in model.parameters()),
            "macs": int(counts["macs"]),
            "flops": int(counts["flops"]),
            "seed_label": claim.label if claim else None,
            "seed_params_m": claim.params_m if claim else None,
            "seed_flops_m": claim.flops_m if claim else None,
            "seed_note": claim.note if claim else None,
        }
        if backward:
            row["fwd_bwd_flops"] = int(counts["fwd_bwd_flops"])
        rows.append(row)
    return rows


def _num(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _seed_cell(claimed: float | None, ours_m: float) -> str:
    """The seed's number, yellow when more than 5% off ours."""
    if claimed is None:
        return ""
    text = _num(claimed)
    return f"[yellow]{text}[/yellow]" if abs(claimed - ours_m) > 0.05 * ours_m else text


def render(rows: list[dict[str, Any]], console: Any) -> None:
    """Print the rows as a rich table on ``console``, then one footnote per distinct seed row.

    Narrow enough for 80 columns: the reasons for each difference from the seed go in the footnotes.
    """
    backward = any("fwd_bwd_flops" in row for row in rows)
    table = Table(title="cnnscale models: CIFAR-10, per 32x32 image", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    table.add_column("family", no_wrap=True)
    headers = ["params (M)", "MACs (M)", "FLOPs (M)"] + (["fwd+bwd FLOPs (M)"] if backward else [])
    for header in [*headers, "seed params (M)", "seed 'FLOPs' (M)", "note"]:
        table.add_column(header, justify="right")
    notes: list[str] = []
    for row in rows:
        params_m, macs_m = row["params"] / 1e6, row["macs"] / 1e6
        ours = [_num(params_m), _num(macs_m), _num(row["flops"] / 1e6)]
        if backward:
            ours.append(_num(row["fwd_bwd_flops"] / 1e6))
        note = ""
        if row["seed_note"] is not None:
            seed_numbers = f"{_num(row['seed_params_m'])}M params, {_num(row['seed_flops_m'])}M 'FLOPs'"
            text = f"{row['seed_label']} ({seed_numbers}): {row['seed_note']}"
            if text not in notes:
                notes.append(text)
            note = f"[{notes.index(text) + 1}]"
        seed = [_seed_cell(row["seed_params_m"], params_m), _seed_cell(row["seed_flops_m"], macs_m)]
        table.add_row(row["name"], row["family"], *ours, *seed, note)
    console.print(table)
    console.print(FOOTNOTE, markup=False)
    for i, text in enumerate(notes, 1):
        console.print(f"[{i}] seed's {text}", markup=False, highlight=False)


def _select(models: str | None, family: str | None) -> list[str]:
    names = list_models()
    if models:
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        for name in wanted:
            if name not in names:
                raise choices_error("model", name, names)
        names = wanted
    if family:
        families = sorted({model_family(n) for n in list_models()})
        if family not in families:
            raise choices_error("family", family, families)
        names = [n for n in names if model_family(n) == family]
    if not names:
        raise UserError(f"no model of family {family!r} among {models!r}")
    return names


def main(argv: list[str]) -> int:
    """``cnnscale models [--models A,B] [--family F] [--json] [--backward]``."""
    parser = CommandParser(
        "cnnscale models",
        description="List the model zoo: params, MACs and FLOPs per 32x32 image, the seed's claims beside them.",
    )
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--family", help="only models of this family (vgg, resnet, mobilenet, ...)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows to stdout instead")
    parser.add_argument("--backward", action="store_true", help="also count forward+backward FLOPs (slower)")
    args = parser.parse_args(argv)

    rows = measure(_select(args.models, args.family), backward=args.backward)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    render(rows, Console())
    return 0
