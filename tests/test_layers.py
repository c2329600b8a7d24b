"""Term (g) of the scaling model: the zoo's layer tables (:mod:`cnnscale.profile.layers`,
:func:`cnnscale.train.build.zoo_layers`), the buckets cut from them
against DDP's own bucket assignment, when each is ready, and what that changes in a predicted step. In process,
on the meta device (no training run)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cnnscale.models import create_model, list_models
from cnnscale.profile.layers import layer_table
from cnnscale.scaling import terms as T
from cnnscale.scaling.model import Interconnect
from cnnscale.train.build import zoo_layers

MiB = 2**20


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_has_a_layer_table_of_all_its_parameters(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNSCALE_CACHE_DIR", str(tmp_path))
    rows = zoo_layers.__wrapped__(name)
    model = create_model(name)
    assert sum(p for p, _ in rows) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(p > 0 and c > 0 for p, c in rows)
    assert zoo_layers.__wrapped__(name) == rows  # read back from the cache: the same table
    assert list((tmp_path / "counts").glob(f"{name}-layers-*.json"))


def test_costs_are_macs_of_convolutions_and_linear_layers_in_execution_order():
    rows = layer_table(create_model("lenet5"))
    # conv 3->6 5x5 on 28x28 outputs, conv 6->16 5x5 on 10x10, then 400->120, 120->84, 84->10
    assert rows == [(456, 28 * 28 * 6 * 3 * 25), (2416, 10 * 10 * 16 * 6 * 25), (48120, 120 * 400),
                    (10164, 84 * 120), (850, 10 * 84)]
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise: one input channel per output
    assert layer_table(torch.nn.Sequential(dw, torch.nn.BatchNorm2d(8)), (2, 8, 4, 4)) == [
        (72, 16 * 8 * 1 * 9), (16, 16 * 8)]


@pytest.mark.parametrize("name, bucket_mb", [("resnet18", 25), ("vgg16", 25), ("mobilenet_v2", 25),
                                             ("resnet18", 5), ("vgg16", 100)])
def test_the_buckets_are_ddps_own(name, bucket_mb):
    rows = zoo_layers(name)
    model = create_model(name)
    params = [p for p in model.parameters() if p.requires_grad][::-1]
    got = dist._compute_bucket_assignment_by_size(params, [MiB, bucket_mb * MiB], [False] * len(params))
    ddp = [sum(4 * params[i].numel() for i in bucket) for bucket in got[0]]
    ours = T.layer_buckets(rows, bucket_mb, first_bucket=True)
    assert [b for b, _ in ours] == pytest.approx(ddp, rel=1e-3)  # a bias may fall in the next bucket: at most 1e-3
    ready = [r for _, r in ours]
    assert ready == sorted(ready) and ready[-1] == 1.0 and all(0 < r <= 1 for r in ready)


def test_resnet18s_bytes_are_ready_early_in_the_backward():
    cut = T.layer_buckets(zoo_layers("resnet18"), 25, first_bucket=True)
    total = sum(b for b, _ in cut)
    # layer4 is 75% of the bytes and ~24% of the MACs: the first two buckets (80% of the bytes) are ready by ~31%
    assert len(cut) == 3 and sum(b for b, _ in cut[:2]) / total == pytest.approx(0.80, abs=0.01)
    assert cut[0][1] < 0.1 and cut[1][1] == pytest.approx(0.31, abs=0.02)


def test_layer_timing_in_a_step_by_hand():
    # two layers in forward order: 4 MB that costs 3, then 4 MB that costs 1; the backward reaches the second first
    layers = ((1e6, 3.0), (1e6, 1.0))
    assert T.layer_buckets(layers, 25, first_bucket=True) == [(4e6, 0.25), (4e6, 1.0)]
    assert T.layer_buckets(layers, 25, first_bucket=True, total_bytes=16e6) == [(8e6, 0.25), (8e6, 1.0)]
    assert T.layer_buckets(layers, 25) == [(8e6, 1.0)]  # no 1 MiB first bucket: one 25 MiB bucket, ready at the end
    ic = Interconnect("x", 4e6, 0.0, 0.0)  # each 4 MB bucket takes 1 s at N=2
    g = T.Terms(first_bucket=True, overlap=1.0, layer_timing=True)
    # compute 1.5 s, backward 1.0 s: bucket 1 ready at 0.25 s, done 1.25; bucket 2 ready at 1.0, done 2.25
    assert T.step_s(1.5, 8e6, 2, ic, terms=g, largest_bytes=4e6, layers=layers) == pytest.approx(1.5 + 1.25)
    # without (g) a bucket is ready at its bytes' share: 0.5 s, done 1.5; then 2.5: exposed 1.5
    plain = T.Terms(first_bucket=True, overlap=1.0)
    assert T.step_s(1.5, 8e6, 2, ic, terms=plain, largest_bytes=4e6, layers=layers) == pytest.approx(1.5 + 1.5)
    assert T.step_s(1.5, 8e6, 2, ic, terms=g, largest_bytes=4e6) == pytest.approx(1.5 + 1.5)  # no table: as without
    assert T.without(g, "g").layer_timing is False and g.label() == "b+c+g"
