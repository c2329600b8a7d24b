"""Shared helpers for tests that start real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import zygote

__all__ = ["REPO", "PY", "BIN", "train_cmd", "run", "py_run", "forkable", "final_weights", "max_abs_diff",
           "cpu_env"]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent


def cpu_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}, **extra)
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def train_cmd(args: list[str], nproc: int = 1, port: int | None = None, launcher: str = "accelerate") -> list[str]:
    """A real launch: plain python for 1 process, accelerate launch (or torchrun) for several."""
    script = str(REPO / "launch" / "train.py")
    if nproc == 1:
        return [PY, script, *args]
    assert port is not None, "distributed tests need their own port"
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", script, *args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--main_process_port", str(port), script, *args]


def forkable(cmd: list[str], env: dict[str, str]) -> bool:
    """Whether ``cmd`` is one python process (``PY script.py ...`` or ``PY -m module ...``) that the zygote can fork
    (tests/zygote.py: same process semantics, without the torch import; it runs with OMP_NUM_THREADS=1).
    ``CNNSCALE_TEST_PLAIN=1`` turns the zygote off for the whole suite."""
    return (len(cmd) > 1 and cmd[0] == PY and (cmd[1] == "-m" or cmd[1].endswith(".py"))
            and env.get("OMP_NUM_THREADS", "1") == "1" and os.environ.get("CNNSCALE_TEST_PLAIN") != "1")


def py_run(cmd: list[str], *, cwd: str | Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``, forked from the zygote when :func:`forkable`."""
    if forkable(cmd, env):
        return zygote.run(cmd[1:], cwd=cwd, env=env, timeout=timeout)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def run(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository; a single python process is forked from the zygote (:func:`py_run`)."""
    proc = py_run(cmd, cwd=REPO, env=env or cpu_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    cks = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    assert cks, f"no checkpoint in {run_dir}"
    return load_file(str(cks[-1] / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())
