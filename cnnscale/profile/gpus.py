"""The GPUs the NVIDIA driver sees, from ``nvidia-smi``, without torch: what the study counts before it launches, and
what training compares with ``torch.cuda.is_available()`` to tell "no GPU" from "GPUs torch cannot use".

``nvidia-smi -L`` lists every GPU of the node whatever ``CUDA_VISIBLE_DEVICES`` says, so the listing is filtered the
way CUDA filters it (indices or UUID prefixes, up to the first entry that matches nothing; ``""`` or ``-1`` hides
every GPU). Each call starts ``nvidia-smi`` (~50-200 ms; at most 10 s before it is given up), so callers ask once.
No ``nvidia-smi`` on PATH, or one that fails: no GPUs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

__all__ = ["listed_gpus", "visible_gpus", "driver_versions", "filter_visible"]

_TIMEOUT_S = 10.0


def _smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def listed_gpus() -> list[str]:
    """Every ``GPU i: NAME (UUID: ...)`` line of ``nvidia-smi -L`` (MIG instances under a GPU are not counted)."""
    out = _smi("-L") or ""
    return [ln.strip() for ln in out.splitlines() if re.match(r"\s*GPU \d+:", ln)]


def filter_visible(lines: list[str], visible: str | None) -> list[str]:
    """The ``nvidia-smi -L`` lines that ``CUDA_VISIBLE_DEVICES=visible`` leaves (None: unset, all of them)."""
    if visible is None:
        return list(lines)
    kept: list[str] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            match = [ln for ln in lines if re.match(rf"GPU {int(entry)}:", ln)]
        else:
            match = [ln for ln in lines if entry and f"UUID: {entry}" in ln] if entry.startswith(("GPU-", "MIG-")) \
                else []
        if not match:  # CUDA stops at the first entry that names no device ("-1", "" included)
            break
        kept.extend(m for m in match if m not in kept)
    return kept


def visible_gpus() -> list[str]:
    """The GPUs of ``nvidia-smi -L`` that this process may use under its ``CUDA_VISIBLE_DEVICES``."""
    return filter_visible(listed_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def driver_versions() -> tuple[str | None, str | None]:
    """(driver version, the newest CUDA version that driver supports), from ``nvidia-smi``'s header; None unknown."""
    out = _smi() or ""
    driver = re.search(r"Driver Version:\s*([\d.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)
