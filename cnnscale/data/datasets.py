"""Data: CIFAR-10 (torchvision), any ImageFolder tree, or synthetic images; a DataLoader path and a device path.

Splits: ``train`` minus a held-out validation set of ``val_size`` images (a fixed permutation drawn from the seed, so
every rank and every resume agrees), and the separate ``test`` set.

Loaders:
- ``torch``: a DataLoader with torchvision transforms (RandomCrop(32, padding=4), horizontal flip, normalise). The
  distributed sampler comes from ``accelerator.prepare``.
- ``device``: the whole uint8 set sits on the training device and augmentation is batched tensor ops there, sharded
  per rank (see :mod:`cnnscale.data.device`).

ImageFolder files that cannot be decoded name themselves (:mod:`cnnscale.data.images`). The data decides the class
count: :func:`head_classes` checks ``model.num_classes`` against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cnnscale.config import DataConfig, ModelConfig, TrainConfig
from cnnscale.data import cache
from cnnscale.data.fits import check_fits, set_bytes
from cnnscale.data.images import FolderImages, ImageError, image_folder, open_rgb
from cnnscale.errors import UserError

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "Splits", "ArraySet", "load_arrays", "build_datasets", "build_loaders",
           "train_transform", "eval_transform", "split_indices", "limit_indices", "head_classes"]

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
    """Images as a uint8 tensor (N, 3, 32, 32) and int64 labels (N,); ``classes``: the data's class count, ``bad``:
    the files left out as unreadable (``data.skip_bad_images``), ``cache``: where the images came from."""

    x: torch.Tensor
    y: torch.Tensor
    classes: int = 10
    bad: tuple[str, ...] = ()
    cache: str | None = None
    """ImageFolder: the decode cache's status for this split (hit, built, shared, off); None for other data."""

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
    bad: tuple[str, ...] = ()
    """Unreadable files left out (``data.skip_bad_images``), one reason each."""


def head_classes(mcfg: ModelConfig, data: str, found: int) -> int:
    """The model's output count for data with ``found`` classes: the data decides. ``num_classes`` unset follows
    the data; a value given must equal it, or exceed it with ``model.larger_head`` (a head wider than the labels,
    asked for explicitly). Anything else is one line naming both counts."""
    n = mcfg.num_classes
    if n is None or n == found:
        return found
    if n > found and mcfg.larger_head:
        return n
    hint = f"leave model.num_classes unset (it follows the data) or set it to {found}"
    hint += "; a larger head needs model.larger_head true" if n > found else " (labels go up to the data's count)"
    raise UserError(f"model.num_classes is {n} but the {data} data has {found} classes: {hint}")


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation of ``range(n)``: the last ``val_size`` indices are validation."""
    if val_size >= n:
        raise UserError(f"data.val_size={val_size} leaves no training images (the training set has {n})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - val_size]), np.sort(perm[n - val_size:])


def _synthetic(cfg: DataConfig, seed: int, train: bool) -> ArraySet:
    n = cfg.synthetic_size if train else max(cfg.synthetic_size // 5, 1)
    if train:  # uint8 images + int64 labels, train and test
        check_fits(f"data.synthetic_size {cfg.synthetic_size}", set_bytes(n + max(n // 5, 1)))
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


def _imagefolder(cfg: DataConfig, split: str, *, scan: bool) -> FolderImages:
    root = _imagefolder_root(cfg, split)
    if split == "train":
        _imagefolder_root(cfg, "test")  # a missing split is named before the train split is read
    return image_folder(root, skip_bad=cfg.skip_bad_images, scan=scan, train=split == "train")


def _decode_folder(ds: FolderImages, skip_bad: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every image decoded to 32x32 uint8 (N, 3, 32, 32) with its labels; an unreadable one is an error naming it,
    or (``skip_bad``) left out and listed after the files found bad before decoding."""
    xs = np.empty((len(ds.samples), 32, 32, 3), dtype=np.uint8)
    keep, bad = [], list(ds.bad)
    for p, t in ds.samples:
        try:
            im = open_rgb(p)
        except ImageError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
            continue
        xs[len(keep)] = np.asarray(im if im.size == (32, 32) else im.resize((32, 32)))
        keep.append(t)
    return xs[: len(keep)].transpose(0, 3, 1, 2).copy(), np.asarray(keep, dtype=np.int64), tuple(bad)


def _cached_decode(cfg: DataConfig, split: str) -> ArraySet:
    """An ImageFolder split decoded to uint8 once, then read from the decode cache (:mod:`cnnscale.data.cache`:
    keyed by the files, atomic, shared by concurrent runs). Only a whole decode is cached; an entry that lists bad
    files serves only runs that skip them (a strict run stops at the first, naming it)."""
    ds = _imagefolder(cfg, split, scan=False)
    d = cache.cached_decode(Path(cfg.data_dir), split, ds.samples, ds.bad, ds.classes,
                            lambda: _decode_folder(ds, cfg.skip_bad_images))
    if d.bad and not cfg.skip_bad_images:
        raise ImageError(d.bad[0])
    return ArraySet(torch.from_numpy(d.x), torch.from_numpy(d.y), len(ds.classes), d.bad, d.status)


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
    bad: tuple[str, ...] = ()
    if cfg.name == "synthetic":
        full, test = _TensorImages(_synthetic(cfg, seed, True)), _TensorImages(_synthetic(cfg, seed, False))
        full_eval, classes = full, 10
    elif cfg.name == "cifar10":
        full = _cifar10(cfg, True, train_transform(cfg.augment))
        full_eval, test, classes = _cifar10(cfg, True, eval_transform()), _cifar10(cfg, False, eval_transform()), 10
    else:
        folder = _imagefolder(cfg, "train", scan=True)
        full, full_eval = folder.with_transform(train_transform(cfg.augment)), folder.with_transform(eval_transform())
        test = _imagefolder(cfg, "test", scan=True).with_transform(eval_transform())
        classes, bad = len(folder.classes), (*folder.bad, *test.bad)
    if cfg.val_size:
        tr_idx, va_idx = split_indices(len(full), cfg.val_size, seed)
        train, val = Subset(full, tr_idx.tolist()), Subset(full_eval, va_idx.tolist())
    else:
        train, val = full, None
    train = _limit(train, cfg.limit_train)
    if cfg.augment and cfg.name != "synthetic":
        train = _EpochSeeded(train, seed)
    return Splits(train, val, _limit(test, cfg.limit_test), classes, bad)


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
