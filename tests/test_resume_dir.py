"""Resume means this run, and a run directory protects what it holds (issue 15.1, 15.2), through ``cnnscale train``
itself (``cnnscale.cli.main``, in-process: the same code path as the console script, without paying a torch import
per run). One module-scoped set of real LeNet-5 runs on synthetic data serves every test:

- U: 8 steps, cosine, uninterrupted (the reference);
- P: the same run preempted at step 3 by a SIGUSR1 that arrived during start-up, then stray directories are put
  next to its checkpoints, then ``--resume P`` alone (no other flag) carries it to step 8.

Also: a finished run resumed is a no-op; ``--max-steps`` extends with the documented schedule; a contradicting flag
is one line naming both values; a fresh run into a run directory is refused; ``--overwrite`` moves it aside; a
held lock refuses a second writer; prune and distill never write into their source (quantize shares the check,
cnnscale.compress.common.check_out; its torchao import is too slow for this file).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cnnscale import cli
from cnnscale.records import io as records
from cnnscale.records.run import liveness
from cnnscale.train import preempt

REPO = Path(__file__).resolve().parents[1]
LENET = ["--model", "lenet5", "--data", "synthetic", "--micro-batch", "16", "--data.num_workers", "0",
         "--data.val_size", "0", "--data.synthetic_size", "256", "--train.progress", "none", "--profile.enabled",
         "false", "--train.eval_every_epoch", "false", "--train.final_eval", "false", "--sched.name", "cosine",
         "--train.log_every", "1", "--train.ckpt_every", "2", "--train.keep_ckpts", "1"]
STRAYS = ("step_99999999", "step_best", "step_00000002.bak")


def train(capsys, *args: str) -> tuple[int, str, str]:
    """``cnnscale train ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def weights(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def summary(run: Path) -> dict:
    return json.loads((run / records.SUMMARY).read_text())


def lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records.read_metrics(run / records.METRICS) if "lr" in r}


def cos(step: int, total: int, lr: float = 0.1) -> float:
    return lr * (1 + math.cos(math.pi * step / total)) / 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    u, p = root / "U", root / "P"
    out: dict = {"root": root, "U": u, "P": p}
    assert cli.main(["train", *LENET, "--max-steps", "8", "--out", str(u)]) == 0
    preempt.install_early()
    os.kill(os.getpid(), signal.SIGUSR1)  # a preemption notice during start-up: kept, acted on at the first vote
    try:
        out["preempt_code"] = cli.main(["train", *LENET, "--max-steps", "8", "--dist.preempt_check_every", "3",
                                        "--out", str(p)])
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    out["preempted"] = summary(p)
    out["preempted_liveness"] = liveness(p)
    ck = p / "checkpoints"
    (ck / "step_99999999").mkdir()
    (ck / "step_best").mkdir()
    (ck / "step_best" / "model.safetensors").write_bytes(b"a user's own file")
    shutil.copytree(ck / "step_00000003", ck / "step_00000002.bak")  # marker inside, name not ours: not ours
    with contextlib.redirect_stderr(io.StringIO()) as err:  # the rotation warning: one line on stderr
        out["resume_code"] = cli.main(["train", "--resume", str(p)])
    out["resume_err"] = err.getvalue()
    return out


def test_resume_dir_alone_reaches_the_uninterrupted_weights(runs: dict) -> None:
    u, p = runs["U"], runs["P"]
    assert runs["preempt_code"] == preempt.EXIT_PREEMPTED
    assert runs["preempted"]["status"] == "preempted" and runs["preempted"]["steps"] == 3
    assert runs["preempted_liveness"] == "preempted"
    assert runs["resume_code"] == 0, runs["resume_err"]
    a, b = weights(u, 8), weights(p, 8)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert lrs(p) == lrs(u) == pytest.approx({k: cos(k, 8) for k in range(1, 9)})
    assert [r["step"] for r in records.read_metrics(p / records.METRICS)] == list(range(1, 9))
    s = summary(p)
    assert s["status"] == "ok" and s["steps"] == 8 and s["host"] and s["pid"] == os.getpid()
    assert liveness(p) == "ok" and not (p / ".reserve").exists()


def test_rotation_leaves_strays_alone_and_keeps_the_newest(runs: dict) -> None:
    names = sorted(x.name for x in (runs["P"] / "checkpoints").iterdir())
    assert names == sorted([*STRAYS, "step_00000008"])
    assert (runs["P"] / "checkpoints" / "step_best" / "model.safetensors").read_bytes() == b"a user's own file"
    warned = [ln for ln in runs["resume_err"].splitlines() if "leaves alone" in ln]
    assert len(warned) == 1 and all(s in warned[0] for s in STRAYS), runs["resume_err"]


def test_resuming_a_finished_run_is_a_noop(runs: dict, capsys) -> None:
    u = runs["U"]
    before = {f: (u / f).read_bytes() for f in (records.SUMMARY, records.CONFIG, records.METRICS)}
    code, out, err = train(capsys, "--resume", str(u))
    assert (code, err) == (0, "")
    assert out == (f"run {u} is already finished (status ok, 8 steps): nothing to do; extend it with --max-steps N "
                   "or --epochs N\n")
    code, out, _ = train(capsys, *LENET, "--max-steps", "8", "--out", str(u), "--resume", str(u))  # a requeue
    assert code == 0 and out.startswith(f"run {u} is already finished")
    assert before == {f: (u / f).read_bytes() for f in before}


def test_max_steps_extends_with_the_documented_schedule(runs: dict, capsys) -> None:
    """From the resume step on, the LR a run of the new length has at that step (cnnscale.train.schedule)."""
    x = runs["root"] / "X"
    shutil.copytree(runs["U"], x, ignore=shutil.ignore_patterns(".lock"))
    code, out, err = train(capsys, "--resume", str(x), "--max-steps", "12")
    assert code == 0, err
    assert f"resuming {x} at step 8 of 12 (changed: train.max_steps 8 -> 12)" in out
    got = lrs(x)
    assert got == pytest.approx({**{k: cos(k, 8) for k in range(1, 9)}, **{k: cos(k, 12) for k in range(9, 13)}})
    assert all(got[k] > got[k + 1] for k in range(9, 12)) and got[12] == pytest.approx(0.0)
    assert summary(x)["steps"] == 12
    assert "max_steps: 12" in (x / records.CONFIG).read_text()


@pytest.mark.parametrize(("flag", "needle"), [
    (["--model", "resnet18"], "model.name 'resnet18' contradicts the run's model.name 'lenet5'"),
    (["--lr", "0.5"], "optim.lr 0.5 contradicts the run's optim.lr 0.1"),
    (["--micro-batch", "32"], "train.micro_batch 32 contradicts the run's train.micro_batch 16"),
])
def test_a_flag_contradicting_the_checkpoint_is_one_line(runs: dict, capsys, flag: list[str], needle: str) -> None:
    code, out, err = train(capsys, "--resume", str(runs["U"]), "--data", "synthetic", *flag)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and needle in err and "corrupt" not in err, err


def test_a_fresh_run_into_a_run_directory_is_refused(runs: dict, capsys) -> None:
    u = runs["U"]
    before = (u / records.SUMMARY).read_bytes()
    code, _, err = train(capsys, *LENET, "--max-steps", "2", "--out", str(u))
    assert code == 2
    assert err == (f"cnnscale: error: {u} already holds a run: continue it with --resume {u}, or start over with "
                   f"--overwrite (moves the old run aside to {u}.old-<time>)\n")
    assert (u / records.SUMMARY).read_bytes() == before


def test_overwrite_moves_the_old_run_aside(runs: dict, capsys) -> None:
    w = runs["root"] / "W"
    shutil.copytree(runs["U"], w, ignore=shutil.ignore_patterns(".lock"))
    code, out, err = train(capsys, *LENET, "--max-steps", "2", "--out", str(w), "--overwrite")
    assert code == 0, err
    aside = [d for d in w.parent.iterdir() if d.name.startswith("W.old-")]
    assert len(aside) == 1 and f"--overwrite: moved the old run in {w} aside to {aside[0]}" in out
    assert summary(aside[0])["steps"] == 8 and summary(w)["steps"] == 2
    assert [r["step"] for r in records.read_metrics(w / records.METRICS)] == [1, 2]


def test_a_held_run_directory_refuses_a_second_writer(runs: dict, capsys) -> None:
    hold = ("import sys, time\nfrom cnnscale.records.io import hold_lock\n"
            "with hold_lock(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    p = runs["P"]
    h = subprocess.Popen([sys.executable, "-c", hold, str(p / records.LOCK)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert h.stdout is not None and h.stdout.readline().strip() == "held"
        code, _, err = train(capsys, "--resume", str(p), "--max-steps", "10")
    finally:
        h.kill()
        h.wait(timeout=30)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"is in use by pid {h.pid} on " in err and "wait for it to end, or stop it first" in err
    assert summary(p)["steps"] == 8  # untouched


def test_compress_never_writes_into_its_source(runs: dict, capsys) -> None:
    u = runs["U"]
    before = sorted(x.name for x in u.iterdir())
    for argv in (["prune", str(u), "--out", str(u)], ["distill", "--teacher", str(u), *LENET, "--out", str(u / "s")]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "never writes into its source" in err, err
    assert sorted(x.name for x in u.iterdir()) == before
