"""Profiling during training: the step clock and phases, the no_sync communication probe, memory (RSS and the
allocator), NVML sampling, FLOP counting and MFU, tied together by the profiler (a no-op object when off)."""

__all__: list[str] = []
