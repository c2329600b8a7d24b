"""Model FLOPs utilisation: FLOPs per training image, achieved TFLOP/s, and the device's peak to compare with.

Peaks are dense (no 2:4 sparsity) tensor-core figures from the vendors' data sheets, per GPU, keyed by a pattern on
the device name and the compute dtype. fp32 training on Ampere and newer runs its matmuls and convolutions in TF32
when ``fast.tf32`` is on, so it is compared with the TF32 peak; a GPU without TF32 (V100, T4) runs them in fp32,
so its fp32 peak is used (labelled ``... fp32 (no TF32)``). An unknown GPU, or a dtype the GPU has no peak for
(bf16 on V100), gives ``None``: MFU is then "n/a", never a guess.

fp16 is compared with the fp16 peak like bf16, but costs more than bf16 on the host: torch's ``GradScaler.step``
reads its found-inf flag with ``.item()`` before it steps the optimiser (an overflow skips the step), so an fp16 run
makes :data:`HOST_SYNCS_PER_STEP` ``["fp16"]`` CPU-GPU synchronisation per optimiser step (bf16 and fp32 make none):
the host cannot queue the next step's kernels while the GPU still runs this one, which shows on small models
(LeNet-5), hardly on ResNet-18 at batch 512. The GPU check runs fp16 beside bf16 to show it.

On CPU there is no honest table, so the peak is measured with a short benchmark at the thread count in use: the
best of many 512-square matmuls and the best of many 3x3 convolutions (256 channels, 16x16, batch 8), over 2 s in
all, and the faster of the two is the peak (labelled ``measured:cpu matmul+conv <dtype>``). Both, because the two go
through different libraries whose speed differs by CPU: on this repository's AMD EPYC box torch.mm (MKL's sgemm)
reached 0.10 TFLOP/s on one thread and the oneDNN convolution 0.21, so a matmul-only peak made VGG-16's
convolutions read 113% MFU. Short kernels, best of many: on a shared machine some of them escape contention, where
1024-square matmuls measured 6x lower. It is measured once per host, thread count and
torch version and cached (:mod:`.peakcache`: a study warms the cache before it starts the ranks), so that the ranks
of a run, competing for the cores, do not each measure a different peak.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from cnnscale.profile.peakcache import cached_peak, peak_key

__all__ = ["PEAK_TFLOPS", "HOST_SYNCS_PER_STEP", "host_syncs_per_step", "lookup_peak", "compute_dtype",
           "cpu_peak", "CPU_PEAK_SECONDS", "resolve_peak", "peak_info", "mfu", "MfuInputs",
           "mfu_setup"]

CPU_PEAK_SECONDS = 2.0
"""How long the cached CPU peak measurement runs (best of the matmuls in that time)."""
_CPU_DTYPES = ("fp32", "bf16", "fp16")

# (pattern on the device name, label) -> {dtype: dense TFLOP/s}. First match wins, so specific names come first.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"H100", "H100 SXM", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (r"H200", "H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"V100.*PCI", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "V100 SXM", {"fp16": 125.0, "fp32": 15.7}),
    (r"L40S", "L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX A6000", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
]


# CPU-GPU synchronisations per optimiser step that the precision itself adds (fp16: the found-inf check in torch's
# GradScaler.step, through Accelerate's optimizer wrapper; counted in tests/test_gpu_paths.py).
HOST_SYNCS_PER_STEP: dict[str, int] = {"no": 0, "bf16": 0, "fp16": 1}


def host_syncs_per_step(mixed_precision: str) -> int:
    """Host synchronisations per optimiser step that ``mixed_precision`` adds (recorded in env.json)."""
    return HOST_SYNCS_PER_STEP.get(mixed_precision, 0)


def lookup_peak(device_name: str, dtype: str) -> tuple[float | None, str | None]:
    """Peak TFLOP/s and its label ("table:H100 SXM bf16") for a GPU name; (None, None) when unknown. TF32 on a GPU
    without TF32 falls back to its fp32 peak ("table:V100 SXM fp32 (no TF32)"), since that is what the matmuls run."""
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            peak = peaks.get(dtype)
            if peak is None and dtype == "tf32" and "fp32" in peaks:
                return peaks["fp32"], f"table:{label} fp32 (no TF32)"
            return (peak, f"table:{label} {dtype}") if peak is not None else (None, None)
    return None, None


def compute_dtype(mixed_precision: str, device_type: str, tf32: bool) -> str:
    """The dtype the matmuls run in: bf16/fp16 under autocast, TF32 for fp32 on a GPU that allows it, else fp32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if device_type == "cuda" and tf32 else "fp32"


_TDTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _best_seconds(fn: Any, seconds: float) -> float:
    """The fastest of as many calls of ``fn`` as fit in ``seconds`` (after one warm-up call)."""
    fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            return best


def _matmul_tflops(dtype: str, size: int, seconds: float) -> float:
    a = torch.full((size, size), 0.5, dtype=_TDTYPES[dtype])  # no RNG: profiling must not change the training stream
    b = torch.full((size, size), 0.25, dtype=_TDTYPES[dtype])
    return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b), seconds) / 1e12


def _conv_tflops(dtype: str, seconds: float, batch: int = 8, channels: int = 256, side: int = 16) -> float:
    """TFLOP/s of a 3x3 same-padded convolution (oneDNN on CPU), the kernel CNN training spends its time in."""
    x = torch.full((batch, channels, side, side), 0.5, dtype=_TDTYPES[dtype])
    w = torch.full((channels, channels, 3, 3), 0.01, dtype=_TDTYPES[dtype])
    with torch.no_grad():
        best = _best_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), seconds)
    return 2 * batch * channels * channels * 9 * side * side / best / 1e12


def _cpu_peak_tflops(dtype: str, seconds: float) -> float:
    """The faster of the matmul and the convolution benchmarks, ``seconds`` split between them."""
    return max(_matmul_tflops(dtype, 512, seconds / 2), _conv_tflops(dtype, seconds / 2))


def cpu_peak(dtype: str = "fp32", refresh: bool = False) -> tuple[float, str, float]:
    """(TFLOP/s, cache status, age s) of this host's CPU peak at the current thread count: the host cache's value
    (:mod:`.peakcache`), measured (:data:`CPU_PEAK_SECONDS`) and cached on a miss or when ``refresh``."""
    dtype = dtype if dtype in _CPU_DTYPES else "fp32"
    key = peak_key(torch.get_num_threads(), dtype)
    return cached_peak(key, lambda: _cpu_peak_tflops(dtype, CPU_PEAK_SECONDS), refresh)


def peak_info(device: torch.device, mixed_precision: str, tf32: bool = True, override: float = 0.0,
              refresh: bool = False) -> dict[str, Any]:
    """``peak_tflops`` per device and ``peak_source`` for MFU (a config override, the GPU table, or the CPU's cached
    measurement), with ``peak_cache`` and ``peak_age_s`` for a CPU peak (None otherwise)."""
    dtype = compute_dtype(mixed_precision, device.type, tf32)
    out: dict[str, Any] = {"peak_tflops": None, "peak_source": None, "peak_cache": None, "peak_age_s": None}
    if override > 0:
        out.update(peak_tflops=override, peak_source=f"config:{dtype}")
    elif device.type == "cuda":
        out["peak_tflops"], out["peak_source"] = lookup_peak(torch.cuda.get_device_name(device), dtype)
    elif device.type == "cpu":
        tflops, status, age = cpu_peak(dtype, refresh)
        out.update(peak_tflops=tflops, peak_source=f"measured:cpu matmul+conv {dtype}", peak_cache=status,
                   peak_age_s=age)
    return out


def resolve_peak(device: torch.device, mixed_precision: str, tf32: bool = True,
                 override: float = 0.0) -> tuple[float | None, str | None]:
    """(peak TFLOP/s per device, source label) of :func:`peak_info`."""
    info = peak_info(device, mixed_precision, tf32, override)
    return info["peak_tflops"], info["peak_source"]


def mfu(flops_per_image: float | None, img_per_s_per_device: float | None,
        peak_tflops: float | None) -> dict[str, Any]:
    """``gflops_per_img``, ``achieved_tflops`` (per device) and ``mfu``; None wherever an input is missing."""
    gflops = flops_per_image / 1e9 if flops_per_image is not None else None
    achieved = (flops_per_image * img_per_s_per_device / 1e12
                if flops_per_image is not None and img_per_s_per_device is not None else None)
    ratio = achieved / peak_tflops if achieved is not None and peak_tflops else None
    return {"gflops_per_img": gflops, "achieved_tflops": achieved, "mfu": ratio}


@dataclass(frozen=True)
class MfuInputs:
    """What MFU needs to know of a run: its training FLOPs per image and the dtype its matmuls run in."""

    flops_per_img: float | None = None
    """Forward+backward FLOPs of one training image (None: not counted, MFU is n/a)."""
    mixed_precision: str = "no"
    """train.mixed_precision: no, fp16 or bf16."""
    tf32: bool = True
    """fast.tf32: fp32 matmuls on Ampere+ run in TF32 and are compared with the TF32 peak."""
    flops_error: str | None = None
    """Why the FLOPs could not be counted (an exotic model the counter cannot trace), recorded in env.json."""


def mfu_setup(device: torch.device, inputs: MfuInputs | None, peak_override: float = 0.0) -> dict[str, Any]:
    """FLOPs per training image and the peak to compare with (on CPU the host cache's value; a miss measures for
    about 1 s, once per host); without ``inputs`` every figure is None."""
    out: dict[str, Any] = {"train_flops_per_img": None, "peak_tflops": None, "peak_source": None}
    if inputs is None:
        return out
    out["train_flops_per_img"] = inputs.flops_per_img
    if inputs.flops_error:
        out["flops_error"] = inputs.flops_error
    out.update(peak_info(device, inputs.mixed_precision, inputs.tf32, peak_override))
    return out
