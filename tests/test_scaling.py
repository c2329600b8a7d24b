"""The scaling model against hand-computed cases (cnnscale/scaling/model.py)."""

from __future__ import annotations

import math

import pytest

from cnnscale.errors import UserError
from cnnscale.scaling import model as scaling
from cnnscale.scaling.model import Interconnect

MiB = 2**20


def test_ring_allreduce_matches_the_formula():
    ic = Interconnect("x", bandwidth_Bps=1e9, latency_s=1e-5, overlap=0.0)
    # 2(N-1)/N * bytes / bw + 2(N-1) * alpha
    assert scaling.ring_allreduce_s(100e6, 2, ic) == pytest.approx(0.1 + 2e-5)
    assert scaling.ring_allreduce_s(100e6, 4, ic) == pytest.approx(0.15 + 6e-5)
    assert scaling.ring_allreduce_s(100e6, 1024, ic) == pytest.approx(2 * 1023 / 1024 * 0.1 + 2046e-5)
    assert scaling.ring_allreduce_s(100e6, 1, ic) == 0.0


def test_buckets_and_overlap_by_hand():
    assert scaling.bucket_sizes(60 * MiB, 25) == [25 * MiB, 25 * MiB, 10 * MiB]
    assert scaling.bucket_sizes(0, 25) == []
    # bandwidth such that the 2-worker all-reduce of b bytes takes b seconds: 2(1)/2 * b / 1 = b.
    full = Interconnect("x", 1.0, 0.0, overlap=1.0)
    # backward 4 s; bucket 1 (2 B) ready at 2 s, done at 4 s; bucket 2 ready at 4 s, done at 6 s -> 2 s exposed
    assert scaling.exposed_comm_s([2, 2], 2, full, backward_s=4.0) == pytest.approx(2.0)
    assert scaling.exposed_comm_s([2, 2], 2, Interconnect("x", 1.0, 0.0, 0.0), 4.0) == pytest.approx(4.0)
    assert scaling.exposed_comm_s([2, 2], 2, Interconnect("x", 1.0, 0.0, 0.5), 4.0) == pytest.approx(3.0)


def test_efficiency_compute_over_compute_plus_exposed_comm():
    ic = Interconnect("x", 1e9, 0.0, overlap=0.0)
    # 1 s compute, 100 MB in one bucket: 2 workers add 0.1 s -> 1/1.1
    assert scaling.predict_efficiency(1.0, 100e6, 2, ic, bucket_mb=1000) == pytest.approx(1 / 1.1)
    assert scaling.predict_efficiency(1.0, 100e6, 1, ic) == pytest.approx(1.0)
    # relative to 2 workers: eff(4)/eff(2)
    e4 = 1 / (1 + 0.15)
    assert scaling.predict_efficiency(1.0, 100e6, 4, ic, bucket_mb=1000, base_n=2) == pytest.approx(e4 * 1.1)


def test_grad_bytes_and_compression_hooks():
    assert scaling.grad_bytes(1000) == 4000
    assert scaling.grad_bytes(1000, "bf16") == scaling.grad_bytes(1000, "fp16") == 2000


def test_fit_recovers_alpha_and_bandwidth():
    sizes = [1024 * 2**i for i in range(17)]
    times = [2 * 50e-6 + s / 0.7e9 for s in sizes]  # N = 2: 2(N-1) alpha + 2(N-1)/N s / bw
    ic = scaling.fit_alpha_beta(sizes, times, 2)
    assert ic.latency_s == pytest.approx(50e-6, rel=1e-6)
    assert ic.bandwidth_Bps == pytest.approx(0.7e9, rel=1e-6)
    assert ic.overlap == 0.0
    with pytest.raises(ValueError):
        scaling.fit_alpha_beta([1024], [1e-4], 2)


def test_unknown_interconnect_lists_choices():
    with pytest.raises(UserError, match="choose from: .*nvlink"):
        scaling.get_interconnect("carrier-pigeon")
    assert scaling.get_interconnect("ib-hdr").bandwidth_Bps == 23e9


def test_vgg16_scales_worse_than_resnet18_on_the_same_link():
    # Same device speed (compute time proportional to FLOPs per image), same batch, same link.
    ib = scaling.PRESETS["ib-hdr"]
    per_gflop_s, batch = 1 / 400e3, 256  # a GPU at ~400 TFLOP/s sustained
    resnet = scaling.predict_efficiency(1.67 * batch * per_gflop_s, scaling.grad_bytes(11_173_962), 64, ib)
    vgg = scaling.predict_efficiency(0.94 * batch * per_gflop_s, scaling.grad_bytes(14_728_266), 64, ib)
    assert vgg < resnet < 1.0
    assert math.isfinite(vgg)
