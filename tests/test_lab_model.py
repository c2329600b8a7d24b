"""The scaling model's lab terms, their fit on a split, and `cnnscale report --predict` on a lab directory.

Fast and in-process: the lab directory is written with the records API (no training run). Its "measured" step times
come from a known truth (gloo's ring, a per-bucket cost, partial overlap, compute at N from the calibration with a
straggler share, the all-reduce twice as slow as its benchmark) with a fixed +-2% jitter per repeat, so a fit must
recover the truth, the check part must agree, and the base model must miss.
"""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import pytest
from rich.console import Console

from cnnscale.errors import UserError
from cnnscale.records.io import write_json, write_yaml
from cnnscale.records.run import Run
from cnnscale.records.schema import Env, Point, Summary, write_env, write_point, write_summary
from cnnscale.report import main as report
from cnnscale.report.aggregate import aggregate
from cnnscale.report.columns import display_rows
from cnnscale.report.lab import ALL_TERMS, compare, lab_cases, lab_result, parse_split, parse_terms
from cnnscale.report.lab_render import lab_paths, render_lab
from cnnscale.report.load import (
    LAB_WEIGHT_POWER,
    find_fits,
    load_records,
    profile_order,
    profile_preset,
    run_network,
)
from cnnscale.scaling import fit as fitting
from cnnscale.scaling import model as scaling
from cnnscale.scaling import terms as T
from cnnscale.scaling.model import Interconnect

MiB = 2**20
PARAMS = {"lenet5": 61_706, "vgg16": 14_728_266}
LARGEST = {"lenet5": 48_120, "vgg16": 2_359_808}    # the largest layer's parameters, as env.json records them
STEP1 = {"lenet5": 0.011, "vgg16": 0.60}          # seconds per step at N=1
LINKS = {"10gbit": 1.1e9, "1gbit": 110e6, "200mbit": 23e6}  # bytes/s the shaped links "deliver"
ALPHA = 60e-6                                      # seconds per gloo message
# (parameters, MACs) per layer in forward order, as env.json records them (term g): VGG-16's bytes at the end, its
# work at the start
LAYERS = {"lenet5": ((456, 0.09e6), (2416, 0.24e6), (48120, 0.05e6), (10164, 0.01e6), (850, 840.0)),
          "vgg16": ((1792, 1.8e6), (36928, 37.7e6), (73856, 18.9e6), (147584, 37.7e6), (295168, 18.9e6),
                    (590080, 37.7e6), (590080, 37.7e6), (1180160, 18.9e6), (2359808, 37.7e6), (2359808, 37.7e6),
                    (2359808, 9.4e6), (2359808, 9.4e6), (2359808, 9.4e6), (5130, 5120.0))}
TRUTH = T.Terms(algorithm="gloo", first_bucket=True, bucket_cost_s=2e-3, overlap=0.3, straggler=True,
                straggler_frac=0.1, contention=1.0, comm_cpu_s_per_byte=3e-9, layer_timing=True)
JITTER = (1.0, 1.02, 0.98)                         # per repeat, on the step time at N > 1


def _coloc(n: int) -> float:
    """Compute slow-down of n processes on 2 cores (what a compute_only run measures)."""
    return max(1.0, n / 2) * (1 + 0.02 * (n - 1))


def _run(root: Path, pid: str, model: str, n: int, repeat: int, step_s: float, settings: str = "default",
         network: str = "", dist: dict | None = None, exposed_s: float | None = None,
         compute_s: float | None = None) -> None:
    """One run directory; ``exposed_s``: the exposed communication per step DDP's hook timed (10 timed steps);
    ``compute_s``: the forward+backward per step (default: the step less ``exposed_s``)."""
    d = root / (f"{pid}-r{repeat}" if repeat else pid)
    d.mkdir(parents=True)
    rec = {"profile": network, "rate_bps": float(network[:-4]) * (1e9 if "gbit" in network else 1e6),
           "measured": {"bandwidth_Bps": LINKS[network], "rtt_s": 2 * ALPHA}, "namespaces": n} if network else None
    if settings == "compute_only":  # as the lab writes it: in the namespaces, unshaped, no network axis
        rec = {"profile": "unshaped", "rate_bps": None, "measured": None, "namespaces": n}
    write_env(d, Env(model=model, params=PARAMS[model], largest_layer_params=LARGEST[model], world_size=n,
                     device_type="cpu", network=rec, layers=[list(row) for row in LAYERS[model]]))
    hook = {} if exposed_s is None else {"train_time_s": 10 * step_s, "sync_s": 10 * exposed_s,
                                         "fwd_bwd_s": 10 * (step_s - exposed_s), "comm_timed_hook": "allreduce"}
    if compute_s is not None:
        hook.update(train_time_s=10 * step_s, fwd_bwd_s=10 * compute_s)
    write_summary(d, Summary(status="ok", model=model, world_size=n, params=PARAMS[model], micro_batch=16,
                             grad_accum=1, global_batch=16 * n, img_per_s=16 * n / step_s, step_ms_p50=step_s * 1e3,
                             **hook))
    write_point(d, Point(study="lab", id=d.name, point_id=pid, model=model, world_size=n, status="ok",
                         micro_batch=16, settings=settings, repeat=repeat, network=network or None))
    write_yaml(d / "config.yaml", {"dist": dist or {}})


def _fit_file(root: Path, profile: str, n: int, bandwidth: float | None = None) -> None:
    ic = Interconnect("truth", bandwidth or LINKS[profile], ALPHA, 0.0)
    sizes = [1024 * 2**k for k in range(15)]
    write_json(root / f"allreduce-{profile}-ws{n}.json",
               {"backend": "gloo", "world_size": n, "device_type": "cpu", "profile": profile, "sizes_bytes": sizes,
                "times_s": [T.gloo_allreduce_s(s, n, ic) for s in sizes], "link": {"bandwidth_Bps": LINKS[profile]}})


def _truth_step(model: str, n: int, profile: str, dist: dict) -> float:
    nbytes = scaling.grad_bytes(PARAMS[model], dist.get("comm_hook", "none"))
    ic = Interconnect("truth", LINKS[profile], ALPHA, 0.0)
    return T.step_s(STEP1[model], nbytes, n, ic, float(dist.get("bucket_mb", 25)), TRUTH,
                    STEP1[model] * _coloc(n), compression=scaling.grad_bytes(PARAMS[model]) / nbytes,
                    largest_bytes=4 * LARGEST[model], layers=LAYERS[model])


def _truth_exposed(model: str, n: int, profile: str, dist: dict) -> float:
    nbytes = scaling.grad_bytes(PARAMS[model], dist.get("comm_hook", "none"))
    return _truth_step(model, n, profile, dist) - T.compute_at(n, STEP1[model], STEP1[model] * _coloc(n), TRUTH,
                                                               nbytes)


def _truth_fwd_bwd(model: str, n: int, dist: dict) -> float:
    """The forward+backward per step in training: the calibration's, plus term (f)'s CPU work (the straggler's wait
    is spent in the all-reduce, not in the backward)."""
    nbytes = scaling.grad_bytes(PARAMS[model], dist.get("comm_hook", "none"))
    return STEP1[model] * _coloc(n) + TRUTH.comm_cpu_s_per_byte * T.wire_bytes(nbytes, n)


VARIANTS = {("lenet5", "default"): {}, ("vgg16", "default"): {}, ("vgg16", "hook_bf16"): {"comm_hook": "bf16"}}


def _lab(root: Path, skip_fit: tuple = (), hook: bool = False) -> Path:
    """A lab study: N=1 baselines, compute_only at every N, 3 variants x N in {2,3,4} x 3 profiles, 3 repeats, each
    with its forward+backward time; ``hook``: with the exposed communication DDP's hook times."""
    for repeat in range(3):
        for model in PARAMS:
            _run(root, f"{model}-ws1", model, 1, repeat, STEP1[model])
            for n in (2, 3, 4):
                _run(root, f"{model}-ws{n}-compute_only", model, n, repeat, STEP1[model] * _coloc(n),
                     "compute_only", dist={"compute_only": True}, exposed_s=0.0 if hook else None,
                     compute_s=STEP1[model] * _coloc(n))
        for (model, settings), dist in VARIANTS.items():
            for n in (2, 3, 4):
                for prof in LINKS:
                    _run(root, f"{model}-{settings}-ws{n}-{prof}", model, n, repeat,
                         _truth_step(model, n, prof, dist) * JITTER[repeat], settings, prof, dist,
                         _truth_exposed(model, n, prof, dist) * JITTER[repeat] if hook else None,
                         _truth_fwd_bwd(model, n, dist) * JITTER[repeat])
    for n in (2, 3, 4):
        for prof in LINKS:
            if (prof, n) not in skip_fit:
                _fit_file(root, prof, n)
    return root


def _load(root: Path):
    runs, warns = load_records([root])
    fits = find_fits([root], runs)
    return runs, aggregate(runs, fits, None, warns), fits


# ---- the terms, by hand ------------------------------------------------------------------------------------------

def test_base_terms_are_todays_model():
    ic = Interconnect("x", 1e8, 50e-6, 0.0)
    for n in (2, 3, 4, 64):
        for nbytes in (1e5, 44e6, 58.9e6):
            assert T.efficiency(0.5, nbytes, n, ic) == pytest.approx(scaling.predict_efficiency(0.5, nbytes, n, ic),
                                                                     rel=1e-12)
    assert T.BASE.label() == "none" and ALL_TERMS.label() == "a+b+c+d+e+f+g"


def test_gloo_ring_counts_its_segments_and_hides_the_reduction():
    assert T.gloo_segments(25 * MiB, 2) == (13, 25 * MiB / 26)       # 26 segments of <= 1 MiB, 13 per rank
    assert T.gloo_segments(1000, 4) == (2, 125.0)                     # small: two segments per rank
    ic = Interconnect("x", bandwidth_Bps=1e6, latency_s=1e-4)
    # N=2, 1000 B: 4 messages of 250 B; each rank sends 2(N-1)/N of the bytes; the reduction (2 GB/s) hides.
    assert T.gloo_allreduce_s(1000, 2, ic) == pytest.approx(4e-4 + 1000 / 1e6)
    assert scaling.ring_allreduce_s(1000, 2, ic) == pytest.approx(2e-4 + 1000 / 1e6)
    fast = Interconnect("x", bandwidth_Bps=1e12, latency_s=0.0)      # a link faster than the CPU sums: it shows
    assert T.gloo_allreduce_s(1000, 2, fast, reduce_Bps=1e9) == pytest.approx(500 / 1e12 + 500 / 1e9)
    sizes = [1024 * 2**k for k in range(16)]
    truth = Interconnect("t", 3e7, 40e-6)
    got = T.fit_gloo(sizes, [T.gloo_allreduce_s(s, 3, truth) for s in sizes], 3)
    assert got.latency_s == pytest.approx(40e-6, rel=1e-6) and got.bandwidth_Bps == pytest.approx(3e7, rel=1e-6)


# gloo all-reduce at N=2 over a veth shaped to 200mbit (tbf) on this machine, ms per size (the lab's benchmark)
SHAPED_200MBIT_MS = [3.08, 3.56, 2.8, 0.57, 0.5, 0.44, 4.26, 4.29, 10.34, 21.37, 41.92, 87.43, 172.03, 348.73, 701.94]


def test_the_lab_fit_leans_to_large_messages_when_small_ones_are_erratic():
    sizes = [1024 * 2**k for k in range(15)]                         # 1 KiB .. 16 MiB
    times = [t / 1e3 for t in SHAPED_200MBIT_MS]
    relative = scaling.fit_alpha_beta(sizes, times, 2)
    lab = scaling.fit_alpha_beta(sizes, times, 2, weight_power=LAB_WEIGHT_POWER)
    for size, t in zip(sizes[10:], times[10:]):                      # 1 MiB up, where the gradients' buckets are
        assert scaling.ring_allreduce_s(size, 2, lab) == pytest.approx(t, rel=0.05)
    assert scaling.ring_allreduce_s(sizes[-1], 2, relative) < 0.8 * times[-1]  # following the small ones: -30%
    gloo = T.fit_gloo(sizes, times, 2, weight_power=LAB_WEIGHT_POWER)
    assert T.gloo_allreduce_s(sizes[-1], 2, gloo) == pytest.approx(times[-1], rel=0.05)


def test_ddp_first_bucket_and_the_per_bucket_cost():
    assert T.ddp_buckets(60 * MiB, 25, first_bucket=True) == [MiB, 25 * MiB, 25 * MiB, 9 * MiB]
    assert T.ddp_buckets(60 * MiB, 25) == scaling.bucket_sizes(60 * MiB, 25)
    assert T.ddp_buckets(0.5 * MiB, 25, first_bucket=True) == [0.5 * MiB]
    # the first bucket holds at least the last (largest) layer: vgg16's 3 buckets, as DDP's hook counts them
    vgg = T.ddp_buckets(4 * 14_728_266, 25, True, largest_bytes=4 * 2_359_808)
    assert len(vgg) == 3 and vgg[0] == 4 * 2_359_808 and vgg[1] == 25 * MiB
    # a bf16 hook: buckets cut by fp32 bytes, half of each on the wire
    ic2 = Interconnect("x", 1e6, 0.0, 0.0)
    half = T.step_s(1.0, 30 * MiB, 2, ic2, terms=T.Terms(first_bucket=True), compression=2.0)
    assert half == pytest.approx(1.0 + 30 * MiB / 1e6)  # no overlap on CPU: the total, however it is cut
    ic = Interconnect("x", 1e9, 0.0, 0.0)
    plain = T.exposed_s([MiB, 2 * MiB], 2, ic, 1.0)
    assert T.exposed_s([MiB, 2 * MiB], 2, ic, 1.0, T.Terms(bucket_cost_s=0.01)) == pytest.approx(plain + 0.02)


def test_overlap_and_straggler_terms():
    ic = Interconnect("x", 1.0, 0.0, 0.0)                            # 2 B take 2 s at N=2
    assert T.exposed_s([2, 2], 2, ic, 4.0) == pytest.approx(4.0)      # CPU: nothing hides
    assert T.exposed_s([2, 2], 2, ic, 4.0, T.Terms(overlap=1.0)) == pytest.approx(2.0)
    assert T.exposed_s([2, 2], 2, ic, 4.0, T.Terms(overlap=0.5)) == pytest.approx(3.0)
    none = Interconnect("x", 1e30, 0.0, 0.0)
    assert T.efficiency(1.0, 1.0, 4, none, computeN_s=2.0) == pytest.approx(1.0)  # term d off: calibration unused
    d = T.Terms(straggler=True, straggler_frac=0.2)
    assert T.efficiency(1.0, 1.0, 4, none, terms=d, computeN_s=2.0) == pytest.approx(1 / (2.0 * (1 + 0.2 * 3 / 4)))
    assert T.without(TRUTH, "d").straggler is False and T.without(TRUTH, "a").algorithm == "ring"
    e = T.Terms(contention=1.5)                                      # the all-reduce 2.5x slower in training
    ic1 = Interconnect("x", 1e6, 0.0, 0.0)
    assert T.allreduce_s(1000, 2, ic1, e) == pytest.approx(2.5 * scaling.ring_allreduce_s(1000, 2, ic1))
    assert T.step_s(1.0, 1000, 2, ic1, terms=e) == pytest.approx(1.0 + 2.5e-3)
    case = fitting.Case("c", 2, "p", 1000, 25.0, 1.0, 2.0, {"ring": ic1})
    assert fitting.predict_exposed_s(case, e) == pytest.approx(2.5e-3)  # compute at N (d off): 1 s
    assert fitting.free_values(ALL_TERMS) == ["overlap", "bucket_cost_s", "straggler_frac", "contention",
                                              "comm_cpu_s_per_byte"]
    f = T.Terms(comm_cpu_s_per_byte=2e-9)                            # 2 ns per byte a rank sends
    assert T.compute_at(4, 1.0, 2.0, f, 1e8) == pytest.approx(1.0 + 2e-9 * 1.5e8)  # d off: compute at N = at 1
    assert T.compute_at(1, 1.0, 2.0, f, 1e8) == 1.0 and T.wire_bytes(1e8, 1) == 0.0
    assert T.step_s(1.0, 1000, 2, ic1, terms=f) == pytest.approx(1.0 + 2e-9 * 1000 + 1e-3)
    assert T.without(TRUTH, "f").comm_cpu_s_per_byte is None
    growth = [fitting.Case("c", n, "p", b, 25.0, 1.0, 2.0, {"ring": ic1}, measured_compute_s=2.0 + 3e-9 * w,
                           calib_compute_s=2.0) for n, b in ((2, 1e7), (4, 4e7)) for w in [T.wire_bytes(b, n)]]
    assert fitting.fit_comm_cpu(growth) == pytest.approx(3e-9)
    assert fitting.fit_comm_cpu([_case(2, 1e7, 2.0)]) is None       # no forward+backward times: nothing to fit to
    with pytest.raises(ValueError, match="choose from: a, b, c, d, e, f, g"):
        T.without(TRUTH, "z")


def _case(n: int, nbytes: float, computeN: float | None, bw: float = 1e8, profile: str = "p") -> fitting.Case:
    ic = Interconnect("x", bw, 50e-6, 0.0)
    return fitting.Case("c", n, profile, nbytes, 25.0, 1.0, computeN, {"ring": ic, "gloo": ic})


def test_the_scheduler_rule():
    assert fitting.scheduler_ruled(_case(4, 1e5, 2.0))                # 4 on 2 cores, tiny gradient
    assert not fitting.scheduler_ruled(_case(4, 60e6, 2.0, bw=2e7))   # the link rules a big gradient on a slow link
    assert not fitting.scheduler_ruled(_case(2, 1e5, 1.05))           # little co-location loss
    assert not fitting.scheduler_ruled(_case(4, 1e5, None))           # no calibration: cannot tell


def test_split_and_error_figures():
    split = fitting.Split("n", (2, 4))
    assert split.fits(_case(2, 1, None)) and not split.fits(_case(3, 1, None))
    assert split.describe() == "fit on N in {2, 4}, checked on the others"
    assert fitting.Split("profile", ("1gbit",)).fits(_case(3, 1, None, profile="1gbit"))
    assert fitting.error_figures([1.0, -3.0, 2.0]) == {"n": 3, "median": 2.0, "worst": 3.0}
    assert fitting.error_figures([]) == {"n": 0, "median": None, "worst": None}
    assert parse_split("n=2,4") == split and parse_split("profile=1gbit,200mbit").values == ("1gbit", "200mbit")
    for bad in ("x=1", "n=", "n=two"):
        with pytest.raises(UserError, match="--fit-on"):
            parse_split(bad)
    assert parse_terms("none") == T.BASE and parse_terms("abcdefg") == ALL_TERMS
    assert parse_terms("ad").label() == "a+d"
    with pytest.raises(UserError, match="choose from: a gloo ring"):
        parse_terms("axe")


def test_profiles_network_of_a_run_and_presets():
    assert profile_order(["200mbit", "2gbit", "500mbit", "unshaped", "odd"]) == [
        "unshaped", "2gbit", "500mbit", "200mbit", "odd"]
    lab_env = Env(network={"profile": "1gbit", "rate_bps": 1e9, "measured": None})
    assert run_network(Run(path="x", env=lab_env, summary=None, point=None)) == "1gbit"   # no study point: env's
    calib = Point(study="s", id="c", model="m", world_size=2, status="ok", network=None)
    assert run_network(Run(path="x", env=lab_env, summary=None, point=calib)) == ""      # the study's view wins
    assert run_network(Run(path="x", env=Env(), summary=None, point=None)) == ""
    ic = profile_preset(Run(path="x", env=lab_env, summary=None, point=None), "1gbit")
    assert ic.name == "1gbit:preset" and ic.bandwidth_Bps == pytest.approx(0.9e9 / 8) and ic.overlap == 0.0
    assert profile_preset(Run(path="x", env=Env(), summary=None, point=None), "unshaped").name == "unshaped:preset"


# ---- the lab directory through the report --------------------------------------------------------------------------

def test_rows_group_by_profile_and_pair_with_the_shared_baseline(tmp_path):
    runs, rows, fits = _load(_lab(tmp_path))
    lab = [r for r in rows if r["network"]]
    assert len(lab) == 27 and {r["network"] for r in lab} == set(LINKS)
    assert all(r["repeats"] == 3 and r["interval"] == "min-max" for r in lab)
    r = next(x for x in lab if x["model"] == "vgg16" and x["settings"] == "default" and x["world_size"] == 3
             and x["network"] == "200mbit")
    step = _truth_step("vgg16", 3, "200mbit", {})
    assert r["efficiency"] == pytest.approx(STEP1["vgg16"] / step)    # median repeat: jitter 1.0
    assert r["efficiency_lo"] == pytest.approx(STEP1["vgg16"] / (step * 1.02))
    assert r["interconnect"] == "200mbit:fitted"
    hook = next(x for x in lab if x["settings"] == "hook_bf16" and x["world_size"] == 2)  # no N=1 of its own
    assert hook["efficiency"] is not None and hook["efficiency"] < 1
    assert all(not r["network"] for r in rows if "compute_only" in r["settings"])  # env says unshaped: no axis
    labels = [label for label, _ in display_rows(rows)]
    assert "  default @1gbit" in labels and "  default" in labels


def test_lab_efficiency_pairs_repeat_i_with_repeat_i_of_the_unprofiled_baseline(tmp_path):
    drift = (1.0, 1.3, 0.8)  # the machine drifting between rounds: it moves both sides of each pair alike
    for r, d in enumerate(drift):
        _run(tmp_path, "lenet5-ws1", "lenet5", 1, r, 0.010 * d)
        _run(tmp_path, "lenet5-ws2-1gbit", "lenet5", 2, r, 0.020 * d, network="1gbit")
        _run(tmp_path, "lenet5-ws2-200mbit", "lenet5", 2, r, 0.040 * d, network="200mbit")
    _, rows, _ = _load(tmp_path)
    eff = {r["network"]: r for r in rows if r["world_size"] == 2}
    assert eff["1gbit"]["efficiency"] == pytest.approx(0.5) and eff["200mbit"]["efficiency"] == pytest.approx(0.25)
    assert eff["1gbit"]["efficiency_lo"] == pytest.approx(eff["1gbit"]["efficiency_hi"])  # the pairs cancel it
    assert eff["1gbit"]["interconnect"] == "1gbit:preset"  # no all-reduce fit in this directory
    runs, rows, fits = _load(tmp_path)
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    render_lab(lab_result(runs, rows, fits), console)
    text = " ".join(console.export_text().split())
    assert "5 values fitted on 2 link-ruled points, too few to determine them" in text
    assert "checked no points" in text


def test_the_split_and_the_terms_are_chosen_on_the_command_line(tmp_path, capsys):
    for r in range(3):
        _run(tmp_path, "lenet5-ws1", "lenet5", 1, r, 0.010)
        for prof, step in (("1gbit", 0.020), ("200mbit", 0.040)):
            _run(tmp_path, f"lenet5-ws2-{prof}", "lenet5", 2, r, step * (1 + 0.01 * r), network=prof)
    assert report.main([str(tmp_path), "--predict", "--width", "80", "--fit-on", "profile=1gbit", "--terms", "ad"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "split: fit on profile in {1gbit}, checked on the others (1 fitted, 1 checked" in text
    assert "terms: (a) gloo's segmented ring" in text and "(c) overlap" not in text and "(d) straggler" in text
    assert "without (a) gloo ring" in text and "without (b)" not in text


def test_fitted_terms_recover_the_truth_and_the_check_part_agrees(tmp_path):
    runs, rows, fits = _load(_lab(tmp_path))
    res = lab_result(runs, rows, fits)
    assert len(res.points) == 27 and {p["ic_source"] for p in res.points} == {"fitted"}
    assert res.fit_target == "efficiency"  # no hook timing in these records: every value fitted to the efficiency
    assert {p["part"] for p in res.points if p["world_size"] == 3} == {"check"}
    t = res.terms  # the truth: the median repeat has no jitter
    assert (t.overlap, t.bucket_cost_s, t.straggler_frac, t.contention, t.comm_cpu_s_per_byte) == pytest.approx(
        (0.3, 2e-3, 0.1, 1.0, 3e-9), rel=0.02)
    assert res.figures["check"]["n"] == 9 and res.figures["check"]["worst"] < 0.1
    assert res.figures["all"]["median"] < 0.1
    base = next(fg for name, _, fg in res.ablation if name.startswith("base"))
    assert base["all"]["worst"] > 10 * res.figures["all"]["worst"]
    without = {name[9:10]: fg for name, _, fg in res.ablation if name.startswith("without")}
    assert set(without) == {"a", "b", "c", "d", "e", "f", "g"}
    assert all(fg["check"]["worst"] > res.figures["check"]["worst"] for fg in without.values())
    assert all(p["within_noise"] for p in res.points if p["ruled_by"] == "link")
    # the cross-checks: fit on two profiles, check on the third (the slowest, then the fastest)
    assert [(o.kind, o.values) for o, _, _ in res.cross] == [("profile", ("10gbit", "1gbit")),
                                                             ("profile", ("1gbit", "200mbit"))]
    assert all(fg["n"] == 9 and fg["worst"] < 0.1 for _, _, fg in res.cross)


def test_with_the_hooks_timing_the_communication_terms_are_fitted_to_it(tmp_path):
    runs, rows, fits = _load(_lab(tmp_path, hook=True))
    entries = lab_cases(runs, rows, fits)
    assert all(c.measured_exposed_s == pytest.approx(_truth_exposed(r["model"], c.n, c.profile,
                                                                    VARIANTS[r["model"], r["settings"]]))
               for r, c, _ in entries)
    assert all(c.layers == tuple((float(p), float(m)) for p, m in LAYERS[row["model"]]) for row, c, _ in entries)
    res = compare(entries)
    assert res.fit_target == "hook"
    t = res.terms
    assert t.comm_cpu_s_per_byte == pytest.approx(3e-9, rel=1e-3)  # (f) from the forward+backward's growth
    assert (t.overlap, t.bucket_cost_s, t.contention, t.straggler_frac) == pytest.approx((0.3, 2e-3, 1.0, 0.1),
                                                                                          rel=0.05)
    assert all(p["pred_exposed_ms"] == pytest.approx(p["exposed_ms"], rel=0.01) for p in res.points)
    assert res.figures["check"]["worst"] < 0.1


def test_scheduler_ruled_points_are_shown_counted_and_apart(tmp_path):
    runs, rows, fits = _load(_lab(tmp_path))
    res = lab_result(runs, rows, fits)
    ruled = [p for p in res.points if p["ruled_by"] == "scheduler"]
    # 3 and 4 processes on 2 cores, on the fast link: the co-location loss rules, not the communication
    assert {(p["model"], p["world_size"]) for p in ruled if p["settings"] == "default"} == {
        ("lenet5", 3), ("lenet5", 4), ("vgg16", 3), ("vgg16", 4)}
    assert {p["network"] for p in ruled} == {"10gbit"}
    assert res.figures["scheduler"]["n"] == len(ruled)
    assert res.figures["all"]["n"] == len(res.points) == res.figures["link"]["n"] + len(ruled)


def test_each_point_stands_on_the_fit_of_its_own_profile_and_n_else_the_preset(tmp_path):
    root = _lab(tmp_path, skip_fit=(("1gbit", 3),))
    _fit_file(root, "1gbit", 4, bandwidth=55e6)  # a slower fit at N=4 only
    runs, rows, fits = _load(root)
    entries = lab_cases(runs, rows, fits)
    src = {(c.profile, c.n): s for _, c, s in entries}
    assert src[("1gbit", 3)] == "preset" and src[("1gbit", 2)] == "fitted"
    gloo = {(c.profile, c.n): c.ics["gloo"].bandwidth_Bps for _, c, _ in entries}
    assert gloo[("1gbit", 4)] == pytest.approx(55e6) and gloo[("1gbit", 2)] == pytest.approx(110e6)
    assert gloo[("200mbit", 4)] == pytest.approx(23e6)
    hook = next(c for r, c, _ in entries if r["settings"] == "hook_bf16")
    assert hook.compression == 2.0 and hook.nbytes == 2 * PARAMS["vgg16"] and hook.largest_bytes == 4 * LARGEST["vgg16"]
    named = {r["interconnect"] for r in rows if r["network"] == "1gbit"}
    assert named == {"1gbit:fitted", "1gbit:preset"}
    preset = next(c for _, c, s in entries if s == "preset")
    assert preset.ics["ring"].name == "1gbit:preset" and preset.ics["ring"].bandwidth_Bps == LINKS["1gbit"]
    res = compare(entries, ALL_TERMS, fitting.Split("profile", ("200mbit",)))
    assert {p["part"] for p in res.points if p["network"] == "1gbit"} == {"check"}


def test_the_lab_table_fits_80_columns(tmp_path):
    runs, rows, fits = _load(_lab(tmp_path))
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    render_lab(lab_result(runs, rows, fits), console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Not shown" not in text
    assert "vgg16" in text and "200mbit" in text and "within noise" in text and "checked 9 points" in text
    assert "lab: all-reduce fits per profile and N" in text and "without (a) gloo ring" in text


def test_report_predict_writes_the_lab_table_exports_and_plot(tmp_path, capsys):
    root = _lab(tmp_path / "lab")
    out = tmp_path / "out"
    rc = report.main([str(root), "--predict", "--width", "80", "--csv", str(out / "r.csv"), "--json",
                      str(out / "r.json"), "--plots", str(out / "plots")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lab: predicted vs measured efficiency" in text
    lab_rows = list(csv.DictReader(open(lab_paths(out / "r.csv"))))
    assert len(lab_rows) == 27 and {r["ic_source"] for r in lab_rows} == {"fitted"}
    doc = json.loads(lab_paths(out / "r.json").read_text())
    assert doc["split"] == {"kind": "n", "fit_on": [2, 4]} and doc["figures"]["all"]["n"] == 27
    png = (out / "plots" / "lab_efficiency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 640)
    assert len(png) > 20_000
    with pytest.raises(UserError, match="--terms"):
        report.main([str(root), "--predict", "--terms", "q"])
