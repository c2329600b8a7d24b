"""The analytic scaling model: data-parallel efficiency from compute time, gradient bytes and an alpha-beta
all-reduce over named or fitted interconnects (model); per-rank memory by ZeRO stage (memory). Pure arithmetic."""

__all__: list[str] = []
