"""Profiler: arithmetic against a fake clock, NVML absence, FLOPs and MFU, and that profiling never changes training
(1 process in-process, with a torch.profiler trace; 2 real processes with the gradient-sync probe on every step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnscale.config import load_config
from cnnscale.profile import nvml
from cnnscale.profile.mfu import compute_dtype, lookup_peak, mfu, resolve_peak
from cnnscale.profile.nvml import NvmlSampler
from cnnscale.profile.profiler import NullProfiler, Profiler, build_profiler, percentile
from cnnscale.train.build import train_flops_per_image
from cnnscale.train.loop import run

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable
GPU_KEYS = ("gpu_util_pct_mean", "gpu_util_pct_peak", "gpu_mem_used_bytes_peak", "gpu_power_w_mean",
            "max_memory_allocated_bytes", "max_memory_reserved_bytes")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class SlowData:
    """Yields ``n`` batches, each taking ``wait`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, n: int, wait: float) -> None:
        self.clock, self.n, self.wait = clock, n, wait

    def __iter__(self):
        for _ in range(self.n):
            self.clock.t += self.wait
            yield torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.long)


def test_throughput_and_step_split_against_a_fake_clock() -> None:
    clock = FakeClock()
    prof = Profiler(torch.device("cpu"), world_size=1, clock=clock)
    prof.start()
    fwd = [0.3, 0.3, 0.3, 1.3]
    window = None
    for i, _batch in enumerate(prof.iter_data(SlowData(clock, 4, 0.1))):
        with prof.phase("fwd_bwd"):
            clock.t += fwd[i]
        with prof.phase("optim"):
            clock.t += 0.1
        prof.step(64)
        if i == 1:
            window = prof.log_metrics()
    prof.stop()
    s = prof.summary()
    # steps take 0.5, 0.5, 0.5, 1.5 s: 256 images over 3.0 s; 0.4 s of it waiting for data
    assert s["images"] == 256 and s["train_time_s"] == pytest.approx(3.0)
    assert s["img_per_s"] == pytest.approx(256 / 3.0)
    assert s["compute_img_per_s"] == pytest.approx(256 / 2.6)
    assert window["window_img_per_s"] == pytest.approx(128 / 1.0)
    assert s["data_wait_s"] == pytest.approx(0.4) and s["fwd_bwd_s"] == pytest.approx(2.2)
    assert s["optim_s"] == pytest.approx(0.4)
    assert s["step_ms_p50"] == pytest.approx(500) and s["step_ms_p90"] == pytest.approx(1200)
    assert s["sync_s"] == 0.0 and s["sync_share"] == 0.0  # world size 1: no sync, measured as zero, not n/a
    for k in GPU_KEYS:
        assert s[k] is None, k  # no GPU: n/a, never zero
    assert s["peak_rss_bytes"] > 0


def test_warmup_steps_are_left_out_of_run_figures() -> None:
    """With warmup_steps=2 the slow first steps (allocation, autotuning) do not count; build_profiler only leaves
    warm-up out when at least as many steps follow it."""
    clock = FakeClock()
    prof = Profiler(torch.device("cpu"), world_size=1, clock=clock)
    prof.warmup_steps = 2
    prof.start()
    fwd = [5.0, 2.0, 0.3, 0.3, 0.3, 0.3]
    for i, _batch in enumerate(prof.iter_data(SlowData(clock, 6, 0.1))):
        with prof.phase("fwd_bwd"):
            clock.t += fwd[i]
        with prof.phase("optim"):
            clock.t += 0.1
        prof.step(64)
    prof.stop()
    s = prof.summary()
    assert s["images"] == 4 * 64 and s["train_time_s"] == pytest.approx(4 * 0.5)
    assert s["img_per_s"] == pytest.approx(256 / 2.0)
    assert s["fwd_bwd_s"] == pytest.approx(1.2) and s["data_wait_s"] == pytest.approx(0.4)
    assert s["step_ms_p90"] == pytest.approx(500)
    pcfg = load_config([]).profile
    assert pcfg.enabled and pcfg.warmup_steps == 2
    assert build_profiler(pcfg, torch.device("cpu"), total_steps=3).warmup_steps == 0
    assert build_profiler(pcfg, torch.device("cpu"), total_steps=4).warmup_steps == 2


def test_null_profiler_counts_images_over_wall_time() -> None:
    clock = FakeClock()
    prof = NullProfiler(clock)
    prof.start()
    for _ in prof.iter_data(range(3)):
        with prof.phase("fwd_bwd"):
            clock.t += 0.25
        prof.step(10)
    prof.stop()
    assert prof.summary() == {"images": 30, "train_time_s": pytest.approx(0.75), "img_per_s": pytest.approx(40)}
    assert prof.log_metrics() == {}
    off = load_config(["--profile.enabled", "false"]).profile
    assert isinstance(build_profiler(off, torch.device("cpu")), NullProfiler)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)


def test_nvml_absent_gives_none_and_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def missing() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    handles, status = nvml.nvml_handles([0])
    assert handles == [] and status.startswith("n/a") and "LibraryNotFound" in status
    sampler = NvmlSampler.for_devices([0], hz=20)
    sampler.start()
    sampler.stop()
    assert not sampler.available and sampler.window() == {}
    assert set(sampler.summary().values()) == {None}
    assert nvml.nvml_handles([])[1] == "n/a: no CUDA device"


def test_sampler_aggregates_mean_and_peak_and_keeps_unsupported_as_none() -> None:
    values = iter([(10.0, 1000, None), (30.0, 3000, None), (20.0, 2000, None)])
    sampler = NvmlSampler(["dev0"], hz=20, sample_fn=lambda h: next(values))
    for _ in range(3):
        sampler.sample_once()
    s = sampler.summary()
    assert s["gpu_util_pct_mean"] == pytest.approx(20.0) and s["gpu_util_pct_peak"] == 30.0
    assert s["gpu_mem_used_bytes_peak"] == 3000 and s["gpu_power_w_mean"] is None
    assert sampler.window() == {"gpu_util_pct": pytest.approx(20.0), "gpu_mem_used_bytes": 2000}


def test_sampler_thread_samples_at_its_rate() -> None:
    import time

    sampler = NvmlSampler(["dev0"], hz=20, sample_fn=lambda h: (50.0, 1, 100.0))
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    assert 3 <= sampler.stats[0].util_n <= 20
    assert sampler.summary()["gpu_power_w_mean"] == pytest.approx(100.0)


def test_training_flops_per_image() -> None:
    # Forward: 651,720 MACs (lenet5) and 0.556 GMACs (resnet18), x2 FLOPs. Backward computes the weight gradient of
    # every layer (= its forward cost) and the input gradient of every layer but the first (the images need none),
    # so fwd+bwd = 3 x forward - the first conv's forward.
    lenet_conv1 = 2 * 6 * 28 * 28 * 3 * 5 * 5
    assert train_flops_per_image("lenet5") == 3 * 2 * 651_720 - lenet_conv1
    resnet_stem = 2 * 64 * 32 * 32 * 3 * 3 * 3
    resnet = train_flops_per_image("resnet18")
    assert resnet == 3 * 2 * 555_422_720 - resnet_stem
    assert round(resnet / 6e9, 3) == 0.555  # "0.556 GMACs" forward, rounded up by the seed


def test_peak_table_and_mfu() -> None:
    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16") == (989.0, "table:H100 SXM bf16")
    assert lookup_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    assert lookup_peak("NVIDIA H200", "bf16") == (989.0, "table:H200 bf16")
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "tf32")[0] == 156.0
    assert lookup_peak("NVIDIA A10", "bf16")[0] == 125.0
    assert lookup_peak("NVIDIA L4", "bf16")[0] == 121.0 and lookup_peak("NVIDIA L40S", "bf16")[0] == 362.0
    assert lookup_peak("Tesla V100-SXM2-16GB", "bf16") == (None, None)  # no bf16 tensor cores: n/a
    assert lookup_peak("Some Future GPU", "bf16") == (None, None)
    assert compute_dtype("no", "cuda", True) == "tf32" and compute_dtype("no", "cpu", True) == "fp32"
    peak, source = resolve_peak(torch.device("cpu"), "no")
    assert peak > 0 and source == "measured:cpu matmul+conv fp32"
    assert resolve_peak(torch.device("cpu"), "bf16", override=2.5) == (2.5, "config:bf16")
    assert mfu(3e9, 100.0, 1.5) == {"gflops_per_img": 3.0, "achieved_tflops": pytest.approx(0.3),
                                    "mfu": pytest.approx(0.2)}
    assert mfu(3e9, 100.0, None)["mfu"] is None and mfu(None, 100.0, 1.0)["achieved_tflops"] is None


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ck / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


COMMON = ["--model", "lenet5", "--data", "synthetic", "--loader", "device", "--max-steps", "6", "--micro-batch", "16",
          "--data.synthetic_size", "256", "--data.val_size", "0", "--train.log_every", "2", "--train.progress", "none",
          "--optim.lr", "0.05"]


def test_profiler_on_and_off_train_bitwise_identically(tmp_path: Path) -> None:
    on = run(load_config([*COMMON, "--out", str(tmp_path / "on"), "--profile.enabled", "true",
                          "--profile.trace_steps", "2"])).summary
    off = run(load_config([*COMMON, "--out", str(tmp_path / "off"), "--profile.enabled", "false"])).summary
    _assert_same_weights(tmp_path / "on", tmp_path / "off")
    assert on["final_loss"] == off["final_loss"]
    assert on["gflops_per_img"] == pytest.approx(3_204_720 / 1e9) and on["mfu"] > 0
    assert "step_ms_p50" in on and "step_ms_p50" not in off
    env = json.loads((tmp_path / "on" / "env.json").read_text())
    assert env["profiling"] is True and env["peak_source"] == "measured:cpu matmul+conv fp32"
    assert env["nvml"].startswith("n/a")
    traces = list((tmp_path / "on" / "trace").glob("*.json"))
    assert len(traces) == 1 and '"traceEvents"' in traces[0].read_text()


def _launch(out: Path, port: int, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), str(ROOT / "launch" / "train.py"), *COMMON, "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "env.json").read_text())["world_size"] == 2


@pytest.mark.timeout(560)
def test_sync_probe_measures_sync_without_changing_two_rank_training(tmp_path: Path) -> None:
    _launch(tmp_path / "probe", 30121, ["--profile.sync_probe_every", "1"])
    _launch(tmp_path / "off", 30122, ["--profile.enabled", "false"])
    _assert_same_weights(tmp_path / "probe", tmp_path / "off")
    s = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert s["world_size"] == 2
    assert s["sync_s"] is not None and s["sync_s"] >= 0 and 0 <= s["sync_share"] < 1
    # communication timed in DDP's hook (registered by build_accelerator's handler); the probe is the cross-check
    assert s["comm_timed_hook"] == "allreduce" and s["comm_buckets_per_step"] >= 1
    assert s["comm_exposed_s"] > 0 and s["sync_s"] == s["comm_exposed_s"] and s["sync_probe_s"] is not None
    assert s["peak_rss_bytes"] > 0 and s["gpu_util_pct_mean"] is None
    env = json.loads((tmp_path / "probe" / "env.json").read_text())
    assert env["sync_measured"] is True and env["sync_probe_every"] == 1
    assert env["comm_timing"] == "ddp comm hook (allreduce)"
