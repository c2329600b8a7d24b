"""Faults: a dead or hung rank ends the job, SIGKILL + resume is exact, files are atomic, loading is safe, disk full.

Every run is a real process (plain python, or torchrun / accelerate launch with 2 gloo processes on CPU). Ports
30550-30599 belong to this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import py_run

from cnnscale.records import io as records
from cnnscale.records.run import liveness, load_run
from cnnscale.train.checkpoint import TRAINER_STATE, latest_checkpoint
from cnnscale.train.rundir import RESERVE_BYTES

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = str(REPO / "launch" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
LENET = ["--model", "lenet5", "--data", "synthetic", "--micro-batch", "16", "--data.num_workers", "0",
         "--data.val_size", "0", "--data.synthetic_size", "512", "--train.progress", "none",
         "--profile.enabled", "false", "--train.eval_every_epoch", "false"]

pytestmark = pytest.mark.slow


def train(args: list[str], timeout: float = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [PY]), TRAIN, *args]
    return py_run(cmd, cwd=REPO, env=ENV, timeout=timeout)  # one process: forked from the zygote


def torchrun(port: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}"]


def accelerate_launch(port: int) -> list[str]:
    return [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(port)]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run by up to {diff}"


def start(cmd: list[str]) -> subprocess.Popen:
    """A new session, so the whole process tree can be found and killed as a group."""
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and every descendant at once, as a node crash would. Not just the process group: the
    elastic agent (torchrun, accelerate launch) starts each worker in a session of its own."""
    try:
        tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for pr in tree:
        try:
            pr.kill()
        except psutil.NoSuchProcess:
            pass
    p.communicate(timeout=60)


def wait_for(pred, p: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    t0 = time.monotonic()
    while not pred():
        if p.poll() is not None:
            raise AssertionError(f"run exited (rc {p.returncode}) before {what}:\n{p.stdout.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            kill_tree(p)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def crash_after_checkpoint(cmd: list[str], run_dir: Path) -> int:
    """Start ``cmd``, SIGKILL its whole process group as soon as a complete checkpoint exists; its step."""
    p = start(cmd)
    try:
        wait_for(lambda: latest_checkpoint(run_dir) is not None, p, what="the first checkpoint")
        alive = liveness(run_dir)
    finally:
        kill_tree(p)
    assert p.returncode == -signal.SIGKILL
    summary = json.loads((run_dir / records.SUMMARY).read_text())
    assert summary["status"] == "running"  # it really died mid-run
    assert (alive, liveness(run_dir)) == ("running", "dead")  # issue 15.3: the lock tells a dead run from a live one
    return json.loads((latest_checkpoint(run_dir) / TRAINER_STATE).read_text())["step"]


# ------------------------------------------------------------------------------------------------ exact resume
def test_sigkill_then_resume_is_exact(tmp_path: Path) -> None:
    args = [*LENET, "--max-steps", "400", "--train.ckpt_every", "10", "--train.keep_ckpts", "100"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    r = train([*args, "--out", str(ref)])
    assert r.returncode == 0, r.stderr[-3000:]
    step = crash_after_checkpoint([PY, TRAIN, *args, "--out", str(crashed)], crashed)
    assert 0 < step < 400
    r = train([*args, "--resume", str(crashed)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((crashed / records.SUMMARY).read_text())["steps"] == 400
    assert_same_weights(weights(ref, 400), weights(crashed, 400))
    # metrics.jsonl: each step once (lines logged after the checkpoint, before the kill, were dropped on resume),
    # and the same mean losses as the uninterrupted run for every log interval (20 steps) begun after the resume.
    def losses(run: Path) -> list[tuple[int, float]]:
        return [(m["step"], m["loss"]) for m in records.read_metrics(run / records.METRICS) if "loss" in m]
    assert [s for s, _ in losses(crashed)] == [s for s, _ in losses(ref)] == list(range(20, 401, 20))
    assert [x for x in losses(crashed) if x[0] - 20 >= step] == [x for x in losses(ref) if x[0] - 20 >= step]


def make_jpeg_folder(root: Path, n_train: int = 48, n_test: int = 8) -> Path:
    """A small real ImageFolder tree: JPEG files of random pixels, two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpeg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """Augmented ImageFolder run args and an uninterrupted reference run (num_workers 0)."""
    root = make_jpeg_folder(tmp_path_factory.mktemp("jpeg") / "data")
    args = ["--model", "lenet5", "--data", "imagefolder", "--data-dir", str(root), "--data.augment", "true",
            "--loader", "torch",  # the DataLoader's workers are what this resume test is about (auto would pick device)
            "--micro-batch", "8", "--max-steps", "120", "--data.val_size", "0", "--train.progress", "none",
            "--profile.enabled", "false", "--train.eval_every_epoch", "false", "--train.ckpt_every", "5",
            "--train.keep_ckpts", "100"]
    ref = tmp_path_factory.mktemp("jpeg_ref") / "run"
    r = train([*args, "--data.num_workers", "0", "--out", str(ref)])
    assert r.returncode == 0, r.stderr[-3000:]
    return args, ref


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_augmentation_and_workers_is_exact(jpeg_run: tuple[list[str], Path], workers: int,
                                                       tmp_path: Path) -> None:
    """Crop/flip are seeded per (seed, epoch, sample), so the crashed-and-resumed run with 0 or 2 loader workers
    ends on the very weights of the uninterrupted 0-worker run."""
    args, ref = jpeg_run
    args = [*args, "--data.num_workers", str(workers)]
    crashed = tmp_path / "crashed"
    step = crash_after_checkpoint([PY, TRAIN, *args, "--out", str(crashed)], crashed)
    assert 0 < step < 120
    r = train([*args, "--resume", str(crashed)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(weights(ref, 120), weights(crashed, 120))


def test_two_process_sigkill_then_resume_is_exact(tmp_path: Path) -> None:
    # 240 steps: the first checkpoint (step 10) comes ~0.3 s into training, the kill follows within a poll
    args = [*LENET, "--max-steps", "240", "--train.ckpt_every", "10", "--train.keep_ckpts", "100"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    r = train([*args, "--out", str(ref)], launcher=torchrun(30561))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads((ref / records.ENV).read_text())["world_size"] == 2
    step = crash_after_checkpoint([*torchrun(30562), TRAIN, *args, "--out", str(crashed)], crashed)
    assert 0 < step < 240
    assert (latest_checkpoint(crashed) / "random_states_1.pkl").is_file()
    r = train([*args, "--resume", str(crashed)], launcher=torchrun(30563))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads((crashed / records.SUMMARY).read_text())["world_size"] == 2
    assert_same_weights(weights(ref, 240), weights(crashed, 240))


# ------------------------------------------------------------------------------------------------ dead / hung rank
def rank_processes(p: subprocess.Popen) -> dict[int, psutil.Process]:
    out = {}
    for child in psutil.Process(p.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            out[int(env["RANK"])] = child
    return out


def alive(procs: list[psutil.Process]) -> list[int]:
    live = []
    for pr in procs:
        try:
            if pr.is_running() and pr.status() != psutil.STATUS_ZOMBIE:
                live.append(pr.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def kill_rank_and_time(launcher: list[str], out: Path, sig: int, extra: list[str] = ()) -> tuple[float, str, int]:
    """Start a long 2-process run, send ``sig`` to rank 1 once it trains; seconds to the job's exit, output, rc."""
    p = start([*launcher, TRAIN, *LENET, "--max-steps", "100000", "--train.log_every", "5", "--out", str(out),
               *extra])
    try:
        metrics = out / records.METRICS
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, p, what="training to start")
        ranks = rank_processes(p)
        assert sorted(ranks) == [0, 1], f"expected ranks 0 and 1, found {sorted(ranks)}"
        tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        t_kill = time.monotonic()
        os.kill(ranks[1].pid, sig)
        try:
            output, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not exit within 120 s of a rank's death")
        elapsed = time.monotonic() - t_kill
        time.sleep(0.5)
        assert alive(tree) == [], f"processes left behind: {alive(tree)}"
        return elapsed, output, p.returncode
    finally:
        if p.poll() is None:
            for pr in psutil.Process(p.pid).children(recursive=True):
                pr.send_signal(signal.SIGCONT)
            kill_tree(p)


@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_dead_rank_ends_the_job(launch: str, tmp_path: Path) -> None:
    launcher = torchrun(30564) if launch == "torchrun" else accelerate_launch(30565)
    elapsed, output, rc = kill_rank_and_time(launcher, tmp_path / "run", signal.SIGKILL)
    print(f"{launch}: rank 1 SIGKILLed -> job exited rc={rc} after {elapsed:.1f} s")
    assert rc != 0
    assert elapsed < 60
    # The elastic agent's report names the failed rank and how it died.
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", output), output[-3000:]
    # The record ends true: rank 0 saw the collective fail ("failed", with the reason), or was stopped by the
    # launcher's SIGTERM ("preempted"), or was killed before it could write (then its lock is free: "dead"). Never
    # "running" or "ok", which is what it read before runs recorded their owner and lock.
    state = liveness(tmp_path / "run")
    print(f"{launch}: the run's record reads {state!r}")
    assert state in ("failed", "preempted", "dead"), state


def test_killed_launcher_takes_its_workers_with_it(tmp_path: Path) -> None:
    """The agent starts workers in sessions of their own; if the launcher alone is SIGKILLed, each worker notices
    its parent is gone (preempt.watch_parent) and exits instead of training on as an orphan."""
    out = tmp_path / "run"
    p = start([*torchrun(30567), TRAIN, *LENET, "--max-steps", "100000", "--train.log_every", "5", "--out", str(out)])
    try:
        metrics = out / records.METRICS
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, p, what="training to start")
        workers = list(rank_processes(p).values())
        assert len(workers) == 2
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while alive(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(workers) == [], "workers kept training after their launcher died"
    finally:
        for pr in workers if "workers" in locals() else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                pr.kill()


def test_hung_rank_hits_the_collective_timeout(tmp_path: Path) -> None:
    """A rank that stops (SIGSTOP) without dying: the survivor's gloo collective times out after dist.timeout_s,
    then the agent SIGTERMs and, 30 s later, SIGKILLs the stopped rank."""
    elapsed, output, rc = kill_rank_and_time(torchrun(30566), tmp_path / "run", signal.SIGSTOP,
                                             ["--dist.timeout_s", "10"])
    print(f"rank 1 SIGSTOPped -> job exited rc={rc} after {elapsed:.1f} s (timeout 10 s + agent grace 30 s)")
    assert rc != 0
    assert "Timed out waiting 10000ms" in output, output[-3000:]
    assert elapsed < 90


# ------------------------------------------------------------------------------------------------ atomic files
def test_kill_during_checkpoint_writes_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    """Checkpoint every step, SIGKILL at a random moment (most of the time is spent saving): every visible
    step_* directory is complete and loads, and resume continues from the newest."""
    run = tmp_path / "run"
    args = [*LENET, "--train.ckpt_every", "1", "--train.keep_ckpts", "3"]
    p = start([PY, TRAIN, *args, "--max-steps", "100000", "--out", str(run)])
    try:
        wait_for(lambda: len(list((run / "checkpoints").glob("step_*"))) >= 2, p, what="two checkpoints")
        time.sleep(random.uniform(0.0, 0.4))
    finally:
        kill_tree(p)
    from accelerate.utils import load
    from safetensors.torch import load_file

    for ck in (run / "checkpoints").glob("step_*"):
        assert (ck / TRAINER_STATE).is_file()
        load_file(ck / "model.safetensors")
        for f in (*ck.glob("*.bin"), *ck.glob("*.pkl")):
            load(f, weights_only=True)
    step = json.loads((latest_checkpoint(run) / TRAINER_STATE).read_text())["step"]
    r = train([*args, "--max-steps", str(step + 3), "--resume", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / records.SUMMARY).read_text())["steps"] == step + 3


def test_leftover_tmp_checkpoint_is_ignored(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    (ck / "step_00000010").mkdir(parents=True)
    (ck / "step_00000010" / TRAINER_STATE).write_text('{"step": 10}')
    (ck / ".tmp-step_00000020").mkdir()
    (ck / ".tmp-step_00000020" / "model.safetensors").write_bytes(b"\0" * 10)
    (ck / "step_00000030").mkdir()  # no trainer_state.json: never published by save_checkpoint
    assert latest_checkpoint(tmp_path) == ck / "step_00000010"


_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from cnnscale.records.io import write_json
i = 0
while True:
    write_json(sys.argv[1], {"i": i, "pad": "x" * (200_000 + 7 * (i % 2))})
    i += 1
    if i == 3:
        print("ready", flush=True)
"""


def test_kill_during_record_write_never_leaves_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    for _ in range(5):
        p = subprocess.Popen([PY, "-c", _WRITER, str(target), str(REPO)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.0, 0.2))
        p.kill()
        p.wait(timeout=30)
        rec = json.loads(target.read_text())  # old or new, never half
        assert len(rec["pad"]) in (200_000, 200_007)
    assert [f.name for f in tmp_path.iterdir() if not f.name.startswith(".")] == ["summary.json"]


def test_torn_metrics_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records.write_json(run / records.SUMMARY, {"status": "running", "world_size": 1})
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (run / records.METRICS).write_text("\n".join(lines) + '\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: skipping unreadable metrics line"):
        rec = load_run(run, with_metrics=True)
    assert [m["step"] for m in rec.metrics] == [1, 2, 3]
    with pytest.warns(UserWarning, match="torn write"):
        records.truncate_metrics(run / records.METRICS, 2)  # what a resume from step 2 does
    assert [m["step"] for m in records.read_metrics(run / records.METRICS)] == [1, 2]


# ------------------------------------------------------------------------------------------------ safe loading
def _sources() -> list[Path]:
    return [p for d in ("cnnscale", "launch") for p in sorted((REPO / d).rglob("*.py"))]


def test_yaml_is_only_safe_loaded() -> None:
    bad = [f"{p.relative_to(REPO)}:{i}" for p in _sources() for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"yaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.(Unsafe|Full)?Loader\b", line)]
    assert bad == []


def test_no_shell_true() -> None:
    bad = [f"{p.relative_to(REPO)}:{i}" for p in _sources() for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", line)]
    assert bad == []


def test_every_torch_load_is_weights_only() -> None:
    bad = []
    for p in _sources():
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                bad.append(f"{p.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}")
    assert bad == []


# ------------------------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_tmpfs(tmp_path: Path, skip_or_fail):
    """A 3 MB tmpfs: skips without root on a dev box, fails under CI (see tests/conftest.py)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs (needs root; CI runs as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_disk_full_stops_with_one_line_and_keeps_last_checkpoint(small_tmpfs: Path) -> None:
    """LeNet checkpoints are ~0.5 MB; with 1.8 MB free, the 4th checkpoint cannot be written."""
    (small_tmpfs / "ballast").write_bytes(b"\0" * 1_200_000)
    run = small_tmpfs / "run"
    r = train([*LENET, "--max-steps", "200", "--train.ckpt_every", "5", "--train.keep_ckpts", "100",
               "--out", str(run)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.match(r"train\.py: error: disk full: could not write checkpoint step_\d+ .*No space left on device; "
                    r"last complete checkpoint: .*step_\d+$", lines[0]), lines[0]
    ckdir = run / "checkpoints"
    assert not list(ckdir.glob(".tmp-*")), "the partial checkpoint was not removed"
    last = latest_checkpoint(run)
    assert last is not None and lines[0].endswith(last.name)
    from accelerate.utils import load
    from safetensors.torch import load_file

    load_file(last / "model.safetensors")
    for f in (*last.glob("*.bin"), *last.glob("*.pkl")):
        load(f, weights_only=True)
    summary = json.loads((run / records.SUMMARY).read_text())  # issue 15.3: the status ends true
    assert summary["status"] == "failed" and summary["error"] == lines[0].split("error: ", 1)[1], summary


def test_disk_full_while_writing_records(small_tmpfs: Path) -> None:
    """The reserve (1 MiB, released for the final status) and 12 KB more free: the records of the start do not all
    fit, the run ends "failed" with the reason all the same (issue 15.3)."""
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "ballast").write_bytes(b"\0" * (free - RESERVE_BYTES - 12 * 1024))
    r = train([*LENET, "--max-steps", "50", "--train.log_every", "1", "--out", str(small_tmpfs / "run")])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines == [f"train.py: error: disk full: could not write the run directory ({small_tmpfs / 'run'}): "
                     "No space left on device"], r.stderr[-3000:]
    summary = json.loads((small_tmpfs / "run" / records.SUMMARY).read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("disk full: could not write"), summary
    assert liveness(small_tmpfs / "run") == "failed"
