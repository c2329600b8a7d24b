"""Memory figures: the process's resident set (current and peak) and the CUDA caching allocator's peaks.

The allocator peaks cover only tensors; NCCL's buffers and the CUDA context are seen by NVML (:mod:`.nvml`) alone.
Without a GPU the allocator figures are ``None`` ("n/a"), never zero. Each call here is a cheap read (a /proc file
or an allocator counter), no synchronisation.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Any

import psutil
import torch

__all__ = ["allocator_peaks", "reset_allocator_peaks", "rss_bytes", "reset_peak_rss", "peak_rss_bytes"]


def allocator_peaks(device: torch.device) -> dict[str, Any]:
    """``max_memory_allocated_bytes`` and ``max_memory_reserved_bytes`` since the last reset; None off GPU."""
    if device.type != "cuda":
        return {"max_memory_allocated_bytes": None, "max_memory_reserved_bytes": None}
    return {"max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def reset_allocator_peaks(device: torch.device) -> None:
    """Restart the allocator's peak counters (a no-op off GPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so a second run in one process (bench) gets its own."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset (VmHWM), else the process's lifetime peak."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) * 1024, rss_bytes())
    return max(int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, rss_bytes())  # Linux: KiB
