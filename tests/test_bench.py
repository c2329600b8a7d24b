"""``cnnscale bench`` as users run it: a subprocess with a timeout. Speed itself is not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zygote

from cnnscale.bench.ratios import measure_ratio

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.timeout(400)
def test_bench_lenet5_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [PY, "-m", "cnnscale", "bench", "--models", "lenet5", "--steps", "5", "--rounds", "2", "--threads", "1",
           "--json", str(out), "--remeasure-peak"]
    env = {**ENV, "CNNSCALE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lenet5" in proc.stdout and "measured:cpu matmul+conv fp32" in proc.stdout
    assert "CPU peak remeasured" in proc.stdout and "cache hit" in proc.stdout  # refreshed once, then reused
    assert len(list((tmp_path / "cache" / "peak").glob("*-t1-fp32-*.json"))) == 1
    assert "overhead lenet5" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)
    assert "data and e2e ratios skipped" in proc.stdout
    doc = json.loads(out.read_text())
    (row,) = doc["models"]
    assert row["model"] == "lenet5" and row["images"] == 5 * 64
    assert row["img_per_s"] > 0 and row["step_ms_p50"] > 0 and row["gflops_per_img"] == pytest.approx(0.00320472)
    assert row["gpu_util_pct_mean"] is None and row["mfu"] > 0
    over = doc["ratios"]["overhead"]["lenet5"]
    assert over["goal"] == 0.98 and len(over["ratios"]) == 2 and over["ratio"] > 0
    assert over["rounds"] == 2 and over["interval"] == "min-max" and over["lo"] <= over["ratio"] <= over["hi"]
    assert row["peak_cache"] == "hit" and row["peak_age_s"] >= 0


def test_bench_bad_input_is_one_line_exit_2() -> None:
    for args, needle in ((["--models", "lenet5,nope"], "unknown model 'nope'"),
                         (["--ratios", "data"], "needs the real images"), (["--steps", "0"], "--steps must be >= 1")):
        proc = zygote.run(["-m", "cnnscale", "bench", *args], cwd=ROOT, env=ENV, timeout=120)  # forked: no import
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_help_lists_flags_with_defaults() -> None:
    proc = subprocess.run([PY, "-m", "cnnscale", "bench", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("--models", "lenet5,alexnet,vgg16,resnet18,mobilenet_v2", "--steps", "(default: 20)", "--ratios",
                 "{overhead,data,e2e,all,none}", "--json"):
        assert text in proc.stdout, (text, proc.stdout)


def test_measure_ratio_auto_stops_at_the_half_width_or_the_budget() -> None:
    steady = measure_ratio(lambda: 99.0, lambda: 100.0, "auto", budget_s=1e9)
    assert steady["rounds"] == 5 and steady["stopped_by"] == "half-width"  # the bootstrap interval starts at 5
    assert steady["ratio"] == pytest.approx(0.99) and steady["interval"] == "bootstrap95"
    assert steady["half_width"] == pytest.approx(0.0, abs=1e-12)
    noisy, t = iter([50.0, 150.0] * 100), [0.0]

    def clock() -> float:
        t[0] += 1.0  # each call a second later
        return t[0]

    res = measure_ratio(lambda: next(noisy), lambda: 100.0, "auto", budget_s=20, clock=clock)
    assert res["stopped_by"] == "budget" and res["rounds"] == 20 and res["half_width"] >= 0.02  # one clock s a round
    assert res["lo"] <= res["ratio"] <= res["hi"] and len(res["ratios"]) == res["rounds"]


def test_measure_ratio_alternates_and_takes_the_median() -> None:
    calls: list[str] = []
    ours = iter([10.0, 12.0, 30.0])
    theirs = iter([5.0, 6.0, 5.0])

    def a() -> float:
        calls.append("ours")
        return next(ours)

    def b() -> float:
        calls.append("theirs")
        return next(theirs)

    res = measure_ratio(a, b, 3)
    assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
    assert res["ratios"] == [2.0, 2.0, 6.0] and res["ratio"] == 2.0
    assert res["ours_img_per_s"] == 12.0 and res["theirs_img_per_s"] == 5.0
    assert (res["lo"], res["hi"], res["interval"], res["rounds"]) == (2.0, 6.0, "min-max", 3)  # below 5: min-max


def test_ratio_verdict_says_when_the_interval_straddles_the_goal() -> None:
    from cnnscale.bench.output import _verdict

    assert _verdict({"ratio": 0.99, "lo": 0.985, "hi": 0.995}, 0.98) == "PASS"
    assert _verdict({"ratio": 0.95, "lo": 0.94, "hi": 0.97}, 0.98) == "MISS"
    assert _verdict({"ratio": 0.99, "lo": 0.97, "hi": 1.0}, 0.98) == "PASS?"
    assert _verdict({"ratio": 0.975, "lo": 0.96, "hi": 0.99}, 0.98) == "MISS?"
