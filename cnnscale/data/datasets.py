"""Data: CIFAR-10 (torchvision), any ImageFolder tree, or synthetic images; a DataLoader path and a device path.

Splits: ``train`` minus a held-out validation set of ``val_size`` images (a fixed permutation drawn from the seed, so
every rank and every resume agrees), and the separate ``test`` set.

Loaders:
- ``torch``: a DataLoader with torchvision transforms (RandomCrop(32, padding=4), horizontal flip, normalise). The
  distributed sampler comes from ``accelerator.prepare``.
- ``device``: the whole uint8 set sits on the training device and augmentation is batched tensor ops there, sharded
  per rank (see :mod:`cnnscale.data.device`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from cnnscale.config import DataConfig, TrainConfig
from cnnscale.errors import UserError

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "Splits", "ArraySet", "load_arrays", "build_datasets", "build_loaders",
           "train_transform", "eval_transform", "split_indices", "limit_indices"]

# CIFAR-10 training-set channel statistics (the seed normalises with these).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def train_transform(augment: bool = True) -> Any:
    import torchvision.transforms as T  # lazy: torchvision costs ~3.5 s (it loads torch._dynamo); synthetic skips it

    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*aug, T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def eval_transform() -> Any:
    import torchvision.transforms as T  # lazy, see train_transform

    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


@dataclass
class ArraySet:
    """Images as a uint8 tensor (N, 3, 32, 32) and int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class _TensorImages(Dataset):
    """uint8 NCHW tensors → normalised floats (synthetic data; no augmentation, it is noise)."""

    def __init__(self, arr: ArraySet) -> None:
        self.arr = arr
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.arr.x[i].float() / 255 - self.mean) / self.std, int(self.arr.y[i])


class _EpochSeeded(Dataset):
    """Augmentation seeded by (run seed, epoch, sample index) instead of a process's RNG stream, so a sample gets the
    same crop and flip whatever the worker count, and a resumed run (``skip_first_batches``) repeats the uninterrupted
    one exactly. The epoch sits in shared memory, so persistent DataLoader workers see ``set_epoch`` (Accelerate's
    ``DataLoaderShard.set_epoch`` forwards it here)."""

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.ds, self.seed = ds, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        gen = torch.default_generator  # the CPU generator torchvision's transforms draw from
        saved = gen.get_state()  # restored below: the caller's RNG stream is untouched (num_workers=0)
        gen.manual_seed(hash((self.seed, int(self._epoch), int(i))) & 0x7FFF_FFFF_FFFF_FFFF)  # ~2 us in all;
        try:  # torch.manual_seed would cost ~120 us a sample (it also seeds every accelerator backend)
            return self.ds[i]
        finally:
            gen.set_state(saved)


@dataclass
class Splits:
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation of ``range(n)``: the last ``val_size`` indices are validation."""
    if val_size >= n:
        raise UserError(f"data.val_size={val_size} leaves no training images (the training set has {n})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - val_size]), np.sort(perm[n - val_size:])


def _synthetic(cfg: DataConfig, seed: int, train: bool) -> ArraySet:
    n = cfg.synthetic_size if train else max(cfg.synthetic_size // 5, 1)
    g = torch.Generator().manual_seed(seed * 2 + (0 if train else 1))
    return ArraySet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g))


def _cifar10(cfg: DataConfig, train: bool, transform: Any = None) -> Any:
    import torchvision  # lazy, see train_transform

    try:
        return torchvision.datasets.CIFAR10(cfg.data_dir, train=train, download=cfg.download, transform=transform)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise UserError(f"CIFAR-10 not found in {cfg.data_dir!r} and data.download is false "
                            "(set --data.download true, or use --data imagefolder --data-dir DIR)") from None
        raise
    except OSError as exc:  # URLError is an OSError: no network
        raise UserError(f"could not download CIFAR-10 into {cfg.data_dir!r}: {exc}") from None


def _imagefolder_root(cfg: DataConfig, split: str) -> Path:
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise UserError(f"data directory not found: {root}")
    sub = root / split
    if not sub.is_dir():
        raise UserError(f"ImageFolder data needs {root}/train and {root}/test; missing: {sub}")
    return sub


def _imagefolder(cfg: DataConfig, split: str, transform: Any = None) -> Any:
    import torchvision  # lazy, see train_transform

    root = _imagefolder_root(cfg, split)
    try:
        return torchvision.datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"empty or unreadable ImageFolder {root}: {str(exc).splitlines()[0]}") from None


def _decode_folder(ds: Any) -> ArraySet:
    xs = np.empty((len(ds.samples), 32, 32, 3), dtype=np.uint8)
    for i, (p, _) in enumerate(ds.samples):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32))
            xs[i] = np.asarray(im)
    return ArraySet(torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))


def _cached_decode(cfg: DataConfig, split: str) -> ArraySet:
    """Decode an ImageFolder split to uint8 once; cache it beside the data when the directory is writable."""
    ds = _imagefolder(cfg, split)
    key = hashlib.sha1("\n".join(f"{p}:{t}" for p, t in ds.samples).encode()).hexdigest()[:12]
    cache = Path(cfg.data_dir) / f".cnnscale-{split}-{key}.pt"
    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            return ArraySet(d["x"], d["y"])
        except Exception:  # a torn cache file is rebuilt
            pass
    arr = _decode_folder(ds)
    try:  # a unique temp name per process: several ranks may decode the same folder at once
        fd, tmp = tempfile.mkstemp(prefix=cache.name, suffix=".tmp", dir=cache.parent)
        os.close(fd)
        torch.save({"x": arr.x, "y": arr.y}, tmp)
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
    return arr


def load_arrays(cfg: DataConfig, seed: int, split: str) -> ArraySet:
    """The whole ``split`` ('train' or 'test') as uint8 tensors, for the device-resident loader."""
    if cfg.name == "synthetic":
        return _synthetic(cfg, seed, split == "train")
    if cfg.name == "cifar10":
        ds = _cifar10(cfg, split == "train")
        return ArraySet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return _cached_decode(cfg, split)


def limit_indices(total: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of ``range(total)`` (all when n is 0 or >= total). ImageFolder sorts by class, so
    the first n would all be one class; evenly spaced ones keep the classes balanced."""
    if not n or n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def _limit(ds: Dataset, n: int) -> Dataset:
    return Subset(ds, limit_indices(len(ds), n)) if n else ds


def build_datasets(cfg: DataConfig, seed: int) -> Splits:
    """Train / validation / test datasets for the torch loader."""
    if cfg.name == "synthetic":
        full, test = _TensorImages(_synthetic(cfg, seed, True)), _TensorImages(_synthetic(cfg, seed, False))
        full_eval, classes = full, 10
    elif cfg.name == "cifar10":
        full = _cifar10(cfg, True, train_transform(cfg.augment))
        full_eval, test, classes = _cifar10(cfg, True, eval_transform()), _cifar10(cfg, False, eval_transform()), 10
    else:
        full = _imagefolder(cfg, "train", train_transform(cfg.augment))
        full_eval, test = _imagefolder(cfg, "train", eval_transform()), _imagefolder(cfg, "test", eval_transform())
        classes = len(full.classes)
    if cfg.val_size:
        tr_idx, va_idx = split_indices(len(full), cfg.val_size, seed)
        train, val = Subset(full, tr_idx.tolist()), Subset(full_eval, va_idx.tolist())
    else:
        train, val = full, None
    train = _limit(train, cfg.limit_train)
    if cfg.augment and cfg.name != "synthetic":
        train = _EpochSeeded(train, seed)
    return Splits(train, val, _limit(test, cfg.limit_test), classes)


def build_loaders(cfg: DataConfig, tcfg: TrainConfig, splits: Splits, world_size: int,
                  pin: bool) -> tuple[DataLoader, DataLoader | None, DataLoader]:
    """DataLoaders (not yet prepared). Train drops its last partial batch so every step has the same shape."""
    need = tcfg.micro_batch * world_size
    if len(splits.train) < need:
        raise UserError(f"{len(splits.train)} training images cannot fill one step of micro_batch {tcfg.micro_batch} "
                        f"x world size {world_size} = {need}; use fewer processes or a smaller --micro-batch")
    workers = cfg.num_workers
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=pin and cfg.pin_memory,
                                  persistent_workers=cfg.persistent_workers and workers > 0)
    g = torch.Generator().manual_seed(tcfg.seed)
    train = DataLoader(splits.train, batch_size=tcfg.micro_batch, shuffle=True, drop_last=True, generator=g, **common)
    eval_bs = max(tcfg.micro_batch, 256)
    val = DataLoader(splits.val, batch_size=eval_bs, shuffle=False, **common) if splits.val is not None else None
    test = DataLoader(splits.test, batch_size=eval_bs, shuffle=False, **common)
    return train, val, test
