"""A report that survives any run (issue 15.4) and flags what cannot be true (issue 13.3).

Real runs, killed at different moments (one module-scoped set of lenet5 runs on synthetic data, 1 thread each):
SIGKILLed right after it starts (its summary still says running: the report must read it as running while it
lives and as dead once killed), SIGTERMed after its first log step (preempted), and one that diverges (lr 1e6).
Hand-made odd records (tests/fixtures/records/odd) cover the values no real run writes: strings, NaN, a world size
of 0, a schema from the future, impossible figures.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from cnnscale.report import main as report
from cnnscale.report.aggregate import aggregate
from cnnscale.report.html import page
from cnnscale.report.load import find_fits, load_records
from cnnscale.report.tables import render

REPO = Path(__file__).resolve().parent.parent
ODD = REPO / "tests" / "fixtures" / "records" / "odd"
TRAIN = ["--model", "lenet5", "--data", "synthetic", "--micro-batch", "16", "--train.log_every", "2"]
RUNS = {"killed": ["--max-steps", "100000"], "preempted": ["--max-steps", "100000"],
        "diverged": ["--max-steps", "40", "--lr", "1e6"]}


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _wait(cond: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"{what}: the run ended first (exit {proc.returncode}): {log.read_text()[-2000:]}"
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def _rows(*roots: Path) -> tuple[list[dict], list[str]]:
    runs, warns = load_records(list(roots))
    return aggregate(runs, find_fits(list(roots), runs), None, warns), warns


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The real runs' directory; the killed run's status as the report read it while it lived; exit codes."""
    root = tmp_path_factory.mktemp("zoo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    procs = {}
    for name, args in RUNS.items():
        with open(root / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *TRAIN, *args,
                                            "--out", str(root / name)], cwd=REPO, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        killed, pre = procs["killed"], procs["preempted"]
        _wait(lambda: _status(root / "killed") == "running", killed, "killed: a running summary", root / "killed.log")
        live = {r["run"]: r["status"] for r in _rows(root / "killed")[0]}
        os.killpg(killed.pid, signal.SIGKILL)  # its own session: the trainer and anything it started
        _wait(lambda: (root / "preempted" / "metrics.jsonl").is_file()
              and (root / "preempted" / "metrics.jsonl").stat().st_size > 0, pre, "preempted: a log step",
              root / "preempted.log")
        pre.send_signal(signal.SIGTERM)
        codes = {name: p.wait(timeout=240) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    return root, live, codes


def test_a_live_run_reads_running_and_once_killed_dead(zoo):
    root, live, codes = zoo
    assert live == {str(root / "killed"): "running"}
    assert codes["killed"] == -signal.SIGKILL and _status(root / "killed") == "running"  # its record never ended
    rows, _ = _rows(root)
    dead = next(r for r in rows if r["run"] == str(root / "killed"))
    assert dead["status"] == "dead" and f"--resume {root / 'killed'}" in dead["error"]


def test_every_kind_of_record_in_one_report_never_raises(zoo, tmp_path, capsys):
    root, _, codes = zoo
    assert codes["preempted"] == 75 and codes["diverged"] == 3, codes
    out = tmp_path
    rc = report.main([str(root), str(ODD), "--width", "80", "--csv", str(out / "r.csv"), "--json", str(out / "r.json")])
    assert rc == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    assert all(len(line) <= 80 for line in cap.out.splitlines()), "the terminal report must fit 80 columns"
    rows = _strict((out / "r.json").read_text())
    status = {Path(r["run"]).name: r["status"] for r in rows}
    assert {k: status[k] for k in RUNS} == {"killed": "dead", "preempted": "preempted", "diverged": "diverged"}
    preempted = next(r for r in rows if r["run"].endswith("preempted"))
    assert "SIGTERM" in preempted["error"] and "--resume" in preempted["error"]
    assert "loss is nan" in next(r for r in rows if r["run"].endswith("diverged"))["error"]
    for name in ("DEAD", "PREEMPTED", "DIVERGED"):
        assert name in cap.out
    # every odd record is a row or named in a warning
    warned = cap.err
    for d in sorted(p for p in ODD.iterdir() if p.is_dir()):
        assert d.name in status or str(d) in warned, d.name
    assert len(list(csv.DictReader(open(out / "r.csv")))) == len(rows)
    runs, warns = load_records([root, ODD])  # the page without its plots (matplotlib costs seconds here)
    html = page(aggregate(runs, None, None, warns), runs, None, None, warns)
    assert 'class="failed">DEAD</td>' in html and 'class="suspect" title="efficiency 1.30 is above' in html


ODD_WARNINGS = {
    "fast": "img_per_s 'fast' does not fit its field",
    "world-size-0": "world_size 0 is not a plausible count",
    "bool-world-size": "world_size True does not fit its field",
    "nan-and-infinity": "img_per_s is nan",
    "future-schema": "schema_version 99 is newer than this cnnscale reads",
    "unknown-status": "unknown value 'exploded'",
    "not-an-object": "not a JSON object",
    "strings-for-numbers": "steps 'ten' does not fit its field",
    "env-only-partial": "no summary.json",
}


def test_each_odd_value_is_named_in_one_warning_and_nothing_raises():
    rows, warns = _rows(ODD)
    for name, phrase in ODD_WARNINGS.items():
        mine = [w for w in warns if f"{ODD / name}" in w]
        assert len(mine) == 1 and phrase in mine[0], (name, mine)
    shown = {Path(r["run"]).name: r for r in rows}
    assert shown["fast"]["img_per_s"] is None and shown["fast"]["status"] == "ok"
    assert shown["nan-and-infinity"]["img_per_s"] is None and shown["nan-and-infinity"]["step_ms"] is None
    assert shown["no-micro-batch"]["img_per_s"] == 9000.0 and shown["no-micro-batch"]["step_s"] == 128 / 9000.0
    assert shown["running-on-a-gone-host"]["status"] == "dead" and shown["failed"]["status"] == "failed"
    for gone in ("world-size-0", "bool-world-size", "future-schema", "unknown-status", "not-an-object"):
        assert gone not in shown


def test_impossible_figures_are_shown_as_suspect_with_a_footnote_saying_why(tmp_path):
    rows, warns = _rows(ODD)
    r = next(x for x in rows if x["run"].endswith("suspect-ws2"))
    assert r["efficiency"] == pytest.approx(13000 / (2 * 5000))
    assert set(r["suspect"]) >= {"efficiency", "speedup", "pred_error_pts", "sync_share", "optim_share", "mfu",
                                 "step_ms"}
    base = next(x for x in rows if x["run"].endswith("baseline-ws1"))
    assert base["suspect"] == {}
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    render(rows, console, warns)
    text = " ".join(console.export_text().split())
    for why in ("eff, speedup, err pts: efficiency 1.30 is above 1.15 at N=2", "MFU %: MFU 250.0% is above 100%",
                "optim %: share -19.2% is outside 0-100%", "step ms: time -3 is negative"):
        assert f"suspect: lenet5 odd N=2, {why}" in text
    assert "1.30" not in text.replace("efficiency 1.30", "")  # the figure itself is never printed as fact
    report.main([str(ODD), "--csv", str(tmp_path / "r.csv")])
    line = next(x for x in csv.DictReader(open(tmp_path / "r.csv")) if x["run"].endswith("suspect-ws2"))
    assert "mfu: MFU 250.0% is above 100%" in line["suspect"]


MANGLED = ("fast", -1, 0, None, {}, True, 1e308)


def test_any_mangled_summary_value_gives_a_report_not_a_traceback(tmp_path):
    keys = ("status", "world_size", "micro_batch", "global_batch", "img_per_s", "step_ms_p50", "train_time_s",
            "sync_s", "mfu", "steps")
    good = json.loads((ODD / "suspect-ws2" / "summary.json").read_text())
    root = tmp_path / "runs"
    shutil.copytree(ODD / "baseline-ws1", root / "baseline-ws1")
    run = root / "mangled"
    shutil.copytree(ODD / "suspect-ws2", run)
    for key in keys:
        for value in MANGLED:
            (run / "summary.json").write_text(json.dumps({**good, key: value}))
            rows, warns = _rows(root)
            console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
            render(rows, console, warns)
            mine = [r for r in rows if r["run"] == str(run)]
            assert mine or any(str(run) in w for w in warns), (key, value)
