"""Study repeats, in process: round-robin order, one run directory and record per repeat, resume that skips the
repeats already done, the dry run, the exit code and status count, one writer per study directory, and the study's
signals. A recording backend stands in for the launches (the real launches are tests/test_study_behaviour.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cnnscale.cli import main as cli_main
from cnnscale.records.io import LOCK, hold_lock
from cnnscale.records.schema import Env, Summary, read_point, write_env, write_summary
from cnnscale.study import launcher
from cnnscale.study.launcher import Outcome
from cnnscale.study.local import run_study
from cnnscale.study.main import status_counts
from cnnscale.study.matrix import expand
from cnnscale.study.outcome import is_done, read_done
from cnnscale.study.spec import parse_spec
from cnnscale.study.stop import StudyStopped, stop_on_signals

SPEC = {"name": "rr", "models": ["lenet5", {"name": "resnet18", "max_steps": 2}], "world_sizes": [1, 2],
        "max_steps": 3, "repeats": 3, "allreduce_bench": False, "settings": {"default": {}, "compute_only": {
            "dist.compute_only": True}}}


class FakeBackend:
    """Records each launch's run directory and writes what a trainer would (summary.json ok at the right world
    size); ``fail`` names run directories whose launch fails, ``stop_at`` raises StudyStopped on that launch."""

    name = "fake"

    def __init__(self, fail: tuple[str, ...] = (), stop_at: int | None = None, diverge: tuple[str, ...] = ()) -> None:
        self.launched: list[str] = []
        self.fail, self.stop_at, self.diverge = fail, stop_at, diverge

    def run(self, cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> Outcome:
        run_dir = log_path.parent
        if self.stop_at is not None and len(self.launched) == self.stop_at:
            raise StudyStopped(signal.SIGTERM)
        self.launched.append(run_dir.name)
        ws = int(cmd[cmd.index("--nproc-per-node") + 1]) if "--nproc-per-node" in cmd else (
            int(cmd[cmd.index("--num_processes") + 1]) if "--num_processes" in cmd else 1)
        assert ("--out" in cmd) != ("--resume" in cmd) and str(run_dir) in cmd  # absolute run directory
        log_path.write_text("$ " + " ".join(cmd) + "\n")
        if run_dir.name in self.fail:
            return Outcome("failed", "exit 1: ValueError: boom", 1, 0.5)
        write_env(run_dir, Env(world_size=ws))
        if run_dir.name in self.diverge:  # what the trainer leaves on a non-finite loss: exit 3, status diverged
            write_summary(run_dir, Summary(status="diverged", world_size=ws, steps=2,
                                           error="loss is nan at step 2 (lr 1e+06): stopping, status diverged"))
            return Outcome("failed", "exit 3: loss is nan", 3, 0.5)
        write_summary(run_dir, Summary(status="ok", world_size=ws, steps=3, img_per_s=100.0, step_ms_p50=5.0,
                                       sync_share=0.1, mfu=1.7))
        return Outcome("ok", "", 0, 0.5)


def test_expand_is_round_robin_and_repeat_is_not_part_of_the_id():
    spec = parse_spec(SPEC)
    points = expand(spec)
    once = expand(parse_spec({**SPEC, "repeats": 1}))
    assert len(once) == 6 and len(points) == 3 * len(once)  # compute_only (calibration) points repeat too
    assert [p.repeat for p in points] == [k for k in range(3) for _ in once]  # all once, then all again
    assert [p.id for p in points] == [p.id for p in once] * 3  # same matrix order in every round, never K in a row
    assert all(points[i].id != points[i + 1].id for i in range(len(points) - 1))
    names = [p.run_name for p in points]
    assert len(set(names)) == len(names)
    assert names[:6] == [p.id for p in once]  # repeat 0 keeps the old directory name: old studies resume
    assert names[6] == f"{once[0].id}-r1" and names[-1] == f"{once[-1].id}-r2"
    assert parse_spec({k: v for k, v in SPEC.items() if k != "repeats"}).repeats == 1
    with pytest.raises(Exception, match="repeats must be >= 1"):
        parse_spec({**SPEC, "repeats": 0})


def test_repeats_at_runs_some_world_sizes_more_often_still_round_robin(tmp_path, capsys):
    spec = parse_spec({**SPEC, "repeats_at": {1: 5}})
    points = expand(spec)
    once = expand(parse_spec({**SPEC, "repeats": 1}))
    ws1 = [p for p in once if p.world_size == 1]
    assert len(ws1) == 2 and len(points) == 3 * len(once) + 2 * len(ws1)
    assert [p.id for p in points[-4:]] == [p.id for p in ws1] * 2  # passes 4 and 5: the N = 1 points alone
    assert {p.id: p.repeats for p in points} == {p.id: 5 if p.world_size == 1 else 3 for p in once}
    assert sorted(p.repeat for p in points if p.id == ws1[0].id) == [0, 1, 2, 3, 4]
    assert all(points[i].id != points[i + 1].id for i in range(len(points) - 1))
    assert spec.repeats_for(2) == 3 and spec.max_repeats == 5
    out = tmp_path / "study"
    run_study(parse_spec({**SPEC, "models": ["lenet5"], "settings": None, "repeats": 1, "repeats_at": {2: 2}}), out,
              FakeBackend())
    said = capsys.readouterr().out
    assert "[study] 3 points (2 x 1-2 repeats, round-robin)" in said
    assert "3/3 lenet5-ws2-no-mb32 repeat 2/2: ok" in said and "lenet5-ws1-no-mb32: ok" in said
    for bad, msg in (({1: 0}, "repeats_at.1 must be >= 1"), ({3: 2}, r"repeats_at world sizes \[3\] are not among"),
                     ([1, 5], "repeats_at must be a mapping of world size: runs")):
        with pytest.raises(Exception, match=msg):
            parse_spec({**SPEC, "repeats_at": bad})


def test_run_study_records_each_repeat_and_resume_skips_the_done_ones(tmp_path):
    spec = parse_spec({**SPEC, "models": ["lenet5"], "settings": None, "repeats": 2})
    out = tmp_path / "study"
    stopped = FakeBackend(stop_at=3)  # the study is stopped (SIGTERM) at its 4th launch
    with pytest.raises(StudyStopped):
        run_study(spec, out, stopped)
    assert stopped.launched == ["lenet5-ws1-no-mb32", "lenet5-ws2-no-mb32", "lenet5-ws1-no-mb32-r1"]
    cut = read_point(out / "lenet5-ws2-no-mb32-r1")  # the point running at the stop: recorded, not done
    assert cut.status == "failed" and cut.error == "stopped: the study got SIGTERM" and cut.repeat == 1
    rec = read_point(out / "lenet5-ws1-no-mb32-r1")
    assert (rec.id, rec.point_id, rec.repeat, rec.status) == ("lenet5-ws1-no-mb32-r1", "lenet5-ws1-no-mb32", 1, "ok")
    p0, p1 = expand(spec)[0], expand(spec)[2]
    assert p0.id == p1.id and is_done(out / p0.run_name, p0) and not is_done(out / p0.run_name, p1)
    again = FakeBackend()
    results = run_study(spec, out, again)
    assert again.launched == ["lenet5-ws2-no-mb32-r1"]  # the done repeats are skipped
    assert [r.status for r in results] == ["ok"] * 4 and [r.repeat for r in results] == [0, 0, 1, 1]


def test_a_record_from_before_repeats_is_repeat_0(tmp_path):
    spec = parse_spec({**SPEC, "models": ["lenet5"], "world_sizes": [1], "settings": None, "repeats": 2})
    p = expand(spec)[0]
    run_study(spec, tmp_path, FakeBackend())
    path = tmp_path / p.run_name / "point.json"
    old = json.loads(path.read_text())
    del old["point_id"], old["repeat"]  # as a study made before repeats wrote it
    path.write_text(json.dumps(old))
    assert read_done(tmp_path / p.run_name, p) is not None
    assert read_done(tmp_path / p.run_name, expand(spec)[1]) is None  # never mistaken for repeat 1


def _study_file(tmp: Path, **over: object) -> Path:
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "models": ["lenet5"], "settings": None, "repeats": 2, **over}))
    return path


def test_dry_run_lists_every_repeat(tmp_path, capsys):
    assert cli_main(["study", str(_study_file(tmp_path)), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert text.count("todo  lenet5-ws1-no-mb32  repeat 1/2") == 1 and text.count("repeat 2/2") == 2
    assert f"--out {tmp_path / 'o' / 'lenet5-ws2-no-mb32-r1'}" in text
    assert not (tmp_path / "o").exists()


@pytest.fixture
def fake(monkeypatch):
    def use(backend: FakeBackend) -> FakeBackend:
        monkeypatch.setitem(launcher.BACKENDS, "fake", lambda: backend)
        return backend
    return use


def test_exit_code_and_status_count(tmp_path, capsys, fake):
    """0 only when every point is ok; 1 after the report otherwise, with one line counting points by status."""
    study = _study_file(tmp_path)
    out = tmp_path / "o"
    fake(FakeBackend(fail=("lenet5-ws2-no-mb32-r1",), diverge=("lenet5-ws1-no-mb32-r1",)))
    assert cli_main(["study", str(study), "--out", str(out), "--backend", "fake"]) == 1
    cap = capsys.readouterr()
    assert "cnnscale scaling report" in cap.out  # the report comes first
    assert "study rr: 4 points: 2 ok, 1 failed, 1 diverged, " in cap.err.strip().splitlines()[-1]
    div = read_point(out / "lenet5-ws1-no-mb32-r1")
    assert div.status == "diverged" and div.error.startswith("loss is nan at step 2")
    assert "repeat 2/2: failed" in cap.out and "100.0 img/s, step 5.0 ms, sync 10%, suspect MFU 170.0% (MFU " in cap.out
    again = fake(FakeBackend())
    assert cli_main(["study", str(study), "--out", str(out), "--backend", "fake"]) == 0
    assert again.launched == ["lenet5-ws1-no-mb32-r1", "lenet5-ws2-no-mb32-r1"]  # the ok ones are skipped
    assert "4 points: 4 ok, " in capsys.readouterr().err
    assert status_counts([read_point(d) for d in sorted(out.glob("lenet5-*"))]) == "4 ok"


def test_a_second_study_on_one_directory_is_refused_naming_the_holder(tmp_path):
    """One writer per study directory: a live holder (another process) refuses the second, exit 2, one line; the
    kernel drops the lock when the holder is SIGKILLed."""
    out = tmp_path / "o"
    code = (f"from cnnscale.records.io import hold_lock\nimport time\nwith hold_lock({str(out / LOCK)!r}, 'x'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "cnnscale", "study", str(_study_file(tmp_path)), "--out",
                               str(out)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"is in use by pid {holder.pid} on " in proc.stderr and str(out) in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written, nothing launched
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with hold_lock(out / LOCK, "study") as me:  # released by the kernel when its holder died
        assert me["pid"] == os.getpid()


def test_signals_end_the_running_launch_and_raise_study_stopped(tmp_path):
    """SIGTERM, SIGHUP and SIGINT to the study: the point's process group is ended, StudyStopped goes up."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        log = tmp_path / f"{sig.name}.log"
        threading.Timer(0.5, os.kill, (os.getpid(), sig)).start()
        t0 = time.monotonic()
        with pytest.raises(StudyStopped) as info, stop_on_signals():
            launcher.LocalBackend().run(["sh", "-c", "echo $$; exec sleep 30"], {}, log, 60)
        assert info.value.signum == sig and time.monotonic() - t0 < 10
        pid = int(log.read_text().splitlines()[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the old handlers are back
