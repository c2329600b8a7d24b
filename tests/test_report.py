"""`cnnscale report` from a fixture of run directories: golden text, predictions, exports, plots, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
from pathlib import Path

import pytest
from rich.console import Console

from cnnscale.errors import UserError
from cnnscale.report import main as report
from cnnscale.report.plots import PIXELS
from cnnscale.scaling import model as scaling

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "tests/fixtures/runs"  # relative, so the golden text holds no machine-specific paths
GOLDEN = REPO / "tests" / "golden" / "report.txt"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _rows():
    recs, warns = report.load_records([FIXTURE])
    return report.aggregate(recs, report.find_fits([FIXTURE], recs)), warns


def _text(rows, warns) -> str:
    console = Console(record=True, width=160, file=io.StringIO(), color_system=None)
    report.render(rows, console, warns)
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
    assert len(rows) == 11 and set(report.COLUMNS) == set(rows[0])
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
    rec = {"summary": {"model": "resnet18"}, "config": {"dist": {"comm_hook": "bf16", "bucket_mb": 50}}}
    assert report.settings_label(report.records.RunRecord(path="x", env={}, **rec)) == "hook=bf16,bucket=50MB"


def test_predict_table_shows_vgg16_moving_more_bytes_per_flop_than_resnet18():
    from cnnscale.report.predict import predict_rows

    recs, _ = report.load_records([FIXTURE])
    rows = report.aggregate(recs)
    pr = {r["model"]: r for r in predict_rows(recs, rows, "ib-hdr", 400.0, {})}
    assert pr["vgg16"]["mb_per_gflop"] > 2 * pr["resnet18"]["mb_per_gflop"]
    assert pr["vgg16"]["pred"][1024] < pr["resnet18"]["pred"][1024]
    assert pr["resnet18"]["interconnect"] == "ib-hdr" and scaling.PRESETS["ib-hdr"].overlap == 1.0
