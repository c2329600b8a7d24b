"""Sizes checked against the machine, and the data decides the class count, as real CLI calls in process
(``cnnscale.cli.main``): each bad case is exit 2, one line on stderr naming what it needs against what there is (or
both class counts), no traceback, and no run directory left behind."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from cnnscale.cli import main
from cnnscale.data.fits import model_bytes

TINY = ["--max-steps", "1", "--data.val_size", "0", "--train.progress", "none", "--profile.enabled", "false"]


def _folder(root: Path, classes: int) -> Path:
    rng = np.random.default_rng(classes)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "0.png")
    return root


def _refused(argv: list[str], out: Path, capsys: pytest.CaptureFixture) -> str:
    rc = main(["train", *argv, *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists(), "a refused run left its directory"
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--model", "mobilenet_v2", "--model.width_mult", "16", "--micro-batch", "4096", "--data", "synthetic"],
     r"model mobilenet_v2 at width_mult 16 with micro_batch 4096 \(weights, gradients and optimiser state [\d.]+ "
     r"[MG]iB, activations [\d.]+ GiB\) needs [\d.]+ GiB of memory"),
    (["--model", "resnet18", "--micro-batch", "65536", "--data", "synthetic"],
     r"model resnet18 with micro_batch 65536 \(.*\) needs [\d.]+ GiB of memory"),
    (["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "100000000"],
     r"data\.synthetic_size 100000000 needs [\d.]+ GiB of memory"),
])
def test_what_the_machine_cannot_hold_is_refused_before_allocating(argv: list[str], needle: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    rss = psutil.Process().memory_info().rss
    line = _refused(argv, tmp_path / "run", capsys)
    assert line.startswith("cnnscale: error: ")
    assert re.search(needle + r", but [\d.]+ [MG]iB is available on this machine$", line), line
    assert psutil.Process().memory_info().rss - rss < 2**30  # refused before allocating


def test_the_estimate_grows_with_width_and_micro_batch() -> None:
    state1, acts1 = model_bytes("mobilenet_v2", None, 1.0, 64)
    state2, acts2 = model_bytes("mobilenet_v2", None, 2.0, 64)
    assert state2 > 3 * state1 and acts2 > 1.9 * acts1  # weights ~ width^2, activations ~ width


def test_the_data_decides_the_class_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    five = _folder(tmp_path / "five", 5)
    common = ["--model", "lenet5", "--data", "imagefolder", "--data-dir", str(five), "--micro-batch", "2"]
    line = _refused([*common, "--model.num_classes", "10"], tmp_path / "r10", capsys)  # explicit 10 is not 5
    assert line == ("cnnscale: error: model.num_classes is 10 but the imagefolder data has 5 classes: leave "
                    "model.num_classes unset (it follows the data) or set it to 5; a larger head needs "
                    "model.larger_head true")
    line = _refused([*common, "--model.num_classes", "3"], tmp_path / "r3", capsys)
    assert "model.num_classes is 3 but the imagefolder data has 5 classes" in line
    one = tmp_path / "one"
    (one / "train" / "only").mkdir(parents=True)
    (one / "test" / "only").mkdir(parents=True)
    for split in ("train", "test"):
        Image.new("RGB", (32, 32)).save(one / split / "only" / "0.png")
    line = _refused(["--model", "lenet5", "--data", "imagefolder", "--data-dir", str(one), "--model.num_classes",
                     "10"], tmp_path / "r1", capsys)
    assert line == (f"cnnscale: error: ImageFolder {one}/train has 1 class folder (only): a classifier needs at "
                    "least 2 (one folder per class)")
