"""GPU utilisation, memory and power from NVML, sampled by a background thread (10-20 Hz, one handle per device).

NVML's utilisation means "a kernel was running during the sample period", not efficiency: show MFU beside it.
Its memory-used figure includes what the caching allocator cannot see (NCCL buffers, the CUDA context).

Without a GPU or without the NVML library, every figure is ``None`` ("n/a"), never zero, and nothing raises:
``pynvml.nvmlInit()`` raises ``NVMLError_LibraryNotFound`` on a machine without the driver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GpuStats", "NvmlSampler", "nvml_handles"]


@dataclass
class GpuStats:
    """Running aggregates of one device's samples; ``None`` means never measured."""

    util_sum: float = 0.0
    util_n: int = 0
    util_peak: float | None = None
    mem_peak: int | None = None
    mem_last: int | None = None
    power_sum: float = 0.0
    power_n: int = 0
    power_peak: float | None = None
    window: list[float] = field(default_factory=list)

    def add(self, util: float | None, mem: int | None, power_w: float | None) -> None:
        if util is not None:
            self.util_sum, self.util_n = self.util_sum + util, self.util_n + 1
            self.util_peak = util if self.util_peak is None else max(self.util_peak, util)
            self.window.append(util)
        if mem is not None:
            self.mem_last = mem
            self.mem_peak = mem if self.mem_peak is None else max(self.mem_peak, mem)
        if power_w is not None:
            self.power_sum, self.power_n = self.power_sum + power_w, self.power_n + 1
            self.power_peak = power_w if self.power_peak is None else max(self.power_peak, power_w)

    @property
    def util_mean(self) -> float | None:
        return self.util_sum / self.util_n if self.util_n else None

    @property
    def power_mean(self) -> float | None:
        return self.power_sum / self.power_n if self.power_n else None


def _call(fn: Any, *args: Any) -> Any:
    """One NVML query; a query the device does not support gives None."""
    import pynvml  # optional dependency (nvidia-ml-py): imported only where a GPU is being sampled

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def nvml_handles(device_indices: list[int]) -> tuple[list[Any], str]:
    """NVML handles for torch CUDA device indices, and why not when there are none.

    Torch indices are relative to ``CUDA_VISIBLE_DEVICES`` and NVML's are physical, so devices are matched by UUID
    where torch exposes it, else by index.
    """
    if not device_indices:
        return [], "n/a: no CUDA device"
    try:
        import pynvml  # optional dependency: its absence is reported as "n/a", not an import error

        pynvml.nvmlInit()
    except ImportError:
        return [], "n/a: nvidia-ml-py not installed"
    except Exception as exc:  # pynvml.NVMLError_LibraryNotFound and friends: no driver here
        return [], f"n/a: {type(exc).__name__}: {exc}"
    handles = []
    for i in device_indices:
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        h = _call(pynvml.nvmlDeviceGetHandleByUUID, f"GPU-{uuid}") if uuid is not None else None
        handles.append(h if h is not None else _call(pynvml.nvmlDeviceGetHandleByIndex, i))
    if any(h is None for h in handles):
        return [], "n/a: NVML could not open the device"
    return handles, "ok"


class NvmlSampler:
    """Samples each handle at ``hz`` on a daemon thread between :meth:`start` and :meth:`stop`.

    ``sample_fn(handle) -> (util %, memory used bytes, power W)`` is injectable for tests.
    """

    def __init__(self, handles: list[Any], hz: float = 10.0, sample_fn: Any = None, status: str = "ok") -> None:
        self.handles = handles
        self.period = 1.0 / max(hz, 1e-3)
        self.sample_fn = sample_fn or _nvml_sample
        self.status = status if handles else (status if status != "ok" else "n/a: no device")
        self.stats = [GpuStats() for _ in handles]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_devices(cls, device_indices: list[int], hz: float = 10.0) -> NvmlSampler:
        handles, status = nvml_handles(device_indices)
        return cls(handles, hz, status=status)

    @classmethod
    def for_device(cls, device: Any, hz: float = 10.0) -> NvmlSampler:
        """A sampler of a torch device: its GPU, or an empty one ("n/a") for anything else."""
        if device.type != "cuda":
            return cls([], hz, status="n/a: no CUDA device")
        return cls.for_devices([device.index if device.index is not None else torch.cuda.current_device()], hz)

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def sample_once(self) -> None:
        for h, st in zip(self.handles, self.stats):
            util, mem, power = self.sample_fn(h)
            with self._lock:
                st.add(util, mem, power)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample_once()

    def start(self) -> None:
        if not self.available or self._thread is not None:
            return
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="cnnscale-nvml", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        self.sample_once()

    def window(self) -> dict[str, Any]:
        """Mean utilisation since the previous call and the latest memory use (for metrics.jsonl)."""
        if not self.available:
            return {}
        with self._lock:
            utils = [u for st in self.stats for u in st.window]
            for st in self.stats:
                st.window.clear()
            mems = [st.mem_last for st in self.stats if st.mem_last is not None]
        out: dict[str, Any] = {}
        if utils:
            out["gpu_util_pct"] = sum(utils) / len(utils)
        if mems:
            out["gpu_mem_used_bytes"] = max(mems)
        return out

    def summary(self) -> dict[str, Any]:
        """Mean and peak over the devices sampled here; every value is None when nothing was measured."""
        with self._lock:
            means = [st.util_mean for st in self.stats if st.util_mean is not None]
            peaks = [st.util_peak for st in self.stats if st.util_peak is not None]
            mems = [st.mem_peak for st in self.stats if st.mem_peak is not None]
            powers = [st.power_mean for st in self.stats if st.power_mean is not None]
        return {
            "gpu_util_pct_mean": sum(means) / len(means) if means else None,
            "gpu_util_pct_peak": max(peaks) if peaks else None,
            "gpu_mem_used_bytes_peak": max(mems) if mems else None,
            "gpu_power_w_mean": sum(powers) / len(powers) if powers else None,
        }


def _nvml_sample(handle: Any) -> tuple[float | None, int | None, float | None]:
    import pynvml  # optional dependency, see nvml_handles

    util = _call(pynvml.nvmlDeviceGetUtilizationRates, handle)
    mem = _call(pynvml.nvmlDeviceGetMemoryInfo, handle)
    power_mw = _call(pynvml.nvmlDeviceGetPowerUsage, handle)
    return (float(util.gpu) if util is not None else None, int(mem.used) if mem is not None else None,
            power_mw / 1000.0 if power_mw is not None else None)
