"""The device-resident loader: same augmentation distribution as the torchvision path, exact resume, disjoint shards,
and evaluation that gathers exactly N examples across 2 real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnscale.data.datasets import CIFAR_MEAN, CIFAR_STD, ArraySet, train_transform
from cnnscale.data.device import DeviceEvalLoader, DeviceTrainLoader

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo Normalize and ToTensor: normalised float NCHW → uint8 values."""
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _coded_image() -> torch.Tensor:
    """R = 1 + 7*row, G = 1 + 7*col, B = 255: every pixel says where it came from, and padding (0) is distinct."""
    r = torch.arange(32).view(32, 1).expand(32, 32) * 7 + 1
    g = torch.arange(32).view(1, 32).expand(32, 32) * 7 + 1
    return torch.stack([r, g, torch.full((32, 32), 255)]).to(torch.uint8)


def _decode(batch_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flipped) of each augmented coded image, offsets in 0..8 as RandomCrop draws them."""
    r, g = batch_u8[:, 0].long(), batch_u8[:, 1].long()
    flipped = g[:, 16, 10] > g[:, 16, 20]
    dy = (r[:, 16, 16] - 1) // 7 - 16 + 4
    centre_col = torch.where(flipped, torch.full_like(dy, 15), torch.full_like(dy, 16))
    dx = (g[:, 16, 16] - 1) // 7 - centre_col + 4
    return dy.numpy(), dx.numpy(), flipped.numpy()


def _torchvision_aug(images: torch.Tensor, repeats: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    tf = train_transform(True)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    return torch.stack([tf(p) for _ in range(repeats) for p in pil])


def _device_aug(images: torch.Tensor, repeats: int, seed: int = 0) -> torch.Tensor:
    data = ArraySet(images.repeat(repeats, 1, 1, 1), torch.zeros(len(images) * repeats, dtype=torch.long))
    loader = DeviceTrainLoader(data, batch_size=len(data), seed=seed, augment=True)
    return next(iter(loader))[0]


def test_crop_offsets_and_flips_match_torchvision() -> None:
    n = 3000
    coded = _coded_image().unsqueeze(0)
    tv, dev = _decode(_to_uint8(_torchvision_aug(coded, n))), _decode(_to_uint8(_device_aug(coded, n)))
    for name, a, b in zip(("dy", "dx"), tv[:2], dev[:2]):
        assert a.min() >= 0 and a.max() <= 8 and b.min() >= 0 and b.max() <= 8, name
        ha, hb = np.bincount(a, minlength=9) / n, np.bincount(b, minlength=9) / n
        # 9 uniform offsets: each frequency 1/9 (sd ~0.0057 at n=3000); both paths within 5 sd of it and of each other
        assert np.abs(ha - 1 / 9).max() < 0.03 and np.abs(hb - 1 / 9).max() < 0.03, (name, ha, hb)
        assert 0.5 * np.abs(ha - hb).sum() < 0.06, (name, ha, hb)
    assert abs(tv[2].mean() - 0.5) < 0.04 and abs(dev[2].mean() - 0.5) < 0.04
    # crop offsets and flip are independent draws in both paths
    assert abs(dev[2][dev[1] < 4].mean() - dev[2][dev[1] > 4].mean()) < 0.06


def test_pixel_statistics_match_torchvision_including_zero_padding() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(40, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zeros: padding stands out
    tv, dev = _torchvision_aug(images, 400), _device_aug(images, 400)
    assert tv.shape == dev.shape == (3200, 3, 32, 32)
    zero = torch.tensor([-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]).view(1, 3, 1, 1)
    frac_pad_tv = torch.isclose(tv, zero.expand_as(tv), atol=1e-4).all(1).float().mean()
    frac_pad_dev = torch.isclose(dev, zero.expand_as(dev), atol=1e-4).all(1).float().mean()
    # expected padded fraction: E[|shift|] = 20/9 per axis → 1 - (1 - 20/(9*32))^2 ≈ 0.134
    assert abs(frac_pad_tv - 0.134) < 0.01 and abs(frac_pad_dev - 0.134) < 0.01
    mean_tv, mean_dev = tv.mean(0), dev.mean(0)
    assert (mean_tv - mean_dev).abs().mean() < 0.05
    assert (mean_tv[:, :4] - mean_dev[:, :4]).abs().mean() < 0.08  # the border band, where the padding shows
    assert abs(tv.std() - dev.std()) < 0.02


def _toy(n: int) -> ArraySet:
    g = torch.Generator().manual_seed(0)
    return ArraySet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def test_train_shards_are_disjoint_and_epochs_reshuffle() -> None:
    data = _toy(203)
    ranks = [DeviceTrainLoader(data, 16, rank=r, world=2, seed=3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 203 // 32
    a, b = ranks[0].indices(0).flatten(), ranks[1].indices(0).flatten()
    assert len(a) == len(b) == 6 * 16 and not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(ranks[0].indices(0), ranks[0].indices(1))
    labels = torch.cat([y for _, y in ranks[0]])
    assert torch.equal(labels, data.y[a])


def test_skip_resumes_the_same_batches_and_augmentation() -> None:
    loader = DeviceTrainLoader(_toy(200), 20, seed=5, augment=True)
    loader.set_epoch(2)
    full = list(loader)
    rest = list(loader.skip(4))
    assert len(loader.skip(4)) == len(rest) == len(full) - 4
    for (x1, y1), (x2, y2) in zip(full[4:], rest):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], full[0][0])


def test_eval_one_process_gathers_every_example_once() -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    data = _toy(1000)
    loader = DeviceEvalLoader(data, 256)
    got = torch.cat([acc.gather_for_metrics(y) for _, y in loader])
    assert torch.equal(got, data.y)


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from cnnscale.config import load_config
    from cnnscale.data.datasets import load_arrays, split_indices
    from cnnscale.data.device import build_device_loaders

    acc = Accelerator(cpu=True)
    cfg = load_config(["--data", "synthetic", "--loader", "device", "--micro-batch", "16",
                       "--data.synthetic_size", "1000", "--data.val_size", "601"])
    train, val, test, classes = build_device_loaders(cfg, acc)
    out = {"world": acc.num_processes, "classes": classes, "train_len": len(train)}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        out[f"idx{epoch}"] = gather_object([train.indices().flatten().tolist()])
        out[f"batches{epoch}"] = sum(1 for _ in train)
    for name, dl in (("val", val), ("test", test)):
        ys, sums = [], []
        for x, y in dl:
            x, y = acc.gather_for_metrics((x, y))
            ys.append(y)
            sums.append(x.flatten(1).sum(1))
        out[name + "_labels"] = torch.cat(ys).tolist()
        out[name + "_sums"] = torch.cat(sums).tolist()
    full = load_arrays(cfg.data, 0, "train")
    va = torch.from_numpy(split_indices(len(full), 601, 0)[1])
    out["val_expected"] = full.y[va].tolist()
    out["test_n"] = len(load_arrays(cfg.data, 0, "test"))
    if acc.is_main_process:
        json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.timeout(240)
def test_two_ranks_shard_disjointly_and_eval_gathers_exactly_n(tmp_path: Path) -> None:
    script, result = tmp_path / "shard.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", "30131", str(script), str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["world"] == 2 and out["classes"] == 10
    assert out["train_len"] == 399 // 32
    for epoch in (0, 1):
        r0, r1 = out[f"idx{epoch}"]
        assert len(r0) == len(r1) == out["train_len"] * 16 and not set(r0) & set(r1)
        assert out[f"batches{epoch}"] == out["train_len"]
    assert out["idx0"] != out["idx1"]
    assert len(out["val_labels"]) == 601 and out["val_labels"] == out["val_expected"]
    assert len(out["test_labels"]) == out["test_n"] == 200
    assert len(set(out["val_sums"])) > 590  # distinct images, not padding repeats
