"""Global unstructured L1 pruning with ``torch.nn.utils.prune``, optional fine-tuning, then permanent removal.

``cnnscale prune RUN_DIR --amount 0.5 [--include-linear] [--finetune-epochs N] [--out DIR] [training flags]``

1. Load the run's model (safetensors) and measure test accuracy.
2. ``prune.global_unstructured(..., L1Unstructured, amount)`` over every Conv2d weight (and Linear with
   ``--include-linear``): the ``amount`` fraction of those weights with the smallest |w|, ranked across all layers
   together, is masked. Layers therefore end up with different sparsities; the report gives each one.
3. With ``--finetune-epochs N``: train N epochs through the ordinary Accelerate loop (:func:`cnnscale.train.loop.run`
   with the masked model, any world size). The masks are forward pre-hooks on the modules, applied before
   ``accelerator.prepare`` wraps the model in DDP, so they hold during fine-tuning: masked weights stay exactly zero.
   The run's own config is the base (its optimiser and schedule; pass ``--lr`` for a smaller fine-tuning rate).
4. ``prune.remove`` folds each mask into its weight; the result is an ordinary model, saved as
   ``OUT/model.safetensors`` with ``OUT/prune.json`` (sparsity per layer and overall, accuracy before/after).

Unstructured sparsity does not make a dense model smaller or faster by itself: the zeros are still stored and
multiplied. It shows how much of the model is redundant; sparse kernels or structured pruning turn it into speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import prune

from cnnscale.compress.common import (
    WEIGHTS,
    check_out,
    command_parser,
    eval_accuracy,
    eval_loader,
    load_run_model,
    run_overrides,
    save_weights,
)
from cnnscale.config import CommandParser, Config, config_from_args, config_to_dict
from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.train.build import process_device
from cnnscale.train.loop import run

__all__ = ["PruneConfig", "prunable", "apply_global_l1", "make_permanent", "sparsity_report", "main", "PRUNE_RECORD"]

PRUNE_RECORD = "prune.json"


@dataclass(frozen=True)
class PruneConfig:
    """Pruning: the fraction of weights to zero, which layers, and the fine-tuning after it"""

    amount: float = 0.5
    """Fraction of the prunable weights to zero, ranked by |w| across all of them; strictly between 0 and 1."""
    include_linear: bool = False
    """Prune Linear weights too (by default only Conv2d weights)."""
    finetune_epochs: int = 0
    """Epochs of fine-tuning with the masks in place before they are made permanent (0: none)."""

    def __post_init__(self) -> None:
        if not 0 < self.amount < 1:
            raise UserError(f"prune.amount must be strictly between 0 and 1 (a fraction of weights), got {self.amount}")
        if self.finetune_epochs < 0:
            raise UserError(f"prune.finetune_epochs must be >= 0, got {self.finetune_epochs}")


SHORT = {"--amount": "amount", "--include-linear": "include_linear", "--finetune-epochs": "finetune_epochs"}


def prunable(model: nn.Module, include_linear: bool = False) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv2d (and Linear when asked) that has a weight, in model order."""
    kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def apply_global_l1(model: nn.Module, amount: float, include_linear: bool = False) -> list[str]:
    """Mask the ``amount`` fraction of smallest-|w| weights across all prunable layers. Returns the layer names."""
    layers = prunable(model, include_linear)
    if not layers:
        kinds = "Conv2d or Linear" if include_linear else "Conv2d (try --include-linear)"
        raise UserError(f"the model has no {kinds} layers to prune")
    prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    return [n for n, _ in layers]


def make_permanent(model: nn.Module) -> int:
    """``prune.remove`` on every pruned weight: the mask is folded in and the hooks go. Returns how many."""
    count = 0
    for _, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
            count += 1
    return count


def sparsity_report(model: nn.Module, pruned: list[str]) -> dict[str, Any]:
    """Measured zeros: per Conv2d/Linear layer, over the weights that were pruned, and over every parameter."""
    layers = {}
    zeros = total = 0
    for name, m in prunable(model, include_linear=True):
        w = m.weight.detach()
        z, n = int((w == 0).sum()), w.numel()
        layers[name] = {"type": type(m).__name__, "pruned": name in pruned, "zeros": z, "numel": n, "sparsity": z / n}
        if name in pruned:
            zeros, total = zeros + z, total + n
    all_z = sum(int((p.detach() == 0).sum()) for p in model.parameters())
    all_n = sum(p.numel() for p in model.parameters())
    return {"layers": layers, "pruned_weights_sparsity": zeros / max(total, 1), "pruned_weights": total,
            "model_sparsity": all_z / max(all_n, 1), "model_params": all_n}


def _finetune_config(parser: CommandParser, ns: Any, pcfg: PruneConfig, src_cfg: dict[str, Any]) -> Config:
    """The source run's config as the base (its optimiser and schedule), the fine-tuning length and a default
    ``--out`` beside the source, then ``--config`` and the training flags."""
    base = run_overrides(src_cfg)
    tag = f"-prune{round(pcfg.amount * 100)}" + (f"-ft{pcfg.finetune_epochs}" if pcfg.finetune_epochs else "")
    base["train"] = {**base.get("train", {}), "epochs": max(pcfg.finetune_epochs, 1), "max_steps": 0,
                     "out": str(Path(ns.source)) + tag, "resume": ""}
    return config_from_args(ns, parser, overrides=base)


def _parser() -> CommandParser:
    return command_parser("cnnscale prune", "Global L1 unstructured pruning of a trained run, optional fine-tuning "
                          "through the training loop (any training flag applies), then permanent removal of the masks.",
                          "prune", PruneConfig, SHORT, source="the trained run directory (written by cnnscale train)")


def main(argv: list[str]) -> int:
    """``cnnscale prune RUN_DIR [--amount A] [--include-linear] [--finetune-epochs N] [--out DIR] [flags]``."""
    parser = _parser()
    ns = parser.parse_args(list(argv))
    pcfg = parser.section(ns, "prune")
    if ns.source is None:
        raise UserError("RUN_DIR is required: cnnscale prune RUN_DIR --amount 0.5")
    model, src_cfg = load_run_model(ns.source)
    cfg = _finetune_config(parser, ns, pcfg, src_cfg)
    check_out(cfg.train.out, ns.source, "prune")
    device = process_device(cfg)  # the accelerator's device for this rank (cuda:LOCAL_RANK), before run() makes it
    loader = eval_loader(cfg)
    before = eval_accuracy(model.to(device), loader, device)
    names = apply_global_l1(model, pcfg.amount, pcfg.include_linear)
    pruned = eval_accuracy(model, loader, device)
    record: dict[str, Any] = {"source": str(ns.source), "model": cfg.model.name, "amount": pcfg.amount,
                              "include_linear": pcfg.include_linear, "finetune_epochs": pcfg.finetune_epochs,
                              "layers_pruned": len(names), "test_acc_before": before["acc"],
                              "test_acc_pruned": pruned["acc"]}
    is_main = int(os.environ.get("RANK", "0")) == 0
    if pcfg.finetune_epochs:  # the masks are forward pre-hooks, set before run() prepares (wraps) the model
        result = run(cfg, model=model)
        model, is_main = result.model, result.is_main
        record["finetune_summary_test_acc"] = result.summary.get("test_acc")
    make_permanent(model)
    model = model.to(device)
    after = eval_accuracy(model, loader, device) if pcfg.finetune_epochs else pruned
    record.update({"test_acc_after": after["acc"], "test_images": after["n"], **sparsity_report(model, names)})
    if is_main:
        _write(Path(cfg.train.out), model, record, cfg, write_config=not pcfg.finetune_epochs)
        _print(record, cfg.train.out)
    return 0


def _write(out: Path, model: nn.Module, record: dict[str, Any], cfg: Config, write_config: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS)
    if write_config:
        records.write_yaml(out / records.CONFIG, config_to_dict(cfg))
    records.write_json(out / PRUNE_RECORD, record)


def _print(record: dict[str, Any], out: str) -> None:
    print(f"{'layer':<28} {'type':<7} {'pruned':<6} {'numel':>9} {'sparsity':>9}")
    for name, lay in record["layers"].items():
        flag = "yes" if lay["pruned"] else "no"
        print(f"{name:<28} {lay['type']:<7} {flag:<6} {lay['numel']:>9} {lay['sparsity']:>9.3f}")
    print(f"pruned weights: {record['pruned_weights_sparsity']:.3f} sparse; whole model: "
          f"{record['model_sparsity']:.3f} of {record['model_params']} parameters are zero")
    print(f"test acc: before {record['test_acc_before']:.4f}, pruned {record['test_acc_pruned']:.4f}, "
          f"after {record['test_acc_after']:.4f} (fine-tune epochs: {record['finetune_epochs']}) -> {out}")
