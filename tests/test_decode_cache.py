"""Decode once: the decoded uint8 set is cached under CNNSCALE_CACHE_DIR, reused, rebuilt after a file changes, shared
by concurrent builders (one decodes, the other waits and reads), and simply not cached where the directory cannot be
written. All in process, on a 2-class tree of 12 PNGs."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnscale.config import DataConfig
from cnnscale.data import cache
from cnnscale.data.datasets import _cached_decode


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    root = tmp_path / "tree"
    for split, n in (("train", 4), ("test", 2)):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _image(10 * k + i + 100 * (split == "test")).save(root / split / cls / f"{i}.png")
    return root


def _entries(split: str) -> list[Path]:
    return sorted(p for p in cache.cache_dir().iterdir() if p.is_dir() and p.name.split("-")[-2] == split)


def test_built_once_reused_and_rebuilt_after_a_file_changes(tree: Path) -> None:
    cfg = DataConfig(name="imagefolder", data_dir=str(tree))
    first = _cached_decode(cfg, "train")
    assert first.cache == "built" and (len(first), first.classes) == (8, 2)
    expected = np.asarray(_image(0)).transpose(2, 0, 1).copy()  # train/cat/0.png, the first file
    assert torch.equal(first.x[0], torch.from_numpy(expected)) and first.y.tolist() == [0] * 4 + [1] * 4
    (entry,) = _entries("train")
    assert {p.name for p in entry.iterdir()} == {"x.npy", "y.npy", "meta.json"}
    again = _cached_decode(cfg, "train")
    assert again.cache == "hit" and torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    _image(999).save(tree / "train" / "cat" / "0.png")  # a changed file: a new key, decoded afresh
    changed = _cached_decode(cfg, "train")
    assert changed.cache == "built"
    assert torch.equal(changed.x[0], torch.from_numpy(np.asarray(_image(999)).transpose(2, 0, 1).copy()))
    assert torch.equal(changed.x[1:], first.x[1:])
    (new_entry,) = _entries("train")  # the old key's entry is gone
    assert new_entry != entry
    (new_entry / "x.npy").write_bytes(b"torn")  # an entry that does not read is rebuilt, not trusted
    assert _cached_decode(cfg, "train").cache == "built"
    assert _cached_decode(cfg, "train").cache == "hit"


def _slow_builder(root: str, split: str, samples: list, log: str, out: mp.Queue) -> None:
    def decode() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        with open(log, "a") as f:
            f.write("decode\n")
        time.sleep(1.0)  # long enough for the other builder to arrive while this one holds the lock
        x = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p, _ in samples])
        return x, np.asarray([t for _, t in samples], dtype=np.int64), ()

    d = cache.cached_decode(Path(root), split, samples, (), ["cat", "dog"], decode)
    out.put((d.status, d.x.tobytes(), d.y.tolist()))


def test_two_concurrent_builders_both_end_with_a_valid_cache(tree: Path, tmp_path: Path) -> None:
    samples = [(str(p), int(p.parent.name == "dog")) for p in sorted((tree / "train").rglob("*.png"))]
    ctx, log = mp.get_context("fork"), tmp_path / "decodes.log"
    out = ctx.Queue()
    procs = [ctx.Process(target=_slow_builder, args=(str(tree), "train", samples, str(log), out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    statuses = sorted(r[0] for r in results)
    assert statuses in (["built", "shared"], ["built", "hit"]), statuses
    assert log.read_text() == "decode\n"  # decoded once: the second builder waited for the first's entry
    assert results[0][1:] == results[1][1:]
    hit = cache.cached_decode(tree, "train", samples, (), ["cat", "dog"], lambda: pytest.fail("decoded again"))
    assert hit.status == "hit" and hit.x.tobytes() == results[0][1]
    assert not [p for p in cache.cache_dir().iterdir() if ".tmp-" in p.name]  # no builder left a temp dir


def test_an_unwritable_cache_directory_decodes_without_caching(tree: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "a-file" / "cache"))  # mkdir fails: NotADirectoryError
    arr = _cached_decode(DataConfig(name="imagefolder", data_dir=str(tree)), "test")
    assert arr.cache == "off" and len(arr) == 4


def test_entries_of_data_sets_that_are_gone_are_swept(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "test").mkdir(parents=True)
    shutil.copytree(tree / "test", other / "test", dirs_exist_ok=True)
    assert _cached_decode(DataConfig(name="imagefolder", data_dir=str(other)), "test").cache == "built"
    shutil.rmtree(other)  # a temporary tree, deleted
    assert _cached_decode(DataConfig(name="imagefolder", data_dir=str(tree)), "test").cache == "built"
    names = [p.name for p in cache.cache_dir().iterdir()]
    assert not [n for n in names if n.startswith("other-")], names
    assert len(_entries("test")) == 1
