"""The CPU peak for MFU (the faster of a matmul and a convolution), measured once per host and cached, so that MFU
does not move with the load.

Measured inside each rank at start-up, the peak read 0.10 TFLOP/s in one run and 0.20 in the next on the same
machine (the other ranks were competing for the cores). So it is measured once, with the cores idle, and cached:

- under the cache directory (``CNNSCALE_CACHE_DIR``; default ``$XDG_CACHE_HOME/cnnscale`` or ``~/.cache/cnnscale``),
  in ``peak/``, one strict JSON file per key;
- keyed by host name, CPU model, torch thread count, torch version, dtype and probe (:class:`PeakKey`);
- shared safely by concurrent processes: the file is replaced atomically (a reader never sees half of it), and a
  process that finds no entry takes an ``fcntl`` lock on ``<entry>.lock`` before measuring, so the ranks of one
  launch measure once between them: the others wait on the lock (idle, not competing) and then read the result;
- warmed before any launch by :func:`warm_peak_cache`, which a study's parent process calls before it starts the
  ranks. It imports no torch: it reads the cache, and only on a miss measures in a child process
  (``python -m cnnscale.profile.peak``) at the ranks' thread count;
- refreshed by ``cnnscale bench --remeasure-peak`` (or ``refresh=True``).

Training and bench record where the peak came from (``peak_cache``: ``hit``, ``measured`` or ``remeasured``) and
its age (``peak_age_s``) in env.json and summary.json. The measurement itself is :func:`cnnscale.profile.mfu.cpu_peak`.
No torch here: ``cnnscale study`` stays free of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records.io import write_json

__all__ = ["CACHE_ENV", "cache_dir", "cpu_model", "torch_version", "PeakKey", "peak_key", "read_peak", "cached_peak",
           "warm_peak_cache", "PEAK_MODULE"]

CACHE_ENV = "CNNSCALE_CACHE_DIR"
PEAK_MODULE = "cnnscale.profile.peak"
"""The child process :func:`warm_peak_cache` runs on a cache miss (``python -m``)."""


def cache_dir() -> Path:
    """``$CNNSCALE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cnnscale``, else ``~/.cache/cnnscale``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnnscale"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere ``platform.processor()`` or the machine type)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def torch_version() -> str:
    """The installed torch's version, read from its package metadata (no import)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


@dataclass(frozen=True)
class PeakKey:
    """What a CPU peak depends on; one cache entry per key."""

    host: str
    cpu: str
    threads: int
    torch: str
    dtype: str
    probe: str = "matmul+conv3x3"
    """What was timed: the faster of a matmul and a 3x3 convolution (entries of the matmul-only probe, which
    read half the convolution's speed on an AMD EPYC, are not reused)."""

    @property
    def filename(self) -> str:
        """``<host>-t<threads>-<dtype>-<hash of the whole key>.json`` (readable, and unique per key)."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", self.host)[:40]
        return f"{host}-t{self.threads}-{self.dtype}-{digest}.json"


def peak_key(threads: int, dtype: str = "fp32") -> PeakKey:
    """The key of this host at ``threads`` torch threads."""
    return PeakKey(socket.gethostname(), cpu_model(), int(threads), torch_version(), dtype)


def _path(key: PeakKey) -> Path:
    return cache_dir() / "peak" / key.filename


def read_peak(key: PeakKey) -> dict[str, Any] | None:
    """The cached entry of ``key`` (``tflops``, ``measured_at`` epoch seconds, the key's fields); None when absent,
    unreadable or not this key's (a corrupt file is measured again and replaced)."""
    try:
        entry = json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(entry, dict) and all(entry.get(k) == v for k, v in asdict(key).items())
          and isinstance(entry.get("tflops"), int | float) and entry["tflops"] > 0
          and isinstance(entry.get("measured_at"), int | float))
    return entry if ok else None


@contextlib.contextmanager
def _locked(key: PeakKey) -> Iterator[None]:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits (idle) while another process measures
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _age(entry: dict[str, Any]) -> float:
    return max(time.time() - float(entry["measured_at"]), 0.0)


def cached_peak(key: PeakKey, measure: Callable[[], float], refresh: bool = False) -> tuple[float, str, float]:
    """(TFLOP/s, ``hit`` | ``measured`` | ``remeasured``, age in seconds) for ``key``: the cached value, or
    ``measure()`` under the key's lock, written atomically for the next process. A cache that cannot be written
    (read-only home) still gives the measured value, labelled ``measured (not cached: ...)``."""
    entry = None if refresh else read_peak(key)
    if entry is not None:
        return float(entry["tflops"]), "hit", _age(entry)
    with contextlib.ExitStack() as stack:
        problem = None
        try:
            stack.enter_context(_locked(key))
        except OSError as exc:
            problem = exc
        entry = None if refresh or problem else read_peak(key)  # another process may have measured meanwhile
        if entry is not None:
            return float(entry["tflops"]), "hit", _age(entry)
        tflops = measure()
        if problem is None:
            try:
                write_json(_path(key), {**asdict(key), "tflops": tflops, "measured_at": time.time(),
                                        "measured_by_pid": os.getpid()})
            except OSError as exc:
                problem = exc
    if problem is not None:
        return tflops, f"measured (not cached: {problem.strerror or problem})", 0.0
    return tflops, "remeasured" if refresh else "measured", 0.0


def warm_peak_cache(threads: int, dtypes: tuple[str, ...] = ("fp32",), refresh: bool = False,
                    timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Make sure the cache holds this host's CPU peak at ``threads`` (>= 1) torch threads for each dtype; call it in
    the parent before starting CPU ranks. A hit costs a file read (no torch); a miss measures in one child process
    (torch import plus about 2 s per dtype). Returns ``{"dtype", "tflops", "peak_cache", "peak_age_s"}`` per dtype.
    A child that fails is a one-line UserError naming its last output line."""
    if threads < 1:
        raise UserError(f"warm_peak_cache: threads must be >= 1, got {threads}")
    out: list[dict[str, Any]] = []
    missing = []
    for dtype in dtypes:
        entry = None if refresh else read_peak(peak_key(threads, dtype))
        if entry is None:
            missing.append(dtype)
        else:
            out.append({"dtype": dtype, "tflops": entry["tflops"], "peak_cache": "hit", "peak_age_s": _age(entry)})
    if missing:
        cmd = [sys.executable, "-m", PEAK_MODULE, "--threads", str(threads), "--dtypes", ",".join(missing),
               *(["--refresh"] if refresh else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"measuring the CPU peak failed (exit {proc.returncode}): {last}")
        out += json.loads(proc.stdout.strip().splitlines()[-1])
    return out
