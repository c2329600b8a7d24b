"""``data.loader auto``, the default: the device-resident loader when the decoded set fits the memory budget, the torch
DataLoader when it does not, the resumed run's loader on a resume; the choice and its reason printed once and
recorded; evaluation batched on the device path; the GPU defaults (channels_last, cudnn.benchmark) resolved per
device. In process, on a 2-class tree of 12 PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from cnnscale.config import FastConfig, load_config
from cnnscale.data import loaders
from cnnscale.data.device import DeviceEvalLoader, DeviceTrainLoader

CPU = torch.device("cpu")


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNSCALE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 4)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _cfg(tree: Path, *flags: str):
    return load_config(["--model", "lenet5", "--data", "imagefolder", "--data-dir", str(tree), "--micro-batch", "4",
                        "--data.val_size", "8", *flags])


def test_auto_is_the_default_and_picks_device_when_the_set_fits(tree: Path) -> None:
    cfg = _cfg(tree)
    assert cfg.data.loader == "auto"
    choice = loaders.choose_loader(cfg, CPU)
    assert choice.kind == "device"
    assert choice.reason.startswith("auto: device, the decoded set (48 images, 0.1 MiB) fits in 0.5 of ")
    assert choice.reason.endswith(" available RAM (data.device_budget)")


def test_auto_picks_torch_when_the_budget_is_below_the_set(tree: Path) -> None:
    choice = loaders.choose_loader(_cfg(tree, "--data.device_budget", "1e-12"), CPU)
    assert choice.kind == "torch" and "does not fit in 1e-12 of " in choice.reason
    shared = loaders.choose_loader(_cfg(tree, "--data.device_budget", "1e-12"), CPU, local_processes=4)
    assert "x 4 processes" in shared.reason  # CPU ranks of a node each hold a copy in the same RAM


def test_forced_loaders_and_a_resume_keeps_the_recorded_loader(tree: Path, tmp_path: Path) -> None:
    assert loaders.choose_loader(_cfg(tree, "--loader", "torch"), CPU) == loaders.LoaderChoice(
        "torch", "data.loader torch, as asked")
    assert loaders.choose_loader(_cfg(tree, "--loader", "device", "--data.device_budget", "1e-12"), CPU).kind == \
        "device"
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "env.json").write_text(json.dumps({"loader": "torch"}))  # the run that is resumed used torch
    resumed = loaders.choose_loader(_cfg(tree, "--resume", str(prev)), CPU)
    assert resumed == loaders.LoaderChoice("torch", f"auto: torch, as the resumed run {prev} used")


def test_build_auto_device_path_evaluates_batched_and_resumes_bitwise(tree: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    acc = Accelerator(cpu=True)
    parts = loaders.build(_cfg(tree, "--data.augment", "true"), acc)
    train, val, test, classes = parts
    assert isinstance(train, DeviceTrainLoader) and classes == 2
    assert isinstance(val, DeviceEvalLoader) and isinstance(test, DeviceEvalLoader)  # no DataLoader, no workers
    assert (len(val.dataset), len(test.dataset)) == (8, 8)
    assert parts.loader == "device" and parts.env["decode_cache"] == {"train": "built", "test": "built"}
    out = capsys.readouterr().out
    assert out.count("data: device loader (auto: device, the decoded set (48 images") == 1
    assert parts.env["loader_reason"] in out
    train.set_epoch(1)
    full = list(train)
    rest = list(train.skip(3))  # what a resumed run iterates: the same batches and the same augmentation draws
    assert len(rest) == len(full) - 3 == len(train) - 3
    for (x1, y1), (x2, y2) in zip(full[3:], rest):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = loaders.build(_cfg(tree, "--data.augment", "true"), acc)
    assert again.env["decode_cache"] == {"train": "hit", "test": "hit"}
    again[0].set_epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again[0]))  # a second run: the same first epoch


def test_gpu_defaults_resolve_per_device() -> None:
    fast = load_config([]).fast
    assert fast.channels_last is None and fast.cudnn_benchmark is True
    assert fast.resolved(cuda=True).channels_last is True and fast.resolved(cuda=False).channels_last is False
    off = load_config(["--fast.channels_last", "false", "--fast.cudnn_benchmark", "false"]).fast
    assert off.resolved(cuda=True) == FastConfig(channels_last=False, cudnn_benchmark=False)
