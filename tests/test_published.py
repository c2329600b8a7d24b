"""The published-table comparison (cnnscale/scaling/published.py): each row's arithmetic from its stated inputs, the
links from their stated rates, the rendering in 80 columns, docs/published.md up to date, and the command."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from cnnscale.errors import UserError
from cnnscale.scaling import published as pub
from cnnscale.scaling.model import PRESETS, Interconnect, predict_efficiency

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _row(key: str) -> pub.Row:
    return next(r for r in pub.ROWS if r.key == key)


def test_stated_speedups_agree_with_the_stated_throughputs():
    stated = [r for r in pub.ROWS if r.stated_speedup is not None]
    assert len(stated) == 12
    for r in stated:
        ratio = r.img_s_n / r.img_s_1
        assert abs(r.stated_speedup - ratio) / ratio < 0.005, r.key  # the tables round to 0.01x


def test_each_rows_arithmetic_from_its_stated_inputs():
    comps = {c.row.key: c for c in pub.compare()}
    assert set(comps) == {r.key for r in pub.ROWS}
    # by hand: DGX A100 TF32 in TensorFlow, 256 images at 909 img/s; ResNet-50's 25,557,032 fp32 gradients
    t1 = comps["T1"]
    assert t1.compute_s == pytest.approx(256 / 909)
    assert t1.nbytes == 25_557_032 * 4
    assert t1.published == pytest.approx(7.70 / 8)
    # the PyTorch DGX-1 FP32 row runs 112 images per GPU (configs.yml), at 367 img/s on one V100
    assert comps["P3"].compute_s == pytest.approx(112 / 367)
    # TensorFlow's table states no speed-up: 1081 img/s on 8 P100s against 154 on one
    g1 = comps["G1"]
    assert g1.published == pytest.approx(1081 / (8 * 154))
    assert g1.nbytes == 138_357_544 * 4
    for c in comps.values():
        assert c.error_pts == pytest.approx(100 * (c.predicted - c.published))
        assert 0 < c.published <= 1 and 0 < c.predicted <= 1


def test_each_prediction_lies_between_no_overlap_and_perfect_scaling():
    """Bounded by the ring formula written out here: every 25 MiB bucket fully exposed, and nothing exposed."""
    for c in pub.compare():
        r, link = c.row, pub.LINKS[c.row.link]
        bw, alpha = 0.8 * link.per_direction_Bps, PRESETS[link.latency_from].latency_s
        n_buckets = math.ceil(c.nbytes / (25 * MiB))
        ring = 2 * (r.n - 1) / r.n * c.nbytes / bw + n_buckets * 2 * (r.n - 1) * alpha
        worst = c.compute_s / (c.compute_s + ring)
        assert worst - 1e-12 <= c.predicted <= 1.0, r.key


def test_links_are_built_from_their_stated_rates_and_every_reference_resolves():
    for link in pub.LINKS.values():
        ic = link.interconnect()
        assert ic.bandwidth_Bps == pytest.approx(pub.ACHIEVABLE * link.per_direction_Bps)
        assert ic.latency_s == PRESETS[link.latency_from].latency_s and ic.overlap == 1.0
        assert link.source in pub.SOURCES
        assert link.interconnect(0.25).bandwidth_Bps == pytest.approx(ic.bandwidth_Bps / 4)
    assert pub.LINKS["a100-nvsw"].interconnect().bandwidth_Bps == pytest.approx(240e9)  # 0.8 x 600/2 GB/s
    assert pub.LINKS["25gbe"].interconnect().bandwidth_Bps == pytest.approx(2.5e9)  # 0.8 x 25 Gbit/s
    for r in pub.ROWS:
        assert r.source in pub.SOURCES and r.params_from in pub.SOURCES and r.link in pub.LINKS, r.key
        assert r.design in ("ring", "ps-cpu") and r.n > 1 and r.nodes >= 1


def test_summary_gives_median_and_worst_over_all_rows_and_ring_rows():
    ring, ps = _row("T1"), _row("G3")
    comps = [pub.Comparison(ring, 1.0, 1.0, 0.95, 0.90), pub.Comparison(ring, 1.0, 1.0, 0.80, 0.90),
             pub.Comparison(ps, 1.0, 1.0, 0.99, 0.69)]
    s = pub.summary(comps)
    assert s["all_n"] == 3 and s["all_median"] == pytest.approx(10.0) and s["all_worst"] == pytest.approx(30.0)
    assert s["ring_n"] == 2 and s["ring_median"] == pytest.approx(7.5) and s["ring_worst"] == pytest.approx(10.0)


def test_sensitivity_grows_as_the_links_slow_down():
    assert pub.sensitivity(pub.ROWS, 1.0) == 0.0
    quarter, half = pub.sensitivity(pub.ROWS, 0.25), pub.sensitivity(pub.ROWS, 0.5)
    assert quarter >= half > 0


def test_compute_for_efficiency_inverts_the_model():
    ic = Interconnect("x", 2.5e9, 30e-6, 1.0)
    for target in (0.5, 0.68, 0.9):
        t = pub.compute_for_efficiency(target, 553e6, 512, ic)
        assert predict_efficiency(t, 553e6, 512, ic) == pytest.approx(target, abs=1e-6)
    with pytest.raises(UserError, match="target efficiency"):
        pub.compute_for_efficiency(1.0, 553e6, 512, ic)
    rows = pub.horovod_break_even()
    assert [m for m, _, _ in rows] == ["Inception V3", "ResNet-101", "VGG-16"]
    assert all(ips > 0 for _, _, ips in rows)


def test_the_markdown_fits_80_columns_and_cites_every_source():
    text = pub.render_markdown()
    long = [line for line in text.splitlines() if len(line) > 80 and "<http" not in line]
    assert long == []
    table = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 10]
    assert [line.split("|")[1].strip() for line in table[1:1 + len(pub.ROWS)]] == [r.key for r in pub.ROWS]
    for src in pub.SOURCES.values():
        assert f"[{src.key}]" in text and src.url in text


def test_docs_page_carries_the_current_generated_block():
    doc = (ROOT / "docs" / "published.md").read_text()
    block = doc.split(pub.BEGIN, 1)[1].split(pub.END, 1)[0]
    assert block.strip() == pub.render_markdown().strip(), (
        "docs/published.md is stale: run python -m cnnscale.scaling.published --update docs/published.md")


def test_command_prints_the_table_without_torch_and_updates_a_page(tmp_path):
    code = "import sys; from cnnscale.scaling import published as p; rc = p.main(sys.argv[1:]); " \
           "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == pub.render_markdown()
    page = tmp_path / "page.md"
    page.write_text(f"# title\n\nprose\n\n{pub.BEGIN}\nold\n{pub.END}\n\nmore prose\n")
    proc = subprocess.run([sys.executable, "-c", code, "--update", str(page)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert text.startswith("# title\n\nprose\n\n") and text.endswith(f"{pub.END}\n\nmore prose\n")
    assert "old" not in text and pub.render_markdown() in text
    page.write_text("no markers here\n")
    proc = subprocess.run([sys.executable, "-c", code, "--update", str(page)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "no <!-- published:begin -->" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
