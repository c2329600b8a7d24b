"""Divergence caught (issue 13.5): a real diverging run (LeNet-5, lr 1e6) on 2 gloo processes stops both ranks at
the same log step with one stderr line, status "diverged", exit code 3; its last checkpoint holds finite weights
and loads; every JSON file in the run directory parses with a strict parser. ``train.stop_on_nonfinite false``
trains on (in-process). Port 31000 belongs to this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import load
from safetensors.torch import load_file

from cnnscale import cli
from cnnscale.records import io as records
from cnnscale.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "lenet5", "--data", "synthetic", "--micro-batch", "16", "--data.num_workers", "0",
        "--data.val_size", "0", "--data.synthetic_size", "256", "--train.progress", "none", "--profile.enabled",
        "false", "--train.eval_every_epoch", "false", "--train.final_eval", "false", "--lr", "1e6",
        "--sched.name", "none", "--train.log_every", "1", "--train.ckpt_every", "1"]
LINE = re.compile(r"loss is (nan|inf|-inf) at step (\d+) \(lr 1\.0e\+06\): stopping, status diverged "
                  r"\(last good checkpoint: .*step_(\d{8})\)")


def _strict(text: str) -> object:
    def bad(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    run = tmp_path_factory.mktemp("diverge") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:31000", "-m", "cnnscale.train", *ARGS,
           "--max-steps", "20", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300), run


def test_diverging_run_stops_every_rank_with_one_line_and_exit_3(diverged) -> None:
    """torchrun reports each worker's exit code and exits 1 itself (it collapses its workers' codes): the first rank
    to end exits 3; summary.json says "diverged" (what a study reads)."""
    proc, run = diverged
    assert proc.returncode == 1 and re.search(r"exitcode\s*: 3 ", proc.stderr), proc.stderr[-3000:]
    hits = [ln for ln in proc.stderr.splitlines() if "status diverged" in ln]
    assert len(hits) == 1 and LINE.fullmatch(hits[0]), proc.stderr[-3000:]
    step, last = int(LINE.fullmatch(hits[0]).group(2)), int(LINE.fullmatch(hits[0]).group(3))
    s = _strict((run / records.SUMMARY).read_text())
    assert s["status"] == "diverged" and s["world_size"] == 2 and s["steps"] == step < 20
    assert s["final_loss"] is None and s["error"] == hits[0].split(" (last good")[0]
    metrics = [_strict(ln) for ln in (run / records.METRICS).read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, step + 1)) and metrics[-1]["loss"] is None
    assert last == step - 1  # the checkpoint of the diverged step was never written


def test_a_single_process_diverging_run_exits_3(tmp_path: Path, capsys) -> None:
    run = tmp_path / "one"
    code = cli.main(["train", *ARGS, "--max-steps", "20", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 3 and len(err.splitlines()) == 1 and LINE.fullmatch(err.strip()), err
    assert _strict((run / records.SUMMARY).read_text())["status"] == "diverged"


def test_the_last_good_checkpoint_loads_and_is_finite(diverged) -> None:
    _, run = diverged
    ck = latest_checkpoint(run)
    assert ck is not None
    sd = load_file(ck / "model.safetensors")
    assert sd and all(torch.isfinite(t).all() for t in sd.values())
    for f in (*ck.glob("*.bin"), *ck.glob("*.pkl")):
        load(f, map_location="cpu", weights_only=True)  # accelerate's loader: numpy RNG state allowed


def test_every_json_file_of_the_run_is_strict(diverged) -> None:
    _, run = diverged
    files = [p for p in run.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert {p.name for p in files} >= {"summary.json", "env.json", "metrics.jsonl", "trainer_state.json"}
    for p in files:
        for line in p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]:
            _strict(line)


def test_stop_on_nonfinite_false_trains_on(tmp_path: Path, capsys) -> None:
    run = tmp_path / "on"
    code = cli.main(["train", *ARGS, "--max-steps", "6", "--train.stop_on_nonfinite", "false", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    s = _strict((run / records.SUMMARY).read_text())
    assert s["status"] == "ok" and s["steps"] == 6
    losses = [m["loss"] for m in records.read_metrics(run / records.METRICS)]
    assert len(losses) == 6 and None in losses  # the NaN logged as null, the run went on
