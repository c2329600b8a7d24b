"""`cnnscale report` from a fixture of run directories: golden text, predictions, exports, plots, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cnnscale.errors import UserError
from cnnscale.records.run import Run
from cnnscale.records.schema import Env, Point, Summary, read_point, write_point
from cnnscale.report import main as report
from cnnscale.report.aggregate import COLUMNS, aggregate
from cnnscale.report.load import find_fits, load_records, settings_label
from cnnscale.report.plots import PIXELS
from cnnscale.report.predict import predict_rows
from cnnscale.report.tables import render, render_predict
from cnnscale.scaling import model as scaling

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "tests/fixtures/runs"  # relative, so the golden text holds no machine-specific paths
GOLDEN = REPO / "tests" / "golden" / "report.txt"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _rows():
    recs, warns = load_records([FIXTURE])
    return aggregate(recs, find_fits([FIXTURE], recs)), warns


def _text(rows, warns) -> str:
    console = Console(record=True, width=160, file=io.StringIO(), color_system=None)
    render(rows, console, warns)
    return console.export_text()


def test_report_matches_golden_text():
    text = _text(*_rows())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_corrupt_and_partial_runs_are_skipped_with_a_warning_naming_them():
    _, warns = _rows()
    assert any("corrupt-run" in w and "corrupt" in w for w in warns)
    assert any("partial-run" in w for w in warns)


def test_efficiency_and_prediction_by_hand():
    rows, _ = _rows()
    r = next(x for x in rows if x["model"] == "resnet18" and x["world_size"] == 2 and x["settings"] == "default")
    assert r["efficiency"] == pytest.approx(23.4 / (2 * 13.0))
    # measured fit in the fixture: alpha 100 us, 1 GB/s, no overlap on CPU. 44.7 MB fp32 gradient = 2 buckets
    # (25 MiB + rest): comm = 2 * (bytes_i / 1e9 + 2 * 100e-6); step(1) = 16 / 13.0 s.
    comm = 11_173_962 * 4 / 1e9 + 2 * 2 * 100e-6
    step1 = 16 / 13.0
    assert r["interconnect"] == "measured"
    assert r["pred_efficiency"] == pytest.approx(step1 / (step1 + comm), rel=1e-6)
    assert r["pred_error_pts"] == pytest.approx(100 * (r["pred_efficiency"] - r["efficiency"]))
    gpu = next(x for x in rows if x["precision"] == "bf16" and x["world_size"] == 8)
    assert gpu["interconnect"] == "nvlink" and gpu["mem_kind"] == "gpu" and gpu["util_kind"] == "gpu"


def test_failed_points_are_shown_as_such():
    rows, _ = _rows()
    status = {(r["model"], r["world_size"]): r["status"] for r in rows}
    assert status[("vgg16", 2)] == "oom" and status[("nope", 1)] == "failed"
    text = _text(rows, [])
    assert "OOM" in text and "unknown model 'nope'" in text


def test_exports_and_plots(tmp_path, capsys):
    out = tmp_path
    rc = report.main([FIXTURE, "--width", "160", "--csv", str(out / "r.csv"), "--json", str(out / "r.json"),
                      "--html", str(out / "r.html"), "--svg", str(out / "r.svg"), "--plots", str(out / "plots")])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "r.csv")))
    assert len(rows) == 11 and set(COLUMNS) == set(rows[0])
    assert len(json.loads((out / "r.json").read_text())) == 11
    assert "cnnscale scaling report" in (out / "r.html").read_text()
    assert (out / "r.svg").read_text().lstrip().startswith("<svg")
    for name in ("throughput.png", "efficiency.png", "memory.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == PIXELS
    assert "corrupt-run" in capsys.readouterr().err


def test_empty_or_foreign_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no runs found in"):
        report.main([str(tmp_path)])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a run")
    with pytest.raises(UserError, match="no runs found in"):
        report.main([str(tmp_path)])
    with pytest.raises(UserError, match="unknown interconnect"):
        report.main([FIXTURE, "--interconnect", "smoke-signals"])


def test_settings_label_from_config_when_not_from_a_study():
    rec = {"summary": Summary(status="ok", model="resnet18"),
           "config": {"dist": {"comm_hook": "bf16", "bucket_mb": 50}}}
    assert settings_label(Run(path="x", env=Env(), point=None, **rec)) == "hook=bf16,bucket=50MB"


def test_predict_table_shows_vgg16_moving_more_bytes_per_flop_than_resnet18():
    recs, _ = load_records([FIXTURE])
    rows = aggregate(recs)
    pr = {r["model"]: r for r in predict_rows(recs, rows, "ib-hdr", 400.0, {})}
    assert pr["vgg16"]["mb_per_gflop"] > 2 * pr["resnet18"]["mb_per_gflop"]
    assert pr["vgg16"]["pred"][1024] < pr["resnet18"]["pred"][1024]
    assert pr["resnet18"]["interconnect"] == "ib-hdr" and scaling.PRESETS["ib-hdr"].overlap == 1.0


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_report_reads_the_study_point_and_never_writes_into_run_directories(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(REPO / FIXTURE / "cpu_study", runs)
    p = read_point(runs / "resnet18-ws2-no-mb16")  # summary.json says ok ...
    write_point(runs / "resnet18-ws2-no-mb16", Point.from_dict({**p.to_dict(), "status": "timeout",
                                                                "error": "hit the study's 600 s limit"}))
    write_point(runs / "lenet5-ws4-no-mb64", Point(study="fixture", id="lenet5-ws4-no-mb64", model="lenet5",
                                                   world_size=4, status="failed", micro_batch=64,
                                                   global_batch=256, error="launcher died"))  # no trainer files
    before = _tree(runs)
    recs, warns = load_records([runs])
    rows = aggregate(recs, find_fits([runs], recs), None, warns)
    status = {(r["model"], r["world_size"], r["settings"]): (r["status"], r["error"]) for r in rows}
    assert status[("resnet18", 2, "default")] == ("timeout", "hit the study's 600 s limit")
    assert status[("lenet5", 4, "default")] == ("failed", "launcher died")
    assert report.main([str(runs), "--predict", "--csv", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json"),
                        "--plots", str(tmp_path / "plots")]) == 0
    assert _tree(runs) == before


def test_records_without_params_or_flops_give_na_with_one_warning_naming_the_run():
    recs, warns = load_records([FIXTURE])
    rows = aggregate(recs, find_fits([FIXTURE], recs), None, warns)
    pr = {r["model"]: r for r in predict_rows(recs, rows, "ib-hdr", 400.0, {}, warns)}
    # lenet5's records are today's (schema 0): params in summary.json, but no FLOPs anywhere
    assert pr["lenet5"]["mb_per_gflop"] is None and pr["lenet5"]["pred"][1024] is None
    assert pr["resnet18"]["gflop_step"] == pytest.approx(3328997376.0 * 16 / 1e9)
    flops_warns = [w for w in warns if "FLOPs" in w]
    assert len(flops_warns) == 1 and "lenet5-ws1-no-mb64" in flops_warns[0]
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    render_predict(list(pr.values()), console)
    assert "n/a" in console.export_text()


def test_report_command_never_imports_torch(tmp_path):
    args = [FIXTURE, "--predict", "--plots", str(tmp_path / "p"), "--csv", str(tmp_path / "r.csv")]
    code = (f"import sys\nfrom cnnscale.report.main import main\nmain({args!r})\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'accelerate'))\n"
            "assert not heavy, heavy\nprint('no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("no torch")
