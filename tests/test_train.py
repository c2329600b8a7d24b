"""Training on real processes (CPU, gloo): DDP parity, accumulation, resume, records, ImageFolder, bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import PY, final_weights, max_abs_diff, read_json, run, train_cmd
from PIL import Image

# lenet5 has no BatchNorm, so DDP and a single process see exactly the same maths.
BASE = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "2048", "--data.val_size", "0",
        "--data.num_workers", "0", "--optim.weight_decay", "0", "--lr", "0.05", "--sched.name", "none",
        "--train.log_every", "5", "--train.eval_every_epoch", "false", "--train.progress", "plain"]


def _train(tmp: Path, name: str, extra: list[str], nproc: int = 1, port: int | None = None, **kw) -> Path:
    out = tmp / name
    run(train_cmd([*BASE, "--out", str(out), *extra], nproc=nproc, port=port, **kw), timeout=240)
    return out


@pytest.fixture(scope="module")
def single64(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("ref"), "single64", ["--max-steps", "20", "--micro-batch", "64"])


def test_ddp_two_processes_match_single_process(tmp_path, single64):
    ddp = _train(tmp_path, "ddp", ["--max-steps", "20", "--micro-batch", "32"], nproc=2, port=30101)
    env = read_json(ddp / "env.json")
    assert env["world_size"] == 2, "launcher silently ran with world size 1"
    assert env["distributed_type"] == "MULTI_CPU" and env["backend"] == "gloo"
    summary = read_json(ddp / "summary.json")
    assert summary["global_batch"] == 64 and summary["steps"] == 20 and summary["status"] == "ok"
    assert max_abs_diff(final_weights(ddp), final_weights(single64)) < 1e-5


def test_torchrun_launch_also_gets_world_size_two(tmp_path):
    out = _train(tmp_path, "tr", ["--max-steps", "4", "--micro-batch", "16"], nproc=2, port=30102,
                 launcher="torchrun")
    assert read_json(out / "env.json")["world_size"] == 2
    assert read_json(out / "summary.json")["global_batch"] == 32


def test_gradient_accumulation_matches_large_batch(tmp_path, single64):
    acc = _train(tmp_path, "acc", ["--max-steps", "20", "--micro-batch", "16", "--grad-accum", "4"])
    summary = read_json(acc / "summary.json")
    assert summary["global_batch"] == 64 and summary["steps"] == 20
    assert max_abs_diff(final_weights(acc), final_weights(single64)) < 1e-5


def test_resume_continues_to_same_weights(tmp_path):
    straight = _train(tmp_path, "straight", ["--max-steps", "20", "--micro-batch", "32"])
    part = _train(tmp_path, "part", ["--max-steps", "10", "--micro-batch", "32"])
    assert read_json(part / "summary.json")["steps"] == 10
    run(train_cmd([*BASE, "--max-steps", "20", "--micro-batch", "32", "--resume", str(part)]), timeout=240)
    assert read_json(part / "summary.json")["steps"] == 20
    assert max_abs_diff(final_weights(part), final_weights(straight)) < 1e-6
    steps = [r["step"] for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [5, 10, 15, 20], "the resumed run must continue from step 10, not restart"


def test_only_rank0_writes_records_and_report_renders(tmp_path):
    out = _train(tmp_path, "recs", ["--max-steps", "10", "--micro-batch", "16"], nproc=2, port=30103)
    files = sorted(p.name for p in out.iterdir())
    # .lock: the one-writer lock file (fcntl), left in place by design
    assert files == [".lock", "checkpoints", "config.yaml", "env.json", "metrics.jsonl", "summary.json"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10], "each step logged once, by rank 0 only"
    env = read_json(out / "env.json")
    for key in ("versions", "world_size", "num_nodes", "hostnames", "slurm", "git_sha", "device_name"):
        assert key in env
    assert len(env["hostnames"]) == 2 and env["num_nodes"] == 1
    # term (g)'s layer table: LeNet-5's 5 layers (2 convolutions, 3 linear), parameters summing to the model's
    assert [p for p, _ in env["layers"]] == [456, 2416, 48120, 10164, 850] and all(c > 0 for _, c in env["layers"])
    cfg = (out / "config.yaml").read_text()
    assert "lenet5" in cfg and "micro_batch: 16" in cfg
    rep = run([PY, "-m", "cnnscale", "report", str(out)], timeout=120)
    assert "lenet5" in rep.stdout


def _write_imagefolder(root: Path, per_class: int, classes: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(per_class // 4, 2))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                # class-dependent colour so the model can learn something
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                img[..., c % 3] += 150
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)


def test_imagefolder_run_loads_trains_and_evaluates(tmp_path):
    data = tmp_path / "folder"
    _write_imagefolder(data, per_class=40)
    out = tmp_path / "ifrun"
    run(train_cmd(["--model", "lenet5", "--data", "imagefolder", "--data-dir", str(data), "--epochs", "3",
                   "--micro-batch", "16", "--data.val_size", "24", "--lr", "0.02", "--out", str(out),
                   "--data.num_workers", "2", "--train.log_every", "2"]), timeout=240)
    s = read_json(out / "summary.json")
    assert s["status"] == "ok" and s["epochs_done"] == 3
    assert 0.0 <= s["test_acc"] <= 1.0 and s["val_acc"] is not None
    assert s["test_acc"] > 0.5, "three colour-coded classes should be learnable"
    cfg = read_json(out / "env.json")
    assert cfg["world_size"] == 1


@pytest.mark.parametrize("args, needle", [
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--optim.name", "lion"], "optim.name: unknown value 'lion'"),
    (["--lr", "-1"], "optim.lr must be > 0"),
    (["--micro-batch", "0"], "train.micro_batch must be >= 1"),
    (["--train.bogus", "1"], "unknown key 'train.bogus'"),
    (["--lr", "fast"], "optim.lr: expected a number"),
    (["--mixed-precision", "fp8"], "choose from: no, fp16, bf16"),
])
def test_bad_config_gives_one_line_error(tmp_path, args, needle):
    out = tmp_path / "never"
    proc = run(train_cmd(["--data", "synthetic", "--max-steps", "1", "--out", str(out), *args]), timeout=120,
               check=False)
    assert proc.returncode == 2
    err = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and needle in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_compute_only_calibration_run_does_not_all_reduce(tmp_path, single64):
    """dist.compute_only skips the gradient all-reduce: the ranks train apart, so rank 0's weights leave the
    synchronised trajectory (which equals the 1-process run with the same global batch, see above)."""
    out = _train(tmp_path, "conly", ["--max-steps", "20", "--micro-batch", "32", "--dist.compute_only", "true"],
                 nproc=2, port=30104)
    assert read_json(out / "env.json")["world_size"] == 2
    assert read_json(out / "summary.json")["status"] == "ok"
    assert max_abs_diff(final_weights(out), final_weights(single64)) > 1e-4
