"""Every figure carries its spread (issue 13.1) and impossible figures are named (13.3): the interval rule, the
suspect rules, and the report's repeats, in process on copies of the quickstart fixture."""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from cnnscale.records import checks
from cnnscale.records.schema import Point, Summary, read_point, read_summary, write_point, write_summary
from cnnscale.records.stats import (
    BOOTSTRAP_FROM,
    EXACT_UP_TO,
    bootstrap_interval,
    interval,
    median,
    pair_ratios,
    ratio_interval,
)
from cnnscale.report import main as report
from cnnscale.report.aggregate import aggregate
from cnnscale.report.html import page
from cnnscale.report.load import find_fits, load_records
from cnnscale.report.tables import render

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "tests" / "fixtures" / "quickstart_study"


def test_the_interval_rule_min_max_below_five_bootstrap_from_five():
    assert interval([]) is None and interval([None, "fast", math.nan, True]) is None
    one = interval([3.0])
    assert (one.median, one.lo, one.hi, one.kind) == (3.0, 3.0, 3.0, "single") and not one.contains(3.0)
    few = interval([4.0, 1.0, 2.0, None])
    assert (few.median, few.lo, few.hi, few.n, few.kind) == (2.0, 1.0, 4.0, 3, "min-max")
    assert interval([1.0, 3.0]).median == 2.0
    values = [10.0, 11.0, 9.0, 10.5, 30.0, 9.5]
    assert BOOTSTRAP_FROM == 5
    boot = interval(values)
    assert boot.kind == "bootstrap95" and boot.n == 6 and boot.median == 10.25
    assert 9.0 <= boot.lo <= boot.median <= boot.hi < 30.0  # the outlier does not drag the median's interval
    assert interval(values) == boot  # fixed seed: the same values give the same interval
    spread = [float(v % 17) + v / 100 for v in range(EXACT_UP_TO + 20)]  # past the exact range: seeded draws
    assert bootstrap_interval(spread, seed=1) != bootstrap_interval(spread, seed=2)  # the seed is what fixes it
    assert bootstrap_interval(spread) == bootstrap_interval(spread)
    assert interval([5.0] * 7).lo == interval([5.0] * 7).hi == 5.0


@pytest.mark.parametrize("values", [[3.0, 1.0, 4.0, 1.5, 9.0], [10.0, 11.0, 9.0, 10.5, 30.0, 10.0]])
def test_the_bootstrap_interval_is_the_exact_one_of_every_resample(values):
    n = len(values)
    medians = sorted(median([values[i] for i in idx]) for idx in itertools.product(range(n), repeat=n))
    lo = medians[math.ceil(0.025 * len(medians)) - 1]  # smallest median whose CDF reaches 2.5%
    hi = medians[math.ceil(0.975 * len(medians)) - 1]
    assert bootstrap_interval(values) == (lo, hi)


def test_ratios_pair_by_index_and_their_interval_is_the_ratios_own():
    assert pair_ratios([10.0, 20.0, 30.0], [5.0, 0.0, 10.0, 99.0]) == [2.0, 3.0]  # zero and extras dropped
    assert pair_ratios([1.0, "x"], [2.0, 4.0], scale=2) == [1.0]
    # drift that moves both sides of each pair alike cancels in the pairs, not in a ratio of medians
    num, den = [10.0, 20.0, 30.0], [5.0, 10.0, 15.0]
    iv = ratio_interval(num, den)
    assert (iv.median, iv.lo, iv.hi) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(("kind", "value", "n", "bad"), [
    ("share", 0.5, None, False), ("share", 1.0, None, False), ("share", 1.2, None, True), ("share", -0.01, None, True),
    ("efficiency", 1.2, 2, True), ("efficiency", 1.15, 2, False), ("efficiency", 1.4, 1, False),
    ("efficiency", -0.1, 2, True), ("mfu", 0.9, None, False), ("mfu", 1.01, None, True), ("time", -1e-3, None, True),
    ("time", 0.0, None, False), ("mfu", math.nan, None, False), ("share", "fast", None, False),
])
def test_the_suspect_rules(kind, value, n, bad):
    why = checks.check(kind, value, n)
    assert (why is not None) == bad, why
    if bad:
        assert isinstance(why, str) and why


def test_an_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="choose from: share, efficiency, mfu, time"):
        checks.check("vibes", 1.0)


def _repeat(runs: Path, name: str, repeat: int, img_per_s: float, step_ms: float | None = None) -> None:
    """Repeat ``repeat`` of the point in ``runs/name`` (repeat 0 is ``name`` itself), with this img/s."""
    dst = runs / (f"{name}-r{repeat}" if repeat else name)
    if repeat:
        shutil.copytree(runs / name, dst)
    s = read_summary(dst)
    write_summary(dst, Summary.from_dict({**s.to_dict(), "img_per_s": img_per_s,
                                          "step_ms_p50": step_ms if step_ms is not None else s.step_ms_p50}))
    if repeat:
        p = read_point(dst)
        write_point(dst, Point.from_dict({**p.to_dict(), "repeat": repeat, "id": dst.name}))


def _study(tmp_path: Path, n1: list[float], n2: list[float]) -> list[dict]:
    runs = tmp_path / "runs"
    shutil.copytree(QUICKSTART, runs)
    for i, ips in enumerate(n1):
        _repeat(runs, "resnet18-ws1-no-mb16", i, ips, 16000 / ips)
    for i, ips in enumerate(n2):
        _repeat(runs, "resnet18-ws2-no-mb16", i, ips, 32000 / ips)
    recs, warns = load_records([runs])
    return aggregate(recs, find_fits([runs], recs), None, warns)


def _point(rows: list[dict], n: int) -> dict:
    return next(r for r in rows if r["model"] == "resnet18" and r["world_size"] == n and r["settings"] == "default")


def test_efficiency_pairs_repeat_i_at_n_with_repeat_i_at_n0(tmp_path):
    n1, n2 = [20.0, 30.0, 25.0], [36.0, 54.0, 47.5]  # the machine drifts: each N=2 repeat tracks its N=1 partner
    rows = _study(tmp_path, n1, n2)
    p1, p2 = _point(rows, 1), _point(rows, 2)
    effs = sorted(b / (2 * a) for a, b in zip(n1, n2))
    assert p2["repeats"] == 3 and p2["interval"] == "min-max"
    assert (p2["efficiency"], p2["efficiency_lo"], p2["efficiency_hi"]) == pytest.approx((effs[1], effs[0], effs[2]))
    assert p2["efficiency_hi"] - p2["efficiency_lo"] < 0.06  # unpaired, 36/60 .. 54/40 would span 0.60..1.35
    assert (p2["img_per_s"], p2["img_per_s_lo"], p2["img_per_s_hi"]) == (47.5, 36.0, 54.0)
    assert (p1["efficiency"], p1["efficiency_lo"], p1["efficiency_hi"]) == (1.0, 1.0, 1.0)
    assert p2["step_ms_lo"] == pytest.approx(32000 / 54.0) and p2["speedup"] == pytest.approx(2 * effs[1])
    assert p2["pred_error_pts_lo"] < p2["pred_error_pts"] < p2["pred_error_pts_hi"]  # per repeat: pred_i - eff_i


def test_five_repeats_give_a_bootstrap_interval_in_every_output(tmp_path, capsys):
    n1 = [27.0, 26.0, 28.0, 27.5, 26.5]
    n2 = [44.5, 40.0, 47.0, 46.0, 43.0]
    rows = _study(tmp_path, n1, n2)
    p2 = _point(rows, 2)
    effs = [b / (2 * a) for a, b in zip(n1, n2)]
    assert p2["interval"] == "bootstrap95" and p2["repeats"] == 5
    assert p2["efficiency_lo"] < p2["efficiency"] < p2["efficiency_hi"]
    assert min(effs) <= p2["efficiency_lo"] and p2["efficiency_hi"] <= max(effs)
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    render(rows, console, [])
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()) and "…" not in text
    assert "95% CI" in text and f"{p2['efficiency_lo']:.2f}..{p2['efficiency_hi']:.2f}" in text
    assert f"efficiency {p2['efficiency']:.2f}, 95% CI {p2['efficiency_lo']:.2f}..{p2['efficiency_hi']:.2f} over 5" \
        in " ".join(text.split())
    out = tmp_path
    assert report.main([str(tmp_path / "runs"), "--json", str(out / "r.json"), "--csv", str(out / "r.csv")]) == 0
    js = _point(json.loads((out / "r.json").read_text()), 2)
    assert js["efficiency_lo"] == pytest.approx(p2["efficiency_lo"]) and js["interval"] == "bootstrap95"
    header = (out / "r.csv").read_text().splitlines()[0].split(",")
    assert {"efficiency_lo", "efficiency_hi", "img_per_s_lo", "step_ms_hi", "comm_share_lo",
            "pred_error_pts_hi", "speedup_lo"} <= set(header)
    recs, _ = load_records([tmp_path / "runs"])
    assert f"<td>{p2['efficiency_lo']:.2f}..{p2['efficiency_hi']:.2f}</td>" in page(rows, recs)  # no plots: no cost


def test_a_prediction_inside_the_measured_interval_is_within_noise(tmp_path):
    rows = _study(tmp_path, [27.0, 27.0, 27.0], [36.0, 44.5, 52.0])
    p2 = _point(rows, 2)
    assert p2["efficiency_lo"] <= p2["pred_efficiency"] <= p2["efficiency_hi"] and p2["within_noise"]
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    render(rows, console, [])
    assert f"{p2['pred_efficiency']:.2f}*~" in console.export_text()
    tight = _point(_study(tmp_path / "b", [27.0, 27.0], [44.5, 44.6]), 2)
    assert not tight["within_noise"]  # 0.82..0.83 measured against 0.81 predicted


def test_runs_without_repeats_report_with_no_interval():
    recs, warns = load_records([QUICKSTART])
    rows = aggregate(recs, find_fits([QUICKSTART], recs), None, warns)
    assert all(r["repeats"] == 1 and r["interval"] is None and r["efficiency_lo"] is None for r in rows)
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    render(rows, console, [])
    text = console.export_text()
    assert ".." not in text.replace("...", "") and "range" not in text and "95% CI" not in text


def test_the_plots_draw_the_repeats_interval_as_error_bars(tmp_path):
    from cnnscale.report import plots  # matplotlib: only this test pays for it

    rows = _study(tmp_path, [20.0, 30.0, 25.0], [36.0, 54.0, 47.5])
    p2 = _point(rows, 2)
    fig = plots.plot_efficiency(rows)
    ax = next(a for a in fig.axes if a.get_title() == "resnet18")
    bars = [c for c in ax.containers if c.has_yerr and c.get_label() == "default"]
    (segments,) = [c.lines[2][0].get_segments() for c in bars]
    at2 = next(s for s in segments if s[0][0] == 2)
    assert sorted(y for _, y in at2) == pytest.approx([p2["efficiency_lo"], p2["efficiency_hi"]])
