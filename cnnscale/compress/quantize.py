"""Post-training int8 quantisation on CPU: the seed's dynamic recipe, and static quantisation of the convolutions.

``cnnscale quantize RUN_DIR | --model NAME [--backend x86] [--batch 64] [--repeats 20] [--calib-batches 8] [--out DIR]``

Three variants are measured side by side: size on disk (``torch.save`` of the state dict, the same format for all
three), CPU latency per batch (median of ``repeats`` rounds after warm-up, the variants taking turns in each round so
that load from other processes hits all three alike), test accuracy (only for a trained
run directory; ``--model NAME`` builds an untrained model for size and latency only), and the largest output
difference from the float model on one batch.

- ``float``: the model as trained.
- ``dynamic``: the seed's ``quantize_dynamic(model, {nn.Linear, nn.Conv2d}, dtype=qint8)``. Dynamic quantisation
  has kernels for Linear (and RNN) layers only: **Conv2d layers are left in float, silently**. The report counts
  float and int8 modules so this shows (LeNet-5: 2 float convs, 3 int8 linears; ResNet-18: 20 float convs).
- ``static``: FX graph mode (``prepare_fx`` with the backend's default qconfig mapping, calibration on
  ``calib_batches`` batches of held-out training images, ``convert_fx``): convolutions, BatchNorm (folded) and
  activations run in int8. Eager-mode static quantisation would need QuantStub/DeQuantStub and FloatFunctional for
  residual adds in every model; FX traces the unchanged models (all of the zoo traces).

In PyTorch 2.14, ``torch.ao.quantization`` (eager and FX) still works but warns that it is deprecated in favour of
``torchao`` (its ``quantize_`` API and the PT2E flow, which moved there). torchao is not a dependency here; the
report records whether the deprecation warning was raised.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from cnnscale.compress.common import command_parser, eval_accuracy, eval_loader, load_run_model, run_overrides
from cnnscale.config import CommandParser, Config, config_from_args
from cnnscale.errors import UserError
from cnnscale.models import create_model
from cnnscale.records.io import write_json

__all__ = ["QuantConfig", "quantize_dynamic_seed", "quantize_static_fx", "module_counts", "size_on_disk",
           "latency_ms", "main", "QUANT_RECORD"]

QUANT_RECORD = "quantize.json"


@dataclass(frozen=True)
class QuantConfig:
    """Quantisation: the int8 engine and how the variants are measured"""

    backend: str = "x86"
    """Quantised engine: x86 or fbgemm (server CPUs), qnnpack (ARM), onednn; as this PyTorch build supports."""
    batch: int = 64
    """Images per batch for the latency measurement and calibration."""
    repeats: int = 20
    """Timed forwards per variant (the median is reported)."""
    warmup: int = 3
    """Untimed forwards first."""
    calib_batches: int = 8
    """Batches of held-out training images that calibrate the static observers."""
    threads: int = 0
    """torch.set_num_threads for the measurement (0: leave as is)."""

    def __post_init__(self) -> None:
        engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
        if self.backend not in engines:
            raise UserError(f"quant.backend: unknown value {self.backend!r} (choose from: {', '.join(engines)})")
        for name in ("batch", "repeats", "calib_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"quant.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("quant.warmup and quant.threads must be >= 0")


SHORT = {"--backend": "backend", "--batch": "batch", "--repeats": "repeats", "--calib-batches": "calib_batches",
         "--threads": "threads", "--warmup": "warmup"}


def quantize_dynamic_seed(model: nn.Module) -> nn.Module:
    """The seed's recipe, unchanged: only the Linear layers end up quantised (see :func:`module_counts`)."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear, nn.Conv2d},
                                                  dtype=torch.qint8)


def quantize_static_fx(model: nn.Module, calib: Any, batches: int, backend: str = "x86") -> nn.Module:
    """Static int8 (weights and activations) by FX graph mode, with ``batches`` calibration batches from ``calib``."""
    torch.backends.quantized.engine = backend
    it = iter(calib)
    first = next(it)[0]
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (first,))
    with torch.inference_mode():
        prepared(first)
        for _, (images, _labels) in zip(range(batches - 1), it):
            prepared(images)
    return convert_fx(prepared)


def module_counts(model: nn.Module) -> dict[str, int]:
    """Conv and Linear layers by precision: ``conv_float``, ``conv_int8``, ``linear_float``, ``linear_int8``."""
    counts: Counter[str] = Counter({"conv_float": 0, "conv_int8": 0, "linear_float": 0, "linear_int8": 0})
    for m in model.modules():
        name = type(m).__name__
        kind = "conv" if "Conv" in name else "linear" if "Linear" in name else None
        if kind is None or not hasattr(m, "weight"):
            continue
        quantised = ".quantized" in type(m).__module__  # torch.ao.nn.quantized, .intrinsic.quantized, .dynamic
        counts[f"{kind}_{'int8' if quantised else 'float'}"] += 1
    return dict(counts)


def size_on_disk(model: nn.Module, path: Path) -> int:
    """Bytes of ``torch.save(model.state_dict())`` at ``path`` (quantised packed weights need torch's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def latency_ms(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Wall time of one forward on ``x`` per model: median, p10 and p90 over ``repeats`` rounds (CPU: perf_counter).

    The models take turns within each round, so a burst of load from other processes hits all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1]}
    return out


def _source(parser: CommandParser, ns: Any) -> tuple[nn.Module, Config, bool, str]:
    """(float model, config, trained?, default out dir) from a run directory or ``--model NAME``."""
    if ns.source is not None:
        model, src_cfg = load_run_model(ns.source)
        cfg = config_from_args(ns, parser, overrides=run_overrides(src_cfg))
        return model, cfg, True, str(Path(ns.source)) + "-int8"
    if "name" not in parser.given(ns, "model"):
        raise UserError("give a trained RUN_DIR, or --model NAME for an untrained model (size and latency only)")
    cfg = config_from_args(ns, parser, overrides={"data": {"name": "synthetic", "num_workers": 0}})
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, width_mult=cfg.model.width_mult)
    return model.eval(), cfg, False, f"runs/quantize-{cfg.model.name}"


def _measure(variants: dict[str, nn.Module], qcfg: QuantConfig, x: torch.Tensor, out: Path,
             test: Any) -> dict[str, dict[str, Any]]:
    with torch.inference_mode():
        ref = variants["float"](x)
    lat = latency_ms(variants, x, qcfg.repeats, qcfg.warmup)
    rows = {}
    for name, m in variants.items():
        with torch.inference_mode():
            diff = (m(x) - ref).abs().max().item()
        row: dict[str, Any] = {"size_bytes": size_on_disk(m, out / f"{name}.pt"), **module_counts(m),
                               "max_abs_diff_vs_float": diff, **lat[name]}
        row["test_acc"] = eval_accuracy(m, test)["acc"] if test is not None else None
        rows[name] = row
    return rows


def _parser() -> CommandParser:
    return command_parser("cnnscale quantize", "Post-training int8 quantisation on CPU (the seed's dynamic recipe and "
                          "static FX): size, latency, accuracy and output difference, side by side. Accuracy only for "
                          "a trained RUN_DIR; data flags (--data.limit_test N, ...) apply.", "quant", QuantConfig,
                          SHORT, source="a trained run directory (or give --model NAME for an untrained model)")


def _variants(model: nn.Module, calib: Any, qcfg: QuantConfig) -> tuple[dict[str, nn.Module], bool]:
    """float, dynamic and static variants; and whether torch.ao warned that it is deprecated (for torchao)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variants = {"float": model, "dynamic": quantize_dynamic_seed(model),
                    "static": quantize_static_fx(model, calib, qcfg.calib_batches, qcfg.backend)}
    deprecated = any(issubclass(w.category, DeprecationWarning) and "torchao" in str(w.message) for w in caught)
    return variants, deprecated


def main(argv: list[str]) -> int:
    """``cnnscale quantize RUN_DIR | --model NAME [--backend x86] [--batch 64] [--repeats 20] [--out DIR]``."""
    parser = _parser()
    ns = parser.parse_args(list(argv))
    qcfg = parser.section(ns, "quant")
    model, cfg, trained, default_out = _source(parser, ns)
    out = Path(cfg.train.out or default_out)
    if qcfg.threads:
        torch.set_num_threads(qcfg.threads)
    calib = eval_loader(cfg, batch_size=qcfg.batch, split="calib")
    x = next(iter(calib))[0]
    variants, deprecated = _variants(model, calib, qcfg)
    test = eval_loader(cfg) if trained else None
    rows = _measure(variants, qcfg, x, out, test)
    record = {"source": ns.source, "model": cfg.model.name, "trained": trained, "backend": qcfg.backend,
              "batch": x.shape[0], "threads": torch.get_num_threads(), "repeats": qcfg.repeats,
              "calib_batches": qcfg.calib_batches, "torch": torch.__version__,
              "torch_ao_deprecation_warning": deprecated, "variants": rows,
              "test_images": len(test.dataset) if test is not None else 0}
    write_json(out / QUANT_RECORD, record)
    _print(record, out)
    return 0


def _print(record: dict[str, Any], out: Path) -> None:
    print(f"{record['model']} on CPU, batch {record['batch']}, {record['threads']} threads, backend "
          f"{record['backend']} (torch {record['torch']})")
    print(f"{'variant':<8} {'size KB':>9} {'conv f/i8':>9} {'lin f/i8':>9} {'median ms':>10} {'max|diff|':>10} "
          f"{'test acc':>9}")
    for name, r in record["variants"].items():
        acc = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "n/a"
        print(f"{name:<8} {r['size_bytes'] / 1024:>9.1f} {r['conv_float']:>4}/{r['conv_int8']:<4} "
              f"{r['linear_float']:>4}/{r['linear_int8']:<4} {r['median_ms']:>10.2f} "
              f"{r['max_abs_diff_vs_float']:>10.4f} {acc:>9}")
    if record["torch_ao_deprecation_warning"]:
        print("note: torch.ao.quantization warns it is deprecated in this PyTorch (migration path: torchao)")
    print(f"-> {out / QUANT_RECORD}")
