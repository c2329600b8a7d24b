"""ImageFolder trees whose bad files name themselves: discovery, decoding, and skipping what cannot be read.

- A file that does not decode (truncated, 0 bytes, not an image) is one line naming the file, on both loaders:
  :class:`ImageError`, a :class:`~cnnscale.errors.UserError` that keeps its one line even when a DataLoader worker
  raised it (torch re-raises a worker's exception as ``type(text with the worker's traceback)``).
- ``data.skip_bad_images``: bad files are left out instead, and counted (:attr:`FolderImages.bad`). The torch
  loader then decodes every image once before training (cost: one extra pass over the files); the device loader
  finds them in its own decoding pass, which it makes anyway.
- Empty files are found before training on both loaders (one ``stat`` per file).
- The class count is the data's: fewer than two class folders is an error in terms of the folders.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from cnnscale.errors import UserError

__all__ = ["ImageError", "FolderImages", "open_rgb", "scan_folder", "image_folder", "read_ok", "bad_summary",
           "MAX_LISTED", "EXTENSIONS"]

MAX_LISTED = 20  # bad files listed in env.json
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's IMG_EXTENSIONS
_HINT = "fix or remove it, or set --data.skip_bad_images true"


class ImageError(UserError):
    """An image file that cannot be decoded; its one line names the file. Rebuilt from a DataLoader worker's text,
    it keeps only the original line."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:  # torch's ExceptionWrapper.reraise
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def _reason(exc: BaseException, path: str) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "empty file (0 bytes)" if _size(path) == 0 else "not an image file PIL can identify"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully to an RGB image; any failure is an :class:`ImageError` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")  # convert() loads every byte: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image {path}: {_reason(exc, path)}; {_HINT}") from None


def read_ok(path: str) -> str | None:
    """None when ``path`` decodes, else the one-line reason."""
    try:
        open_rgb(path)
    except ImageError as exc:
        return str(exc)
    return None


class FolderImages(Dataset):
    """An ImageFolder split: ``samples`` [(path, class index)], ``classes`` (folder names), ``bad`` (the skipped
    files' one-line reasons), and ``transform`` applied to the decoded RGB image."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str], bad: list[str],
                 transform: Any = None) -> None:
        self.root, self.samples, self.classes, self.bad, self.transform = root, samples, classes, bad, transform
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        image = open_rgb(path)
        return (self.transform(image) if self.transform is not None else image), target

    def with_transform(self, transform: Any) -> FolderImages:
        """The same files with another transform (the train split's evaluation view)."""
        return FolderImages(self.root, self.samples, self.classes, self.bad, transform)


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) by torchvision's ImageFolder rules (sorted class folders, files with an
    image extension, walked in sorted order), and its errors, without importing torchvision (~3.5 s)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
    samples, empty = [], []
    for index, name in enumerate(classes):
        before = len(samples)
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(folder, f), index) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
        if len(samples) == before:
            empty.append(name)
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. Supported "
                                f"extensions are: {', '.join(EXTENSIONS)}")
    return classes, samples


def image_folder(root: Path, *, skip_bad: bool, scan: bool, train: bool) -> FolderImages:
    """Discover the split at ``root`` (:func:`scan_folder`: one folder per class, image extensions).

    Empty files are refused (or, with ``skip_bad``, left out) here. ``scan``: with ``skip_bad``, also decode every
    file now and leave out those that fail (the torch loader, which otherwise decodes lazily). ``train``: the
    split that decides the class count (at least two)."""
    try:
        classes, found = scan_folder(root)
    except OSError as exc:
        raise UserError(f"empty or unreadable ImageFolder {root}: {str(exc).splitlines()[0]}") from None
    if train and len(classes) < 2:
        raise UserError(f"ImageFolder {root} has {len(classes)} class folder ({', '.join(classes)}): a "
                        "classifier needs at least 2 (one folder per class)")
    samples, bad = [], []
    for path, target in found:
        reason = f"unreadable image {path}: empty file (0 bytes); {_HINT}" if _size(path) == 0 else None
        if reason is None and skip_bad and scan:
            reason = read_ok(path)
        if reason is None:
            samples.append((path, target))
        elif skip_bad:
            bad.append(reason)
        else:
            raise ImageError(reason)
    if not samples:
        raise UserError(f"ImageFolder {root}: none of its {len(found)} images can be read ({bad[0]})")
    return FolderImages(root, samples, classes, bad)


def bad_summary(bad: list[str]) -> dict[str, Any]:
    """env.json's record of skipped files: their count and the first :data:`MAX_LISTED` reasons."""
    return {"bad_images_skipped": len(bad), "bad_images": [b.removesuffix(f"; {_HINT}") for b in bad[:MAX_LISTED]]}
