"""The GPU fast path, exercised on CPU where it runs there: channels_last, torch.compile, bf16 autocast, the
device-resident loader; cudnn.benchmark and TF32 are GPU switches, checked as flags. Every switch is recorded in
env.json. Also the GPU check script's CPU dry run (launch/gpu_check.sh --dry-run), so CI keeps it working.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PY, REPO, cpu_env, read_json, run

from cnnscale.config import load_config
from cnnscale.train.build import apply_fast_path
from cnnscale.train.step import prepare_inputs

# Trains through the public run() in a fresh process, looks at what it returns (and at the loaders and autocast of
# the same builders), and prints what it saw as the last line.
INTROSPECT = """
import json, sys, torch
from cnnscale.config import load_config
from cnnscale.data import loaders
from cnnscale.train.build import build_accelerator
from cnnscale.train.loop import run
from cnnscale.train.step import prepare_inputs
cfg = load_config(sys.argv[1:])
result = run(cfg)
acc = build_accelerator(cfg)  # the run's builder again, in the same process: same device, same mixed precision
inner = result.model  # unwrapped from DDP, torch.compile's wrapper kept (as accelerator.unwrap_model does)
conv = next(p for p in inner.parameters() if p.dim() == 4)
x = prepare_inputs(torch.randn(2, 3, 32, 32, device=acc.device), cfg.fast.channels_last)
first = next(m for m in inner.modules() if isinstance(m, torch.nn.Conv2d))
with acc.autocast():
    y = first(x)  # the prepared model converts its outputs back to fp32; its layers run in bf16 under autocast
seen = {"weight_channels_last": conv.is_contiguous(memory_format=torch.channels_last),
        "input_channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
        "compiled": type(result.model).__name__ == "OptimizedModule", "conv_out_dtype": str(y.dtype),
        "loader": type(loaders.build(cfg, acc)[0]).__name__}
print(json.dumps({**seen, "status": result.summary["status"]}))
"""

TINY = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "64", "--data.val_size", "0",
        "--micro-batch", "4", "--max-steps", "3", "--train.log_every", "1", "--train.eval_every_epoch", "false",
        "--data.num_workers", "0", "--train.progress", "none", "--data.limit_test", "8"]


def _introspect(tmp_path: Path, flags: list[str], timeout: float) -> tuple[dict, dict]:
    out = tmp_path / "run"
    proc = run([PY, "-c", INTROSPECT, *TINY, *flags, "--out", str(out)], timeout=timeout, env=cpu_env(threads=2))
    return json.loads(proc.stdout.strip().splitlines()[-1]), read_json(out / "env.json")


def test_channels_last_bf16_device_loader(tmp_path: Path) -> None:
    seen, env = _introspect(tmp_path, ["--fast.channels_last", "true", "--mixed-precision", "bf16",
                                       "--loader", "device"], timeout=300)
    assert seen == {"weight_channels_last": True, "input_channels_last": True, "compiled": False,
                    "conv_out_dtype": "torch.bfloat16", "loader": "DeviceTrainLoader", "status": "ok"}
    assert env["fast_path"]["channels_last"] is True and env["fast_path"]["compile"] is False
    assert env["fast_path_applied"] == {"channels_last": True, "compile": False, "cudnn_benchmark": None,
                                        "tf32": None}  # GPU-only switches: not applied on CPU, and said so
    assert env["mixed_precision"] == "bf16" and env["loader"] == "device"


def test_torch_compile_on_cpu(tmp_path: Path) -> None:
    """torch.compile after prepare (inductor builds C++ with gcc here), with channels_last and bf16 as the GPU
    check's bench runs it, so the compiled graphs are shared through inductor's cache."""
    seen, env = _introspect(tmp_path, ["--fast.compile", "true", "--fast.channels_last", "true",
                                       "--mixed-precision", "bf16"], timeout=600)
    assert seen["compiled"] and seen["weight_channels_last"] and seen["status"] == "ok"
    assert seen["conv_out_dtype"] == "torch.bfloat16"
    assert env["fast_path"]["compile"] is True and env["fast_path"]["compile_mode"] == "default"
    assert env["fast_path_applied"]["compile"] is True


def test_fast_path_defaults_recorded_off(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    run([PY, str(REPO / "launch" / "train.py"), *TINY, "--out", str(out)], timeout=300)
    env = read_json(out / "env.json")
    assert env["fast_path"] == {"channels_last": False, "compile": False, "compile_mode": "default",
                                "cudnn_benchmark": True, "tf32": True}
    assert env["mixed_precision"] == "no" and env["zero_stage"] is None
    assert env["loader"] == "device" and env["loader_reason"].startswith("auto: device, the decoded set (76 images")


def test_gpu_switches_are_applied_on_a_cuda_device() -> None:
    """cudnn.benchmark and TF32 are plain flags: set them as train.py does for a CUDA device, then restore."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for bench, tf32 in ((True, False), (False, True)):
            cfg = load_config(["--fast.cudnn_benchmark", str(bench).lower(), "--fast.tf32", str(tf32).lower()])
            env = apply_fast_path(cfg.fast, torch.device("cuda"))
            assert torch.backends.cudnn.benchmark is bench
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert env["fast_path_applied"]["cudnn_benchmark"] is bench and env["fast_path_applied"]["tf32"] is tf32
        cpu = apply_fast_path(load_config([]), torch.device("cpu"))
        assert cpu["fast_path_applied"]["cudnn_benchmark"] is None
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def test_prepare_inputs() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert prepare_inputs(x, False) is x
    cl = prepare_inputs(x, True, torch.bfloat16)
    assert cl.dtype == torch.bfloat16 and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl.float(), x.bfloat16().float())


def _tiny_archive(path: Path) -> Path:
    """The real archive's layout (cifar10-jpeg/{train,test}/<class>/NNNN.jpg), 6 + 2 images per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = path / "src" / "cifar10-jpeg"
    for split, n in (("train", 6), ("test", 2)):
        for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:04d}.jpg")
    archive = path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar10-jpeg")
    return archive


def _gpu_check(archive: Path, out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--dry-run", str(archive), str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=cpu_env(threads=2, PYTHON=PY, **env))


def _results(out: Path, dest: Path) -> Path:
    """OUT holds at most 8 files (the GPU machine's limit); the results are one archive without checkpoints."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.name for p in files} >= {"summary.txt", "gpu_check.json", "steps.tsv",
                                                           "results.tar.gz"}, files
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        assert not [n for n in names if "checkpoints" in n or n.endswith(".pt")], names
        tar.extractall(dest, filter="data")
    return dest / "results"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    archive = _tiny_archive(tmp_path)
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _gpu_check(archive, out, timeout=900)
    assert time.monotonic() - t0 < 850 + 30  # the dry run's deadline, plus packing and the summary
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "goal (resnet18, H100, bf16, fast path): >= 35% MFU, ~100,000 img/s at 3.34 GFLOPs per training image" \
        in proc.stdout
    res = _results(out, tmp_path / "unpacked")
    steps = [ln.split("\t") for ln in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in steps] == ["env", "nvml", "data", "train_baseline", "train_fast", "bench_bf16",
                                     "bench_bf16_channels_last", "bench_bf16_channels_last_compile", "report"]
    assert all(s[1] == "0" for s in steps), steps
    doc = read_json(out / "gpu_check.json")
    assert doc["dry_run"] is True and doc["failures"] == []
    assert [s["step"] for s in doc["steps"]] == [s[0] for s in steps]
    assert doc["nvml"]["status"].startswith("n/a") and doc["nvml"]["gpu_util_pct_mean"] is None
    fast = doc["runs"]["lenet5-fast"]
    assert fast["status"] == "ok" and fast["loader"] == "device" and fast["mixed_precision"] == "bf16"
    assert fast["fast_path"]["channels_last"] is True and fast["img_per_s_steady"] > 0 and fast["mfu_steady"] > 0
    bench = read_json(res / "bench" / "bf16_channels_last_compile.json")
    assert bench["options"]["compile"] and bench["options"]["channels_last"] and bench["models"][0]["img_per_s"] > 0
    assert {r["model"] for r in read_json(res / "bench" / "bf16.json")["models"]} == {"lenet5", "resnet18"}
    assert (res / "report.csv").is_file() and (res / "report.txt").read_text().strip()
    assert (res / "runs" / "lenet5-fast" / "summary.json").is_file()
    assert "goal (resnet18" in (out / "summary.txt").read_text()  # the table, also as a file
    # the data was decoded once, by the data step; the runs found the cache
    assert "decoded" in (res / "logs" / "data.log").read_text()


@pytest.mark.slow
def test_gpu_check_deadline_skips_what_no_longer_fits(tmp_path: Path) -> None:
    """A deadline shorter than the first step: that step is cut by its timeout (or just fits), every later one is
    skipped, and OUT still holds the summary, the steps and the archive within the file limit."""
    archive = _tiny_archive(tmp_path)
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _gpu_check(archive, out, timeout=120, GPU_CHECK_DEADLINE="8")
    wall = time.monotonic() - t0
    assert proc.returncode == 1 and wall < 8 + 10 + 30, (wall, proc.stdout[-3000:])  # deadline + kill + packing
    steps = [ln.split("\t") for ln in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert steps[0][0] == "env" and steps[0][1] in ("0", "124"), steps
    assert [s[0] for s in steps[1:]] == ["nvml", "data", "bench_bf16", "bench_bf16_channels_last",
                                         "bench_bf16_channels_last_compile", "report"]
    assert all(s[1] == "skipped" for s in steps[1:]), steps
    doc = read_json(out / "gpu_check.json")
    assert "nvml (skipped at the deadline)" in doc["failures"] and "lenet5-fast run missing" in doc["failures"]
    res = _results(out, tmp_path / "unpacked")
    assert (res / "logs" / "env.log").is_file()
    assert "skipped (deadline" in proc.stdout
