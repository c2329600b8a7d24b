"""`cnnscale report` from a fixture of run directories: golden text, predictions, exports, plots, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cnnscale.errors import UserError
from cnnscale.records.run import Run, load_run
from cnnscale.records.schema import Env, Point, Summary, read_point, read_summary, write_point, write_summary
from cnnscale.report import main as report
from cnnscale.report.aggregate import COLUMNS, aggregate
from cnnscale.report.columns import display_rows, table_specs
from cnnscale.report.load import find_fits, load_records, settings_label
from cnnscale.report.plots import PIXELS
from cnnscale.report.predict import predict_rows
from cnnscale.report.tables import render, render_predict
from cnnscale.report.verdicts import verdicts
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
    for name in ("throughput.png", "efficiency.png", "memory.png", "breakdown.png"):
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


# --- a report that fits the terminal, verdicts, repeats, file modes (issue 16) ---

QUICKSTART = "tests/fixtures/quickstart_study"  # the README's quickstart study (first run), as records


def _console_text(root: str, width: int) -> tuple[str, list[dict]]:
    recs, warns = load_records([root])
    rows = aggregate(recs, find_fits([root], recs), None, warns)
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    render(rows, console, warns)
    return console.export_text(), rows


@pytest.mark.parametrize("root", [FIXTURE, QUICKSTART])
@pytest.mark.parametrize("width", [80, 100, 120])
def test_every_number_of_every_table_is_whole_at_80_100_and_120_columns(root, width):
    text, rows = _console_text(root, width)
    assert "…" not in text and "Not shown at" not in text  # nothing cut, no column dropped
    assert all(len(line) <= width for line in text.splitlines())
    for spec in table_specs(rows):
        shown = [r for r in rows if spec.failed_rows or r["status"] == "ok"]
        assert shown
        for label, row in display_rows(shown):
            cells = [label.strip()] + ([] if row is None else [c.cell(row) for c in spec.columns])
            # the whole row on one line, each cell whole and in order
            pattern = r"^\s*" + r"\s+".join(re.escape(c) for c in cells if c) + r"\s*$"
            assert re.search(pattern, text, re.M), (spec.name, width, cells)


def test_a_narrow_terminal_drops_low_priority_columns_and_says_which():
    text, rows = _console_text(QUICKSTART, 50)
    assert "…" not in text
    dropped = re.findall(r"Not shown at 50 columns: ([^(]+) \(see --csv or --html\)", " ".join(text.split()))
    assert dropped and "batch" in dropped[0] and "speedup" in dropped[0]
    for r in rows:  # the efficiency itself is never dropped
        assert f"{r['efficiency']:.2f}" in text


def test_units_are_in_the_headers_not_in_the_cells():
    text, _ = _console_text(QUICKSTART, 120)
    body = [line for line in text.splitlines() if line.startswith("  ")]
    assert body and not any(re.search(r"\d (GB|rss|cpu|%)|\dx\b|\d%", line) for line in body)


def _u(summary: dict) -> float:
    return summary["world_size"] / summary["img_per_s"]


def _summary(root: str, run: str) -> dict:
    return json.loads((REPO / root / run / "summary.json").read_text())


def test_verdicts_split_the_lost_points_by_cause_from_the_records():
    recs, _ = load_records([QUICKSTART])
    found = {v.model: v for v in verdicts(aggregate(recs, find_fits([QUICKSTART], recs)))}
    assert set(found) == {"lenet5", "mobilenet_v2", "resnet18", "vgg16"}
    one, two, co = (_summary(QUICKSTART, f"vgg16-ws{n}-no-mb16{s}") for n, s in ((1, ""), (2, ""),
                                                                                (2, "-compute_only")))
    share = lambda s, k: s[k] / s["train_time_s"]  # noqa: E731
    eff = 77.0 / (2 * 50.1)
    u0, un, uc = _u(one), _u(two), _u(co)
    shared = 100 * (uc * (1 - share(co, "data_wait_s")) - u0 * (1 - share(one, "data_wait_s"))) / un
    data = 100 * (un * share(two, "data_wait_s") - u0 * share(one, "data_wait_s")) / un
    v = found["vgg16"]
    assert v.world_size == 2 and v.lost_pts == pytest.approx(100 * (1 - eff))
    assert v.parts["shared machine"] == pytest.approx(shared)
    assert v.parts["communication"] == pytest.approx(100 * (1 - eff) - shared - data)
    assert sum(v.parts.values()) == pytest.approx(v.lost_pts)
    assert v.text.startswith(f"vgg16 loses {100 * (1 - eff):.0f} points at N=2 against N=1 (efficiency 0.77): "
                             f"{100 * (1 - eff) - shared - data:.0f} to communication (58.9 MB of fp32 gradients")
    assert f"{shared:.0f} to the shared machine (its compute_only run: efficiency 0.89)" in v.text
    # every model's parts add up to the points it lost, and each verdict names its N and efficiency
    for v in found.values():
        assert sum(v.parts.values()) == pytest.approx(v.lost_pts) and f"(efficiency {v.efficiency:.2f})" in v.text


def test_verdicts_without_a_compute_only_run_and_the_settings_that_helped():
    recs, _ = load_records([FIXTURE])
    found = {(v.model, v.precision): v for v in verdicts(aggregate(recs, find_fits([FIXTURE], recs)))}
    v = found[("resnet18", "no")]
    s2 = _summary("tests/fixtures/runs/cpu_study", "resnet18-ws2-no-mb16")
    phases = s2["data_wait_s"] + s2["fwd_bwd_s"] + s2["sync_s"] + s2["optim_s"]  # no train_time_s in this record
    assert v.parts["exposed communication"] == pytest.approx(100 * s2["sync_s"] / phases)
    assert "slower compute at N" in v.parts and "no compute_only run" in v.text
    hook = 100 * (24.6 / (2 * 13.1) - 23.4 / (2 * 13.0))
    assert v.settings_pts == {"bf16_hook": pytest.approx(hook)}
    assert f"In this study bf16_hook recovered {hook:.1f} points at N=2 (efficiency 0.94 against 0.90" in v.text
    assert found[("vgg16", "no")].text == "vgg16: only N=1 measured (N=2 ended oom); no scaling to explain."
    assert found[("nope", "no")].lost_pts is None
    text, _ = _console_text(FIXTURE, 120)
    assert "why each model scales as it does" in text and "bf16_hook recovered" in " ".join(text.split())


def _repeat(runs: Path, name: str, repeat: int, img_per_s: float) -> None:
    """A copy of run ``name`` as repetition ``repeat`` with another throughput."""
    dst = runs / f"{name}-r{repeat}"
    shutil.copytree(runs / name, dst)
    s = read_summary(dst)
    write_summary(dst, Summary.from_dict({**s.to_dict(), "img_per_s": img_per_s}))
    p = read_point(dst)
    write_point(dst, Point.from_dict({**p.to_dict(), "repeat": repeat, "id": dst.name}))


def test_repeated_points_show_the_median_and_the_range_of_their_efficiency(tmp_path):
    # issue 13.1 changed this: one row per point, every figure the median over its repeats with its min..max
    runs = tmp_path / "runs"
    shutil.copytree(REPO / QUICKSTART, runs)
    _repeat(runs, "resnet18-ws2-no-mb16", 1, 40.0)
    _repeat(runs, "resnet18-ws2-no-mb16", 2, 47.0)
    recs, _ = load_records([runs])
    rows = aggregate(recs, find_fits([runs], recs))
    rep = [r for r in rows if r["model"] == "resnet18" and r["world_size"] == 2 and r["settings"] == "default"]
    effs = sorted(ips / (2 * 27.0) for ips in (44.5, 40.0, 47.0))  # N=1 ran once: each repeat against it
    assert len(rep) == 1 and rep[0]["repeats"] == 3 and rep[0]["interval"] == "min-max"
    got = [rep[0][k] for k in ("efficiency", "efficiency_lo", "efficiency_hi")]
    assert got == pytest.approx([effs[1], effs[0], effs[2]])
    assert (rep[0]["img_per_s"], rep[0]["img_per_s_lo"], rep[0]["img_per_s_hi"]) == (44.5, 40.0, 47.0)
    console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    render(rows, console, [])
    text = console.export_text()
    assert re.search(rf"default\s+2\s+32\s+44\.5\s+40\.0\.\.47\.0\s+.*{effs[1]:.2f}\s+{effs[0]:.2f}\.\.{effs[2]:.2f}"
                     rf"\s+3\s", text)
    assert text.count("44.5") == 1  # one line per point


def test_report_files_get_the_users_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path
        assert report.main([QUICKSTART, "--csv", str(out / "r.csv"), "--json", str(out / "r.json"),
                            "--svg", str(out / "r.svg"), "--html", str(out / "r.html")]) == 0
        for name in ("r.csv", "r.json", "r.svg", "r.html"):
            assert (out / name).stat().st_mode & 0o777 == 0o644, name
        os.umask(0o027)
        report.main([QUICKSTART, "--csv", str(out / "g.csv")])
        assert (out / "g.csv").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_the_text_report_imports_neither_torch_nor_matplotlib():
    code = (f"import sys\nfrom cnnscale.report.main import main\nmain([{QUICKSTART!r}, '--predict'])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'accelerate'))\n"
            "assert not heavy, heavy\nprint('light')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("light")


def test_the_report_reads_only_the_dist_section_of_config_yaml_and_reads_it_right(tmp_path):
    for run in sorted((REPO / QUICKSTART).iterdir()):
        if run.is_dir():
            full = load_run(run).config
            assert set(full) > {"dist", "model", "train"}
            assert load_run(run, config_keys=("dist",)).config == {"dist": full["dist"]}
    odd = tmp_path / "odd"  # not a plain block mapping at the top: parsed whole, the same answer
    shutil.copytree(REPO / QUICKSTART / "vgg16-ws2-no-mb16", odd)
    (odd / "config.yaml").write_text("---\n'dist': {comm_hook: bf16}\nmodel: {name: vgg16}\n")
    assert load_run(odd, config_keys=("dist",)).config == {"dist": {"comm_hook": "bf16"}}


def test_bench_report_makes_the_run_directories_and_times_the_report(tmp_path):
    proc = subprocess.run([sys.executable, "launch/bench_report.py", "--runs", "30", "--rounds", "1", "--keep",
                           str(tmp_path / "b")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["runs"] == 30 and out["median_s"] > 0
    recs, warns = load_records([tmp_path / "b"])
    assert len(recs) == 30 and not warns and len({r.summary.model for r in recs}) == 4 + 4 + 2  # 12 + 12 + 6 runs
