"""Decode once: an ImageFolder split's decoded uint8 images, cached under the cache directory and shared by runs.

Where: ``$CNNSCALE_CACHE_DIR/decoded`` (else ``$XDG_CACHE_HOME/cnnscale/decoded``, else
``~/.cache/cnnscale/decoded``). One entry per data set, split and key, a directory ``ROOT-SPLIT-KEY`` holding
``x.npy`` (N, 3, 32, 32 uint8), ``y.npy`` (N int64) and ``meta.json`` (the count, the classes, the files left out as
unreadable).

- Key: the data set's absolute path, and each file's name, class, size and modification time (plus the unreadable
  files found before decoding). A file added, removed, replaced or repaired gives a new key; the entry of the old key
  is removed when the new one is published.
- Atomic: an entry is written in a temporary sibling directory, fsynced, and put in place with one ``rename``; a
  reader only ever sees a whole entry. A decode that fails (an unreadable file, without ``data.skip_bad_images``)
  publishes nothing, so the cache never holds a half-decoded set.
- Concurrent runs (several ranks, several jobs): builders of one data set and split serialise on an ``fcntl`` lock
  (``ROOT-SPLIT.lock``, released by the kernel if its holder dies). The first decodes; the others wait, then read its
  entry. Readers of a published entry take no lock.
- A hit costs one ``stat`` per file (the key) and no decoding: ``x.npy`` is memory-mapped copy-on-write.
- A cache directory that cannot be written is no error: the split is decoded without caching (status ``off``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Decoded", "cache_dir", "cache_key", "entry_name", "cached_decode", "ENV_VAR", "SHAPE"]

ENV_VAR = "CNNSCALE_CACHE_DIR"
SHAPE = (3, 32, 32)
_META_VERSION = 1


@dataclass(frozen=True)
class Decoded:
    """A decoded split: images ``x`` (N, 3, 32, 32) uint8, labels ``y`` (N,) int64, ``bad``: the files left out as
    unreadable (one line each); ``status``: ``hit`` (read from the cache), ``built`` (decoded and published here),
    ``shared`` (published by a concurrent run while this one waited) or ``off`` (decoded, not cached)."""

    x: np.ndarray
    y: np.ndarray
    bad: tuple[str, ...]
    status: str


def cache_dir() -> Path:
    """The directory of decoded entries (see the module docstring)."""
    base = os.environ.get(ENV_VAR)
    if base:
        return Path(base) / "decoded"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cnnscale" / "decoded"


def cache_key(samples: Sequence[tuple[str, int]], bad: Sequence[str]) -> str:
    """Names, classes, sizes and modification times of ``samples`` [(path, class)], and the ``bad`` lines found
    before decoding. Cost: one ``stat`` per file (~0.1 s for 60,000 files)."""
    h = hashlib.sha1()
    for p, t in samples:
        st = os.stat(p)
        h.update(f"{p}:{t}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update("\n".join(bad).encode())
    return h.hexdigest()[:16]


def entry_name(root: Path, split: str) -> str:
    """``NAME-DIGEST-SPLIT``: the data set's folder name and a digest of its absolute path (two trees of the same
    name do not share an entry), then the split."""
    absolute = os.path.abspath(root)
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    return f"{Path(absolute).name[:40]}-{digest}-{split}"


def _read(entry: Path, expected: int) -> Decoded | None:
    """The entry when it is whole and holds ``expected`` files (decoded + bad), else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        x = np.load(entry / "x.npy", mmap_mode="c")  # copy-on-write: torch.from_numpy needs a writable array
        y = np.load(entry / "y.npy")
    except (OSError, ValueError, TypeError):
        return None
    bad = tuple(meta.get("bad", ())) if isinstance(meta, dict) else ()
    whole = (isinstance(meta, dict) and meta.get("version") == _META_VERSION and x.dtype == np.uint8
             and x.shape[1:] == SHAPE and y.shape == (len(x),) and meta.get("n") == len(x))
    return Decoded(x, y, bad, "hit") if whole and len(x) + len(bad) == expected else None


def _lock(path: Path) -> int:
    """A descriptor of ``path`` (created) holding an exclusive ``fcntl`` lock; blocks while another process holds
    it. ``os.close`` releases it (so does the kernel, when the process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd


def _fsynced_save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())


def _publish(entry: Path, d: Decoded, classes: Sequence[str], root: Path) -> None:
    """Write ``d`` beside ``entry`` and rename it into place (the caller holds the lock); old keys are removed, and
    so are the entries of data sets that no longer exist (:func:`_sweep`)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the entry from other users sharing the cache directory
        _fsynced_save(tmp / "x.npy", np.ascontiguousarray(d.x))
        _fsynced_save(tmp / "y.npy", np.ascontiguousarray(d.y, dtype=np.int64))
        meta = {"version": _META_VERSION, "n": len(d.x), "classes": list(classes), "bad": list(d.bad),
                "root": os.path.abspath(root)}
        (tmp / "meta.json").write_text(json.dumps(meta, allow_nan=False))
        if entry.exists():  # a torn or foreign entry of this very key, found unreadable under the lock
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for old in entry.parent.iterdir():  # earlier keys of this data set and split, and dead builders' leftovers
        stale = old.name.startswith(prefix) and old.name != entry.name and not old.name.endswith(".lock")
        if stale or (old.name.startswith(f".{prefix}") and old != tmp):
            shutil.rmtree(old, ignore_errors=True)
    _sweep(entry.parent)


def _sweep(base: Path) -> None:
    """Remove the entries whose data set directory is gone (temporary trees, a moved copy), with their locks: the
    cache does not grow with every data set ever read. Costs one small read per entry."""
    for e in base.iterdir():
        if e.name.startswith(".") or not e.is_dir():
            continue
        try:
            root = json.loads((e / "meta.json").read_text()).get("root")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(root, str) and not os.path.isdir(root):
            shutil.rmtree(e, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(base / f"{e.name.rsplit('-', 1)[0]}.lock")


def cached_decode(root: Path, split: str, samples: Sequence[tuple[str, int]], bad: Sequence[str],
                  classes: Sequence[str], decode: Callable[[], tuple[np.ndarray, np.ndarray, tuple[str, ...]]]
                  ) -> Decoded:
    """The decoded split of the ImageFolder at ``root``: from the cache, or ``decode()`` (images, labels, every bad
    line) published there. ``decode`` raising publishes nothing. See the module docstring."""
    base = cache_dir()
    key = cache_key(samples, bad)
    name = entry_name(root, split)
    entry, expected = base / f"{name}-{key}", len(samples) + len(bad)
    hit = _read(entry, expected)
    if hit is not None:
        return hit
    try:
        base.mkdir(parents=True, exist_ok=True)
        fd = _lock(base / f"{name}.lock")
    except OSError:  # no writable cache directory: decode without caching
        x, y, all_bad = decode()
        return Decoded(x, y, all_bad, "off")
    try:
        hit = _read(entry, expected)  # published by a concurrent run while this one waited for the lock
        if hit is not None:
            return Decoded(hit.x, hit.y, hit.bad, "shared")
        x, y, all_bad = decode()
        built = Decoded(x, y, all_bad, "built")
        with contextlib.suppress(OSError):  # a full disk: this run keeps its decode, the next one tries again
            _publish(entry, built, classes, root)
        return built
    finally:
        os.close(fd)
