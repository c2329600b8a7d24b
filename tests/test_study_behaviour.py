"""A real study that behaves: started from another directory with a relative --out, SIGKILLed in the middle of a
2-process point (no process of it left after 15 s), then run again: the half-done point carries on from its
checkpoint, and the study exits 0. One study shared by the tests below (lenet5, synthetic data, one point)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cnnscale.records.run import complete_checkpoints

pytestmark = pytest.mark.slow  # one real 2-process study, killed and run again (~30 s idle)

REPO = Path(__file__).resolve().parent.parent
STEPS = 60  # the stop comes at the first vote after step 5 (every 10 steps): well before the end
POINT = "lenet5-ws2-no-mb32"
SPEC = {"name": "behave", "models": [{"name": "lenet5", "micro_batches": [32], "max_steps": STEPS}],
        "world_sizes": [2], "launcher": "torchrun", "threads_per_process": 1, "timeout_s": 240,
        "allreduce_bench": False,
        "overrides": {"data.num_workers": 0, "data.val_size": 0, "data.synthetic_size": 256, "data.limit_test": 64,
                      "train.eval_every_epoch": False, "train.final_eval": False, "train.log_every": 5}}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, from anywhere


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie waiting for a parent that does not reap it counts as gone)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["torchrun", "direct"])
def killed(tmp_path_factory, request):
    """Start the study from ``elsewhere/`` with ``--out runs/behave``, SIGKILL it once the point has logged a step,
    and time how long its processes outlive it. Under torchrun (an agent between the study and its ranks) and
    under the direct launcher (the study starts the ranks itself; the quickstart's form)."""
    base = tmp_path_factory.mktemp("behave")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    (base / "behave.yaml").write_text(yaml.safe_dump({**SPEC, "launcher": request.param}))
    cmd = [sys.executable, "-m", "cnnscale", "study", "../behave.yaml", "--out", "runs/behave"]
    run_dir = elsewhere / "runs" / "behave" / POINT
    study = subprocess.Popen(cmd, cwd=elsewhere, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    tree: list[int] = []
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()
                  or study.poll() is not None, 300, "the point's first logged step")
        assert study.poll() is None, study.stdout.read()[-3000:]
        tree = [c.pid for c in psutil.Process(study.pid).children(recursive=True)]
        study.kill()
        t0 = time.monotonic()
        study.wait(timeout=30)
        _wait_for(lambda: not _alive(tree), 60, "the point's processes to end")  # the test asserts 15 s
        gone_s = time.monotonic() - t0
    finally:
        for pid in _alive(tree):  # only when the assertion above failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)
    return {"base": base, "elsewhere": elsewhere, "cmd": cmd, "run_dir": run_dir, "tree": tree, "gone_s": gone_s,
            "first_log": study.stdout.read(), "launcher": request.param}


def test_sigkilled_study_leaves_no_process_behind(killed):
    # torchrun: the agent and its 2 ranks were running; direct: the 2 ranks, children of the study itself
    assert len(killed["tree"]) >= (3 if killed["launcher"] == "torchrun" else 2), killed["tree"]
    log = (killed["run_dir"] / "launch.log").read_text()
    assert killed["gone_s"] < 15, (killed["gone_s"], log[-3000:])
    summary = json.loads((killed["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["world_size"] == 2  # stopped at a step, with a checkpoint
    assert complete_checkpoints(killed["run_dir"]), "no checkpoint to resume from"


def test_relative_out_is_the_users_directory_not_the_checkout(killed):
    assert killed["run_dir"].is_dir() and (killed["elsewhere"] / "runs" / "behave" / "study.yaml").is_file()
    assert not (REPO / "runs" / "behave").exists()
    log = (killed["run_dir"] / "launch.log").read_text()
    assert f"--out {killed['run_dir']}" in log  # an absolute run directory


def test_rerun_resumes_the_half_done_point_and_exits_0(killed):
    run_dir = killed["run_dir"]
    ckpt_step = complete_checkpoints(run_dir)[-1][0]
    assert 0 < ckpt_step < STEPS
    proc = subprocess.run(killed["cmd"], cwd=killed["elsewhere"], env=_env(), capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "resuming from its checkpoint" in proc.stdout
    log = (run_dir / "launch.log").read_text()
    assert f"--resume {run_dir}" in log
    assert re.search(rf"resuming \S+ at step {ckpt_step} of {STEPS}", log), log[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == STEPS and summary["world_size"] == 2
    point = json.loads((run_dir / "point.json").read_text())
    assert point["status"] == "ok" and point["point_id"] == POINT and point["repeat"] == 0
    assert "1 points: 1 ok" in proc.stderr.strip().splitlines()[-1]
