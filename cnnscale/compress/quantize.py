"""Post-training int8 quantisation on CPU: the seed's dynamic recipe, and static quantisation of the convolutions by
the old ``torch.ao`` path and by its successor, torchao's PT2E flow, side by side in one run.

``cnnscale quantize RUN_DIR | --model NAME [--backend x86] [--batch 64] [--repeats 20] [--calib-batches 8] [--out DIR]``

The variants are measured side by side: size on disk (``torch.save`` of the state dict, the same format for all),
CPU latency per batch (median of ``repeats`` rounds after warm-up, the variants taking turns in each round so
that load from other processes hits all alike), test accuracy (only for a trained
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
- ``pt2e`` (torchao, extra ``[torchao]``): ``torch.export`` with a dynamic batch dimension, ``prepare_pt2e`` with
  the ``X86InductorQuantizer`` default (int8 weights per channel, uint8 activations per tensor, BatchNorm folded),
  the same calibration batches, ``convert_pt2e``. The result is a graph of quantize/dequantize ops around float
  convolutions (the reference representation): int8 weights on disk, but float arithmetic when run eagerly.
- ``pt2e_inductor``: that graph through ``torch.compile`` (inductor, freezing on), which fuses the q/dq patterns into
  oneDNN int8 convolution and linear kernels: the deployment form of PT2E on x86. Its compile time is recorded
  (``pt2e_compile_s``); ``--quant.pt2e_compile false`` leaves it out.

In PyTorch 2.14, ``torch.ao.quantization`` (eager and FX) still works but warns that it is deprecated in favour of
``torchao``, and its PT2E flow is gone from torch (``torch.ao.quantization.quantize_pt2e`` no longer exists). The
record says whether the deprecation warning was raised and which torchao ran the new path (null: not installed, the
PT2E variants are then left out and the output says how to install them).
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

# The PT2E flow (extra [torchao]); without it the old torch.ao variants are measured alone. Cost: importing torchao
# takes ~8 s on the 2-core box (it loads torch._inductor and triton), paid by `cnnscale quantize` only.
try:
    import torchao
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
except ImportError:
    torchao = None

from cnnscale.compress.common import (
    check_out,
    command_parser,
    eval_accuracy,
    eval_loader,
    load_run_model,
    run_overrides,
)
from cnnscale.config import CommandParser, Config, config_from_args
from cnnscale.errors import UserError
from cnnscale.models import create_model
from cnnscale.records.io import write_json

__all__ = ["QuantConfig", "quantize_dynamic_seed", "quantize_static_fx", "quantize_static_pt2e", "lower_pt2e",
           "TORCHAO", "module_counts", "size_on_disk", "latency_ms", "main", "QUANT_RECORD"]

QUANT_RECORD = "quantize.json"
TORCHAO: str | None = torchao.__version__ if torchao is not None else None
"""The installed torchao's version (None: not installed, no PT2E variants)."""


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
    pt2e: bool = True
    """Also quantise by torchao's PT2E flow (when torchao is installed)."""
    pt2e_compile: bool = True
    """Also measure the PT2E model lowered by torch.compile to int8 kernels (compiles once: seconds to minutes)."""

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
         "--threads": "threads", "--warmup": "warmup", "--pt2e": "pt2e", "--pt2e-compile": "pt2e_compile"}


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
    _calibrate(prepared, first, it, batches)
    return convert_fx(prepared)


def _calibrate(model: nn.Module, first: torch.Tensor, rest: Any, batches: int) -> None:
    with torch.inference_mode():
        model(first)
        for _, (images, _labels) in zip(range(batches - 1), rest):
            model(images)


def quantize_static_pt2e(model: nn.Module, calib: Any, batches: int) -> nn.Module:
    """Static int8 by torchao's PT2E flow, calibrated on ``batches`` batches from ``calib`` like
    :func:`quantize_static_fx`: ``torch.export`` (batch dimension dynamic), ``prepare_pt2e`` with the
    ``X86InductorQuantizer`` default, calibration, ``convert_pt2e``. The result holds int8 weights and runs its
    quantize/dequantize graph in float when called eagerly; :func:`lower_pt2e` makes the int8 kernels run."""
    if torchao is None:
        raise UserError("the PT2E flow needs torchao: pip install 'cnnscale[torchao]'")
    it = iter(calib)
    first = next(it)[0]
    exported = torch.export.export(copy.deepcopy(model).eval(), (first,),
                                   dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    _calibrate(prepared, first, it, batches)
    converted = _drop_unread(convert_pt2e(prepared))
    allow_exported_model_train_eval(converted)  # .eval() (as eval_accuracy calls it) raises on an exported model
    return converted


def _drop_unread(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the parameters and buffers no node reads: convert_pt2e folds each float weight into an int8 constant
    but keeps the float original registered, which would more than double the size on disk."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)
    return gm


def lower_pt2e(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    """``(compiled model, compile seconds)``: a converted PT2E model through ``torch.compile`` with inductor's freezing
    on, which folds the int8 weights and fuses each dequantize-conv-quantize pattern into one oneDNN int8 kernel.
    Compiles on a first forward of ``x`` here (timed); another input shape compiles again."""
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        compiled(x)
    return compiled, time.perf_counter() - t0


_GRAPH_OPS = {"conv": ("conv2d", "convolution"), "linear": ("linear", "addmm")}


def _graph_counts(gm: torch.fx.GraphModule, counts: Counter[str]) -> None:
    """Conv/linear ops of an exported graph (PT2E): int8 when the weight comes through a dequantize op."""
    for node in gm.graph.nodes:
        op = str(node.target).split(".")[-2] if node.op == "call_function" and "aten." in str(node.target) else ""
        kind = next((k for k, names in _GRAPH_OPS.items() if op in names), None)
        if kind is None or len(node.args) < 2:
            continue
        weight = node.args[1]
        int8 = isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target)
        counts[f"{kind}_{'int8' if int8 else 'float'}"] += 1


def module_counts(model: nn.Module) -> dict[str, int]:
    """Conv and Linear layers by precision: ``conv_float``, ``conv_int8``, ``linear_float``, ``linear_int8``; modules
    (eager, FX) and the ops of an exported graph (PT2E)."""
    counts: Counter[str] = Counter({"conv_float": 0, "conv_int8": 0, "linear_float": 0, "linear_int8": 0})
    for m in model.modules():
        if isinstance(m, torch.fx.GraphModule):
            _graph_counts(m, counts)
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
    return command_parser("cnnscale quantize", "Post-training int8 quantisation on CPU (the seed's dynamic recipe, "
                          "static FX on torch.ao, static PT2E on torchao): size, latency, accuracy and output "
                          "difference, side by side. Accuracy only for "
                          "a trained RUN_DIR; data flags (--data.limit_test N, ...) apply.", "quant", QuantConfig,
                          SHORT, source="a trained run directory (or give --model NAME for an untrained model)")


def _variants(model: nn.Module, calib: Any, qcfg: QuantConfig,
              x: torch.Tensor) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """float, dynamic and static (torch.ao) variants, then pt2e and pt2e_inductor (torchao) when asked and
    installed; and facts for the record: whether torch.ao warned that it is deprecated, the compile time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variants = {"float": model, "dynamic": quantize_dynamic_seed(model),
                    "static": quantize_static_fx(model, calib, qcfg.calib_batches, qcfg.backend)}
    deprecated = any(issubclass(w.category, DeprecationWarning) and "torchao" in str(w.message) for w in caught)
    facts: dict[str, Any] = {"torch_ao_deprecation_warning": deprecated, "torchao": TORCHAO, "pt2e_compile_s": None}
    if qcfg.pt2e and TORCHAO is not None:
        variants["pt2e"] = quantize_static_pt2e(model, calib, qcfg.calib_batches)
        if qcfg.pt2e_compile:
            variants["pt2e_inductor"], facts["pt2e_compile_s"] = lower_pt2e(variants["pt2e"], x)
    return variants, facts


def main(argv: list[str]) -> int:
    """``cnnscale quantize RUN_DIR | --model NAME [--backend x86] [--batch 64] [--repeats 20] [--out DIR]``."""
    parser = _parser()
    ns = parser.parse_args(list(argv))
    qcfg = parser.section(ns, "quant")
    model, cfg, trained, default_out = _source(parser, ns)
    out = Path(cfg.train.out or default_out)
    if ns.source is not None:
        check_out(out, ns.source, "quantize")
    if qcfg.threads:
        torch.set_num_threads(qcfg.threads)
    calib = eval_loader(cfg, batch_size=qcfg.batch, split="calib")
    x = next(iter(calib))[0]
    variants, facts = _variants(model, calib, qcfg, x)
    test = eval_loader(cfg) if trained else None
    rows = _measure(variants, qcfg, x, out, test)
    record = {"source": ns.source, "model": cfg.model.name, "trained": trained, "backend": qcfg.backend,
              "batch": x.shape[0], "threads": torch.get_num_threads(), "repeats": qcfg.repeats,
              "calib_batches": qcfg.calib_batches, "torch": torch.__version__, **facts, "variants": rows,
              "test_images": len(test.dataset) if test is not None else 0}
    write_json(out / QUANT_RECORD, record)
    _print(record, out)
    return 0


def _print(record: dict[str, Any], out: Path) -> None:
    ao = f", torchao {record['torchao']}" if record["torchao"] else ""
    print(f"{record['model']} on CPU, batch {record['batch']}, {record['threads']} threads, backend "
          f"{record['backend']} (torch {record['torch']}{ao})")
    print(f"{'variant':<13} {'size KB':>9} {'conv f/i8':>9} {'lin f/i8':>9} {'median ms':>10} {'max|diff|':>10} "
          f"{'test acc':>9}")
    for name, r in record["variants"].items():
        acc = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "n/a"
        print(f"{name:<13} {r['size_bytes'] / 1024:>9.1f} {r['conv_float']:>4}/{r['conv_int8']:<4} "
              f"{r['linear_float']:>4}/{r['linear_int8']:<4} {r['median_ms']:>10.2f} "
              f"{r['max_abs_diff_vs_float']:>10.4f} {acc:>9}")
    if record["torch_ao_deprecation_warning"]:
        print("note: torch.ao.quantization warns it is deprecated in this PyTorch (migration path: torchao)")
    if record["torchao"] is None:
        print("note: torchao is not installed, so the PT2E variants are left out (pip install 'cnnscale[torchao]')")
    if record["pt2e_compile_s"] is not None:
        print(f"pt2e_inductor: compiled in {record['pt2e_compile_s']:.1f} s (not in its latency)")
    print(f"-> {out / QUANT_RECORD}")
