"""Images that name themselves: a real truncated JPEG and a real 0-byte PNG in a real ImageFolder tree, on both
loaders (torch DataLoader, with a worker process, and device-resident); the run that meets one mid-training ends
"failed" with the reason; ``data.skip_bad_images`` leaves them out, says how many and records them in env.json;
the decode cache never holds a half-decoded set. Also: the data decides the class count.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import py_run
from PIL import Image
from torch.utils.data import DataLoader

from cnnscale.config import DataConfig, ModelConfig
from cnnscale.data.datasets import _cached_decode, build_datasets, head_classes
from cnnscale.data.images import ImageError, image_folder, open_rgb
from cnnscale.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
ENV.pop("CNNSCALE_DEBUG", None)


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG of noise cut to half its bytes: the header reads, the pixels do not."""
    buf = io.BytesIO()
    _noise(99).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def make_tree(root: Path, *, truncated: bool = False, empty: bool = False) -> Path:
    """train: cat 7 + dog 8 good PNGs, plus the bad ones in train/cat and train/dog; test: 4 + 4."""
    for split, per in (("train", 8), ("test", 4)):
        for k, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            n = per - 1 if (split, cls) == ("train", "cat") else per
            for i in range(n):
                _noise(100 * k + i + (0 if split == "train" else 50)).save(d / f"{i}.png")
    if truncated:
        truncated_jpeg(root / "train" / "cat" / "bad.jpg")
    else:
        _noise(7).save(root / "train" / "cat" / "7.png")
    if empty:
        (root / "train" / "dog" / "empty.png").write_bytes(b"")
    return root


# ---------------------------------------------------------------------------------------------- in process
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path) -> None:
    jpg, png = truncated_jpeg(tmp_path / "t.jpg"), tmp_path / "z.png"
    png.write_bytes(b"")
    with pytest.raises(ImageError, match=rf"^unreadable image {jpg}: image file is truncated .*; fix or remove it"):
        open_rgb(str(jpg))
    with pytest.raises(ImageError, match=rf"^unreadable image {png}: empty file \(0 bytes\); fix or remove it, or "
                                         r"set --data\.skip_bad_images true$"):
        open_rgb(str(png))


def test_a_worker_process_keeps_the_one_line(tmp_path: Path) -> None:
    """torch re-raises a worker's exception as ``type(text with the worker traceback)``: still one line."""
    tree = make_tree(tmp_path / "if", truncated=True)
    ds = image_folder(tree / "train", skip_bad=False, scan=False, train=True).with_transform(lambda im: 0)
    with pytest.raises(ImageError) as exc:
        list(DataLoader(ds, batch_size=4, num_workers=1))
    assert str(exc.value).startswith(f"unreadable image {tree}/train/cat/bad.jpg: image file is truncated")
    assert "\n" not in str(exc.value) and "Caught" not in str(exc.value)


def test_empty_files_are_found_before_training_and_skipping_counts_them(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "if", truncated=True, empty=True)
    with pytest.raises(ImageError, match=r"unreadable image .*/train/dog/empty\.png: empty file \(0 bytes\)"):
        image_folder(tree / "train", skip_bad=False, scan=False, train=True)
    splits = build_datasets(DataConfig(name="imagefolder", data_dir=str(tree), val_size=0, skip_bad_images=True), 0)
    assert len(splits.train) == 15 and len(splits.bad) == 2  # 17 files, 2 unreadable
    assert any("bad.jpg: image file is truncated" in b for b in splits.bad)
    assert any("empty.png: empty file (0 bytes)" in b for b in splits.bad)


def test_the_decode_cache_never_holds_a_half_decoded_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSCALE_CACHE_DIR", str(tmp_path / "cache"))
    tree = make_tree(tmp_path / "if", truncated=True)
    strict = DataConfig(name="imagefolder", data_dir=str(tree), loader="device")
    skipping = DataConfig(name="imagefolder", data_dir=str(tree), loader="device", skip_bad_images=True)
    with pytest.raises(ImageError, match=r"bad\.jpg: image file is truncated"):
        _cached_decode(strict, "train")
    decoded = tmp_path / "cache" / "decoded"
    assert not [p for p in decoded.iterdir() if p.is_dir()], "a failed decode left a cache entry"
    arr = _cached_decode(skipping, "train")
    assert (len(arr), arr.classes, len(arr.bad), arr.cache) == (15, 2, 1, "built")
    caches = [p for p in decoded.glob("if-*-train-*") if p.is_dir()]
    assert len(caches) == 1
    with pytest.raises(ImageError, match=r"bad\.jpg: image file is truncated"):  # the cache serves skipping runs only
        _cached_decode(strict, "train")
    again = _cached_decode(skipping, "train")  # from the cache: same images, same count of bad files
    assert torch.equal(again.x, arr.x) and again.bad == arr.bad and again.cache == "hit"
    meta = caches[0] / "meta.json"
    meta.write_bytes(meta.read_bytes()[:10])  # torn: rebuilt, not trusted
    rebuilt = _cached_decode(skipping, "train")
    assert torch.equal(rebuilt.x, arr.x) and rebuilt.cache == "built"
    _noise(5).save(tree / "train" / "cat" / "bad.jpg", format="JPEG")  # repaired: a new key, decoded afresh
    fixed = _cached_decode(strict, "train")
    assert len(fixed) == 16 and fixed.bad == ()


def test_the_data_decides_the_class_count() -> None:
    with pytest.raises(UserError, match=r"^model\.num_classes is 100 but the cifar10 data has 10 classes: leave "
                                        r"model\.num_classes unset \(it follows the data\) or set it to 10; a larger "
                                        r"head needs model\.larger_head true$"):
        head_classes(ModelConfig(num_classes=100), "cifar10", 10)
    assert head_classes(ModelConfig(num_classes=100, larger_head=True), "cifar10", 10) == 100
    assert head_classes(ModelConfig(), "imagefolder", 5) == 5  # the default follows the data
    with pytest.raises(UserError, match=r"model\.num_classes is 10 but the imagefolder data has 5 classes"):
        head_classes(ModelConfig(num_classes=10), "imagefolder", 5)  # 10 given explicitly is not the default
    assert head_classes(ModelConfig(num_classes=5), "imagefolder", 5) == 5
    with pytest.raises(UserError, match=r"model\.num_classes is 7 but the imagefolder data has 5 classes"):
        head_classes(ModelConfig(num_classes=7), "imagefolder", 5)
    with pytest.raises(UserError, match=r"model\.num_classes is 3 but the imagefolder data has 5 classes.*labels"):
        head_classes(ModelConfig(num_classes=3, larger_head=True), "imagefolder", 5)


def test_a_one_class_folder_says_so_in_terms_of_the_data(tmp_path: Path) -> None:
    d = tmp_path / "one" / "train" / "cat"
    d.mkdir(parents=True)
    _noise(0).save(d / "0.png")
    with pytest.raises(UserError, match=r"^ImageFolder .*/one/train has 1 class folder \(cat\): a classifier needs "
                                        r"at least 2 \(one folder per class\)$"):
        image_folder(tmp_path / "one" / "train", skip_bad=False, scan=False, train=True)


# ---------------------------------------------------------------------------------------------- real runs
def _train(tree: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, TRAIN, "--model", "lenet5", "--data", "imagefolder", "--data-dir", str(tree),
            "--max-steps", "2", "--micro-batch", "8", "--data.val_size", "0", "--train.progress", "none",
            "--profile.enabled", "false", "--out", str(out), *extra]
    env = {**ENV, "CNNSCALE_CACHE_DIR": str(out.parent / "cache")}  # the decode cache of these trees, not the user's
    return py_run(argv, cwd=out.parent, env=env, timeout=300)  # forked from the zygote: no torch import


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    tmp = tmp_path_factory.mktemp("images")
    truncated = make_tree(tmp / "truncated", truncated=True)
    empty = make_tree(tmp / "empty", empty=True)
    both = make_tree(tmp / "both", truncated=True, empty=True)
    cases = {  # name -> (tree, extra flags)
        "torch-truncated": (truncated, ["--loader", "torch", "--data.num_workers", "1"]),
        "device-truncated": (truncated, ["--loader", "device"]),
        "torch-empty": (empty, ["--loader", "torch", "--data.num_workers", "0"]),
        "device-empty": (empty, ["--loader", "device"]),
        "torch-skip": (both, ["--loader", "torch", "--data.num_workers", "0", "--data.skip_bad_images", "true"]),
        "device-skip": (both, ["--loader", "device", "--data.skip_bad_images", "true"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(_train, tree, tmp / f"run-{k}", *extra) for k, (tree, extra) in cases.items()}
    return {k: (f.result(), tmp / f"run-{k}", cases[k][0]) for k, f in futures.items()}


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow  # the module's six real runs take ~1-2 min on 2 cores
def test_torch_loader_names_the_file_and_the_run_ends_failed_with_that_reason(runs) -> None:
    proc, out, tree = runs["torch-truncated"]
    line = _one_line(proc)
    assert line.startswith(f"train.py: error: unreadable image {tree}/train/cat/bad.jpg: image file is truncated")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["error"] == line.removeprefix("train.py: error: ")


@pytest.mark.slow  # the module's six real runs take ~1-2 min on 2 cores
@pytest.mark.parametrize("case", ["device-truncated", "torch-empty", "device-empty"])
def test_found_before_training_names_the_file_and_leaves_no_run_directory(case: str, runs) -> None:
    proc, out, tree = runs[case]
    line = _one_line(proc)
    bad = "train/cat/bad.jpg: image file is truncated" if "truncated" in case else "train/dog/empty.png: empty file"
    assert line.startswith(f"train.py: error: unreadable image {tree}/{bad}"), line
    assert not out.exists()


@pytest.mark.slow  # the module's six real runs take ~1-2 min on 2 cores
@pytest.mark.parametrize("case", ["torch-skip", "device-skip"])
def test_skip_bad_images_trains_reports_and_records_the_count(case: str, runs) -> None:
    proc, out, tree = runs[case]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: skipped 2 unreadable image file(s) (data.skip_bad_images)" in proc.stdout
    env = json.loads((out / "env.json").read_text())
    assert env["bad_images_skipped"] == 2
    assert sorted(Path(b.split(":")[0]).name for b in env["bad_images"]) == ["bad.jpg", "empty.png"]
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"
