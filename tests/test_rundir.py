"""A run directory protects what it holds (issue 15.2, 15.3, 15.6), in-process and cheap: the one-writer lock (a
second writer refused with the holder named, a SIGKILLed holder's lock released by the kernel), liveness from the
lock, pid and heartbeat, checkpoint rotation beside stray directories, strict JSON, and claiming a run directory
(refuse, --overwrite, the reserve for the final status, no directory left behind).

The lock holders are small python processes (no torch import). Real training runs: tests/test_resume_dir.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnscale.config import load_config
from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.records.run import complete_checkpoints, has_checkpoint, liveness
from cnnscale.train.checkpoint import latest_checkpoint, rotate
from cnnscale.train.rundir import RESERVE, RESERVE_BYTES, claim_run_dir

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from cnnscale.records.io import hold_lock
with hold_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(lock: Path) -> subprocess.Popen:
    """A process holding ``lock`` (the trainer's own helper), once it says so."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def _strict(text: str) -> object:
    def bad(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------------ one writer
def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    lock = tmp_path / "run" / records.LOCK
    p = _holder(lock)
    try:
        assert records.lock_holder(lock) == {"pid": p.pid, "host": socket.gethostname(),
                                             "since": pytest.approx(time.time(), abs=120)}
        t0 = time.monotonic()
        with pytest.raises(UserError) as err:
            with records.hold_lock(lock, "run directory X", wait_s=0.2):
                pass
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"run directory X is in use by pid {p.pid} on {socket.gethostname()}")
    finally:
        _kill(p)  # SIGKILL: no cleanup ran, the kernel drops the flock
    assert records.lock_holder(lock) is None
    with records.hold_lock(lock, "run directory X", wait_s=0) as me:
        assert me["pid"] == os.getpid()
        assert records.lock_holder(lock)["pid"] == os.getpid()
    assert records.lock_holder(lock) is None


# ------------------------------------------------------------------------------------------------ liveness
def _summary(run: Path, **fields: object) -> None:
    run.mkdir(parents=True, exist_ok=True)
    records.write_json(run / records.SUMMARY, {"status": "running", "schema_version": 1, **fields})


def test_liveness_from_lock_pid_and_heartbeat(tmp_path: Path) -> None:
    here = socket.gethostname()
    run = tmp_path / "locked"
    _summary(run, pid=1, host=here, heartbeat_at=time.time())
    p = _holder(run / records.LOCK)
    try:
        assert liveness(run) == "running"
    finally:
        _kill(p)
    assert liveness(run) == "dead"  # the lock is free on its own host: dead, whatever the heartbeat says
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=30)
    _summary(tmp_path / "old-alive", pid=os.getpid(), host=here)  # no lock file: the pid decides
    _summary(tmp_path / "old-dead", pid=int(gone.stdout), host=here)
    _summary(tmp_path / "far-fresh", pid=1, host="elsewhere", heartbeat_at=time.time() - 30)
    _summary(tmp_path / "far-stale", pid=1, host="elsewhere", heartbeat_at=time.time() - 3600)
    _summary(tmp_path / "diverged", status="diverged")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / records.SUMMARY).write_text('{"status": "runn')
    got = {d: liveness(tmp_path / d) for d in ("old-alive", "old-dead", "far-fresh", "far-stale", "diverged", "torn",
                                                 "nothing")}
    assert got == {"old-alive": "running", "old-dead": "dead", "far-fresh": "running", "far-stale": "dead",
                   "diverged": "diverged", "torn": "unknown", "nothing": "unknown"}


# ------------------------------------------------------------------------------------------------ rotation
def _ckpt(run: Path, name: str, step: int | None) -> Path:
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if step is not None:
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batches_in_epoch": step}))
    return d


def test_rotation_touches_only_complete_checkpoints_of_this_run(tmp_path: Path, capsys) -> None:
    """Strays (a far step without marker, step_best, a .bak copy with a marker, a marker naming another step, a
    step without marker) are left alone with one warning; the newest is never deleted; keep counts only real
    checkpoints."""
    run = tmp_path / "run"
    for name, step in (("step_99999999", None), ("step_best", 3), ("step_00000005.bak", 5), ("step_00000003", 1),
                       ("step_00000007", None)):
        _ckpt(run, name, step)
    for s in (2, 4, 6):
        _ckpt(run, f"step_{s:08d}", s)
    assert [s for s, _ in complete_checkpoints(run)] == [2, 4, 6]
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000006"
    deleted = rotate(run, 6, keep=1)
    assert [d.name for d in deleted] == ["step_00000002", "step_00000004"]
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["step_00000003", "step_00000005.bak", "step_00000006", "step_00000007", "step_99999999",
                    "step_best"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "leaves alone" in err[0] and "step_best" in err[0] and "step_99999999" in err[0]
    _ckpt(run, "step_00000008", 8)
    assert rotate(run, 8, keep=2) == []  # 6 and 8 kept
    assert capsys.readouterr().err == ""  # one warning per run directory
    assert has_checkpoint(run) and not has_checkpoint(tmp_path / "none")


# ------------------------------------------------------------------------------------------------ strict JSON
def test_every_json_writer_is_strict(tmp_path: Path) -> None:
    log = records.MetricsLog(tmp_path / "m.jsonl")
    log.log({"step": 1, "loss": math.nan, "lr": math.inf})
    log.close()
    records.write_json(tmp_path / "a.json", {"x": -math.inf, "y": [math.nan, 1.0]})
    assert _strict((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": None, "lr": None}
    assert _strict((tmp_path / "a.json").read_text()) == {"x": None, "y": [None, 1.0]}


# ------------------------------------------------------------------------------------------------ claiming
def _cfg(out: Path, *extra: str):
    return load_config(["--model", "lenet5", "--data", "synthetic", "--out", str(out), *extra])


def test_claim_reserves_room_then_releases_it_and_removes_a_dir_it_created(tmp_path: Path) -> None:
    run = tmp_path / "new" / "run"
    with claim_run_dir(run, _cfg(run), is_main=True):
        assert (run / RESERVE).stat().st_size == RESERVE_BYTES
        assert records.lock_holder(run / records.LOCK)["pid"] == os.getpid()
    assert not (run / RESERVE).exists()
    with pytest.raises(UserError, match="no images"):
        with claim_run_dir(tmp_path / "bad", _cfg(tmp_path / "bad"), is_main=True):
            raise UserError("no images")  # bad input met while building: nothing of the run left behind
    assert not (tmp_path / "bad").exists()


def test_claim_refuses_a_dir_holding_a_run_and_overwrite_moves_it_aside(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _summary(run, status="ok")
    (run / "point.json").write_text("{}")
    with pytest.raises(UserError) as err:
        with claim_run_dir(run, _cfg(run), is_main=True):
            pass
    assert str(err.value) == (f"{run} already holds a run: continue it with --resume {run}, or start over with "
                              f"--overwrite (moves the old run aside to {run}.old-<time>)")
    assert (run / records.SUMMARY).is_file()
    study_only = tmp_path / "point"
    study_only.mkdir()
    (study_only / "launch.log").write_text("a study's own file is no run\n")
    with claim_run_dir(study_only, _cfg(study_only), is_main=True):
        pass
    with claim_run_dir(run, _cfg(run, "--overwrite"), is_main=True):
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
        assert len(aside) == 1 and _strict((aside[0] / records.SUMMARY).read_text())["status"] == "ok"
        assert sorted(p.name for p in run.iterdir()) == [records.LOCK, RESERVE]
        assert records.lock_holder(run / records.LOCK)["pid"] == os.getpid()
        assert records.lock_holder(aside[0] / records.LOCK) is None
    assert capsys.readouterr().out.strip() == f"--overwrite: moved the old run in {run} aside to {aside[0]}"
