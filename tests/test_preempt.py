"""Preemption outside SLURM, on real processes: a signal stops training at a step boundary with a checkpoint, the
summary says "preempted", the exit code says why, and --resume carries on from that step to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import PY, REPO, cpu_env, final_weights, max_abs_diff, read_json, run, train_cmd

from cnnscale.train import preempt

BASE = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "2048", "--data.val_size", "0",
        "--data.num_workers", "0", "--optim.weight_decay", "0", "--lr", "0.05", "--sched.name", "none",
        "--train.log_every", "1", "--train.eval_every_epoch", "false", "--train.progress", "plain"]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 180) -> None:
    """Block until metrics.jsonl records ``step`` (training is in its loop, signal handlers installed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if metrics.exists() and any(json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines()
                                    if x.strip().endswith("}")):
            return
        time.sleep(0.2)
    _kill_group(proc)
    raise AssertionError(f"no step {step} within {timeout} s")


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"run did not stop within {timeout} s after the signal:\n{out[-4000:]}") from None
    return proc.returncode, out


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------------------------- in-process guard
def test_guard_sets_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with preempt.SignalGuard(every=3) as guard:
        assert not guard.requested(3)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # repeats do not change the first signal
        assert not guard.requested(4), "between vote steps the answer is no"
        assert guard.requested(6) and guard.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.parametrize(("summary", "code"), [
    ({"status": "ok"}, 0), ({"status": "preempted", "signal": "SIGINT"}, 130),
    ({"status": "preempted", "signal": "SIGUSR1"}, 75), ({"status": "preempted", "signal": "SIGTERM"}, 75),
    ({"status": "failed"}, 1), ({"status": "diverged"}, preempt.EXIT_DIVERGED)])
def test_exit_codes(summary, code):
    assert preempt.exit_code(summary) == code


# ---------------------------------------------------------------------------------------------- real processes
def test_ctrl_c_checkpoints_then_resume_matches_uninterrupted(tmp_path):
    out = tmp_path / "run"
    proc = _start([PY, str(REPO / "launch" / "train.py"), *BASE, "--max-steps", "100000", "--micro-batch", "32",
                   "--out", str(out)])
    try:
        _wait_for_step(proc, out / "metrics.jsonl", 5)
        proc.send_signal(signal.SIGINT)
        rc, log = _finish(proc)
    finally:
        _kill_group(proc)
    assert rc == preempt.EXIT_INTERRUPTED, log[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "preempted" and summary["signal"] == "SIGINT", summary
    k = summary["steps"]
    assert 5 <= k < 100000 and (out / "checkpoints" / f"step_{k:08d}" / "trainer_state.json").is_file()
    assert _steps(out)[-1] == k, "the last logged step is the checkpointed one"

    run(train_cmd([*BASE, "--max-steps", str(k + 15), "--micro-batch", "32", "--out", str(out), "--resume"]),
        timeout=240)
    summary = read_json(out / "summary.json")
    assert summary["status"] == "ok" and summary["steps"] == k + 15
    assert _steps(out) == list(range(1, k + 16)), "resumed at k+1: no step repeated, none skipped"
    straight = tmp_path / "straight"
    run(train_cmd([*BASE, "--max-steps", str(k + 15), "--micro-batch", "32", "--out", str(straight)]), timeout=240)
    assert max_abs_diff(final_weights(out), final_weights(straight)) < 1e-6


def _worker_with_rank(launcher: subprocess.Popen, rank: str, timeout: float = 60) -> psutil.Process:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == rank:
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigusr1_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Only rank 1 is signalled: the vote makes rank 0 stop at the same step and save with it (no hang)."""
    out = tmp_path / "ddp"
    proc = _start(train_cmd([*BASE, "--max-steps", "100000", "--micro-batch", "16", "--out", str(out)], nproc=2,
                            port=30111))
    try:
        _wait_for_step(proc, out / "metrics.jsonl", 3)
        _worker_with_rank(proc, "1").send_signal(signal.SIGUSR1)
        rc, log = _finish(proc)
    finally:
        _kill_group(proc)
    assert "exitcode  : 75" in log, log[-3000:]  # the launcher reports the workers' preemption exit code
    summary = read_json(out / "summary.json")
    assert summary["status"] == "preempted" and summary["signal"] == "SIGUSR1" and summary["world_size"] == 2
    k = summary["steps"]
    ck = out / "checkpoints" / f"step_{k:08d}"
    assert (ck / "random_states_0.pkl").is_file() and (ck / "random_states_1.pkl").is_file()

    run(train_cmd([*BASE, "--max-steps", str(k + 6), "--micro-batch", "16", "--out", str(out), "--resume"], nproc=2,
                  port=30112), timeout=240)
    summary = read_json(out / "summary.json")
    assert summary["status"] == "ok" and summary["steps"] == k + 6 and summary["world_size"] == 2
    assert _steps(out) == list(range(1, k + 7))
