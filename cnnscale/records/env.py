"""What a run ran on: versions, devices, world size, nodes, SLURM ids, git sha (written to env.json)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["collect_env", "git_sha", "network_from_env", "SLURM_VARS", "NETWORK_ENV"]

NETWORK_ENV = "CNNSCALE_NETWORK"  # set by the network lab (cnnscale.lab.launch): env.json's network record, JSON
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
              "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION")


def git_sha() -> str | None:
    """HEAD of the repository holding this package, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, timeout=5,
                             capture_output=True, text=True, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def network_from_env(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The network record the lab passed in :data:`NETWORK_ENV` (a JSON object), or None when absent or not one."""
    text = (os.environ if environ is None else environ).get(NETWORK_ENV)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def collect_env(accelerator: Any, hostnames: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """env.json's fields (see :class:`cnnscale.records.schema.Env`) for this process, ``extra`` on top. Cost: a
    ``git rev-parse`` (up to 5 s) and a few metadata look-ups; call once, on rank 0."""
    dev = accelerator.device
    cuda = dev.type == "cuda"
    env: dict[str, Any] = {
        "world_size": accelerator.num_processes,
        "num_nodes": len(set(hostnames)),
        "hostnames": hostnames,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "backend": str(getattr(accelerator.state, "backend", None)),
        "mixed_precision": accelerator.mixed_precision,
        "device_type": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "device_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "versions": {p: _version(p) for p in ("cnnscale", "torch", "torchvision", "accelerate", "deepspeed",
                                                "nvidia-ml-py")},
        "git_sha": git_sha(),
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
        "network": network_from_env(),
    }
    env.update(extra or {})
    return env
