"""Device-resident data path (``--loader device``), the idea behind airbench.

The whole uint8 data set sits on the training device; each batch is an index gather followed by batched random crop
(zero padding 4, offsets 0..8 in each axis, as torchvision's ``RandomCrop(32, padding=4)``), horizontal flip with
probability 0.5 and normalisation, all tensor ops on the device. It works the same on CPU and GPU.

Sharding and determinism:
- Train: one permutation per epoch, drawn from ``(seed, epoch)`` and identical on every rank; global batch ``i`` is
  ``perm[i*B*W : (i+1)*B*W]`` and rank ``r`` takes its ``r``-th chunk of ``B``. The last partial global batch is
  dropped (as the torch path's ``drop_last``). Augmentation draws come from ``(seed, epoch, batch, rank)``, so
  :meth:`DeviceTrainLoader.skip` resumes mid-epoch exactly.
- Eval: global batch ``i`` is examples ``[i*B*W, (i+1)*B*W)`` in order, chunked by rank; the short last batches are
  padded to ``B`` so every rank gathers the same shape. The loaders register with Accelerate's ``GradientState``
  like a prepared DataLoader, with ``remainder = N % (B*W)``, so ``accelerator.gather_for_metrics`` drops the padding
  and yields exactly N examples, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState

from cnnscale.data.datasets import (
    CIFAR_MEAN,
    CIFAR_STD,
    ArraySet,
    head_classes,
    limit_indices,
    load_arrays,
    split_indices,
)
from cnnscale.errors import UserError

__all__ = ["DeviceTrainLoader", "DeviceEvalLoader", "build_device_loaders", "augment_batch", "normalise", "PAD"]

PAD = 4  # RandomCrop(32, padding=4)


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1))


def normalise(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 NCHW → float, as ToTensor (÷255) then Normalize(CIFAR_MEAN, CIFAR_STD)."""
    mean, std = stats if stats is not None else _stats(x.device)
    return (x.float().div_(255) - mean).div_(std)


def augment_batch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image of uint8 ``x`` (N, C, H, W) at offsets (dy, dx) of its zero-padded copy, then flip where asked.

    Offsets index the padded image, so 0..2*PAD; ``PAD`` is the centre (no shift).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))  # zeros, as RandomCrop(padding=4) pads the PIL image with black
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    out = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
                 rows, cols]
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _draws(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (uniform 0..2*PAD) and flips (p = 0.5) for one batch, drawn on the device from ``seed`` (no
    host-to-device copy, so no sync; the draws differ between CPU and GPU but are fixed for each)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g, device=device)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g, device=device)
    return dy, dx, torch.rand(n, generator=g, device=device) < 0.5


class _Registered(DataLoaderStateMixin):
    """Registers with Accelerate's GradientState while iterated, as a prepared DataLoader does, so that
    ``accumulate`` syncs on the last batch and ``gather_for_metrics`` drops eval padding."""

    def __init__(self, data: ArraySet, batch_size: int, world: int, drop_last: bool) -> None:
        self.dataset = data  # begin() reads len(self.dataset) for the remainder
        self.batch_size = batch_size
        self.total_batch_size = batch_size * world
        self._drop_last = drop_last
        self.gradient_state = GradientState()
        self.stats = _stats(data.x.device)


class DeviceTrainLoader(_Registered):
    """Shuffled, augmented, sharded training batches ``(images float, labels int64)`` on ``device``."""

    def __init__(self, data: ArraySet, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 augment: bool = True, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        super().__init__(ArraySet(data.x.to(self.device), data.y.to(self.device)), batch_size, world, drop_last=True)
        self.rank, self.world, self.seed, self.augment = rank, world, seed, augment
        self.epoch = 0
        self.bad: tuple[str, ...] = ()  # unreadable files the data left out (data.skip_bad_images)
        self.cache: dict[str, str] | None = None  # ImageFolder: the decode cache's status per split (env.json)
        if len(self) == 0:
            raise UserError(f"{len(data)} training images cannot fill one step of micro_batch {batch_size} x world "
                            f"size {world} = {batch_size * world}; use fewer processes or a smaller --micro-batch")

    def __len__(self) -> int:
        return len(self.dataset) // self.total_batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's example indices for the epoch, shape (batches, batch_size), on the host."""
        epoch = self.epoch if epoch is None else epoch
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))
        used = perm[: len(self) * self.total_batch_size].view(len(self), self.world, self.batch_size)
        return used[:, self.rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._iterate(0)

    def skip(self, n: int) -> _Skipped:
        """The current epoch from batch ``n`` on (resume), what ``accelerate.skip_first_batches`` does for a
        DataLoader. Same batches and same augmentation draws as an uninterrupted epoch."""
        return _Skipped(self, n)

    def _iterate(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices().to(self.device, non_blocking=True)
        last = len(self) - 1
        self.begin()
        try:
            for i in range(start, len(self)):
                b = idx[i]
                x, y = self.dataset.x[b], self.dataset.y[b]
                if self.augment:
                    x = augment_batch(x, *_draws(len(b), _seed(self.seed, self.epoch, i, self.rank), self.device))
                self.end_of_dataloader = i == last
                yield normalise(x, self.stats), y
        finally:
            self.end()


class _Skipped:
    def __init__(self, loader: DeviceTrainLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return max(len(self.loader) - self.n, 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.loader._iterate(self.n)


class DeviceEvalLoader(_Registered):
    """In-order, unaugmented, sharded evaluation batches; pads the last ones for ``gather_for_metrics`` to drop."""

    def __init__(self, data: ArraySet, batch_size: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        super().__init__(ArraySet(data.x.to(self.device), data.y.to(self.device)), batch_size, world, drop_last=False)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.total_batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = len(self.dataset), self.batch_size
        self.begin()
        try:
            for i in range(len(self)):
                lo = i * self.total_batch_size + self.rank * bs
                idx = torch.arange(lo, lo + bs, device=self.device)
                if self.world > 1:
                    idx = idx.clamp_(max=n - 1)  # padding repeats the last example; gather_for_metrics drops it
                else:
                    idx = idx[idx < n]
                self.end_of_dataloader = i == len(self) - 1
                yield normalise(self.dataset.x[idx], self.stats), self.dataset.y[idx]
        finally:
            self.end()


def _take(arr: ArraySet, idx: np.ndarray) -> ArraySet:
    t = torch.from_numpy(idx)
    return ArraySet(arr.x[t], arr.y[t])


def _head(arr: ArraySet, n: int) -> ArraySet:
    if not n:
        return arr
    idx = torch.tensor(limit_indices(len(arr), n))  # the same images as the torch loader's limit
    return ArraySet(arr.x[idx], arr.y[idx])


def build_device_loaders(cfg: Any, accelerator: Any) -> tuple[DeviceTrainLoader, DeviceEvalLoader | None,
                                                               DeviceEvalLoader, int]:
    """(train, val, test, num_classes) for ``--loader device``: same splits, limits and augmentation as the torch
    path (synthetic data is not augmented there either). ``num_classes``: the model's head for this data
    (:func:`~cnnscale.data.datasets.head_classes`). Files left out as unreadable: ``train.bad``; the decode cache's
    status (ImageFolder): ``train.cache``."""
    d, t = cfg.data, cfg.train
    full, test_all = load_arrays(d, t.seed, "train"), load_arrays(d, t.seed, "test")
    test = _head(test_all, d.limit_test)
    if d.val_size:
        tr_idx, va_idx = split_indices(len(full), d.val_size, t.seed)
        train, val = _take(full, tr_idx), _take(full, va_idx)
    else:
        train, val = full, None
    train = _head(train, d.limit_train)
    num_classes = head_classes(cfg.model, d.name, full.classes)  # the data decides (an error names both)
    rank, world, dev = accelerator.process_index, accelerator.num_processes, accelerator.device
    eval_bs = max(t.micro_batch, 256)
    augment = d.augment and d.name != "synthetic"
    train_loader = DeviceTrainLoader(train, t.micro_batch, rank, world, t.seed, augment, dev)
    train_loader.bad = (*full.bad, *test_all.bad)
    if full.cache is not None:
        train_loader.cache = {"train": full.cache, "test": str(test_all.cache)}
    return (train_loader, DeviceEvalLoader(val, eval_bs, rank, world, dev) if val is not None else None,
            DeviceEvalLoader(test, eval_bs, rank, world, dev), num_classes)
