"""What a study point pays besides its timed steps (issue 13: three quickstart repeats in 8 minutes), cut without
changing a record: a model's meta-device counts (FLOPs, parameters, activations) cached once per host; no end-of-run
checkpoint where ``train.final_ckpt`` is off (the weights still checked, a stop signal still checkpoints); and
``python -m cnnscale.train`` freezing the garbage collector before the interpreter's exit.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cnnscale import cli
from cnnscale.config import ModelConfig, TrainConfig
from cnnscale.data import fits
from cnnscale.models import create_model
from cnnscale.profile import countcache
from cnnscale.profile.flops import count_flops
from cnnscale.profile.peakcache import CACHE_ENV, torch_version
from cnnscale.records import io as records
from cnnscale.records.run import complete_checkpoints
from cnnscale.train import __main__ as trainer_main
from cnnscale.train import build, loop
from cnnscale.train.resume import resume_config
from cnnscale.train.step import ClassificationTask

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "lenet5", "--data", "synthetic", "--micro-batch", "16", "--data.num_workers", "0",
        "--data.val_size", "0", "--data.synthetic_size", "256", "--train.progress", "none",
        "--train.eval_every_epoch", "false", "--train.final_eval", "false", "--train.log_every", "1"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache directory of this test's own; the in-process memos cleared on both sides."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    build._count.cache_clear()
    countcache.source_digest.cache_clear()
    yield tmp_path / "cache"
    build._count.cache_clear()
    countcache.source_digest.cache_clear()


def _builder() -> None:
    """A stand-in model builder: the key only needs its source file (this one)."""


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / countcache.COUNTS_DIR).glob("*.json")) if (cache / countcache.COUNTS_DIR).is_dir() else []


# ------------------------------------------------------------------------------------------------ the cache itself
def test_counts_are_counted_once_then_read_from_the_cache(cache: Path) -> None:
    calls: list[int] = []

    def count() -> dict[str, float]:
        calls.append(1)
        return {"fwd": 2.0, "train": 6.0}

    key = countcache.count_key("flops", "toy", 10, None, (1, 3, 32, 32), _builder)
    assert key is not None and key["model"] == "toy" and key["torch"] == torch_version()
    assert countcache.cached_counts(key, count, names=("fwd", "train")) == {"fwd": 2.0, "train": 6.0}
    assert countcache.cached_counts(key, count, names=("fwd", "train")) == {"fwd": 2.0, "train": 6.0}
    assert len(calls) == 1
    (entry,) = _entries(cache)
    assert json.loads(entry.read_text()) == {"key": key, "counts": {"fwd": 2.0, "train": 6.0}}
    other = countcache.count_key("flops", "toy", 100, None, (1, 3, 32, 32), _builder)  # another head: another key
    assert countcache.cached_counts(other, count, names=("fwd", "train")) == {"fwd": 2.0, "train": 6.0}
    assert len(calls) == 2 and len(_entries(cache)) == 2


def test_a_corrupt_or_foreign_entry_is_counted_again_and_replaced(cache: Path) -> None:
    key = countcache.count_key("fit", "toy", None, 0.5, (1, 3, 32, 32), _builder)
    countcache.cached_counts(key, lambda: {"params": 3.0, "activations": 4.0})
    (entry,) = _entries(cache)
    for text in ("{not json", json.dumps({"key": {**key, "model": "other"}, "counts": {"params": 1, "activations": 1}}),
                 json.dumps({"key": key, "counts": {"params": 3.0}}),  # not the names asked for
                 json.dumps({"key": key, "counts": {"params": True, "activations": 4.0}})):
        entry.write_text(text)
        got = countcache.cached_counts(key, lambda: {"params": 5.0, "activations": 6.0},
                                       names=("params", "activations"))
        assert got == {"params": 5.0, "activations": 6.0}, text
        assert json.loads(entry.read_text())["counts"] == got


def test_no_key_no_positive_counts_or_no_writable_cache_still_counts(cache: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert countcache.count_key("flops", "builtin", 10, None, (1,), len) is None  # no source file: never cached
    assert countcache.cached_counts(None, lambda: {"fwd": 1.0}) == {"fwd": 1.0}
    key = countcache.count_key("fit", "toy", 10, None, (1, 3, 32, 32), _builder)
    assert countcache.cached_counts(key, lambda: {"params": 3.0, "activations": 0.0}) == {"params": 3.0,
                                                                                           "activations": 0.0}
    assert _entries(cache) == []  # a model the meta device cannot run (0 activations) is counted every time
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # under a regular file: cannot be made
    assert countcache.cached_counts(key, lambda: {"params": 3.0, "activations": 4.0}) == {"params": 3.0,
                                                                                           "activations": 4.0}


def test_editing_a_model_s_source_changes_its_key(cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "mymodel.py"
    src.write_text("def net():\n    return 1\n")
    namespace: dict[str, object] = {}
    exec(compile(src.read_text(), str(src), "exec"), namespace)
    before = countcache.count_key("flops", "net", 10, None, (1, 3, 32, 32), namespace["net"])
    src.write_text("def net():\n    return 2  # edited\n")
    countcache.source_digest.cache_clear()  # a new process; within one the sources are read once
    after = countcache.count_key("flops", "net", 10, None, (1, 3, 32, 32), namespace["net"])
    assert before is not None and after is not None and before["source_sha1"] != after["source_sha1"]


# ------------------------------------------------------------------------------------------------ its two users
def test_model_flops_are_counted_once_per_host_and_equal_a_fresh_count(cache: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.device("meta"):
        fresh = count_flops(create_model("mobilenet_v2"), input_shape=(1, 3, 32, 32), backward=True)
    first = build.model_flops(ModelConfig(name="mobilenet_v2"))
    assert first == {"fwd_flops_per_img": fresh["flops"], "train_flops_per_img": fresh["fwd_bwd_flops"]}
    build._count.cache_clear()  # as a new process would start

    def no_count(*_a: object, **_k: object) -> dict[str, float]:
        raise AssertionError("counted again instead of reading the cache")

    monkeypatch.setattr(build, "count_flops", no_count)
    assert build.model_flops(ModelConfig(name="mobilenet_v2")) == first
    assert [json.loads(p.read_text())["key"]["what"] for p in _entries(cache)] == ["flops"]


def test_the_memory_fit_counts_are_cached_and_unchanged(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = create_model("resnet18", num_classes=10)
    want = (sum(p.numel() for p in model.parameters()) * 4 * 4, fits._activation_elements(model) * 4 * 16)
    assert fits.model_bytes("resnet18", 10, None, 16) == want
    monkeypatch.setattr(fits, "_activation_elements", lambda _m: pytest.fail("counted again"))
    assert fits.model_bytes("resnet18", 10, None, 16) == want
    assert fits.model_bytes("resnet18", 10, None, 32) == (want[0], want[1] * 2)  # the batch is not in the key


# ------------------------------------------------------------------------------------------------ train.final_ckpt
def test_final_ckpt_is_on_by_default_and_set_from_the_command_line() -> None:
    assert TrainConfig().final_ckpt is True
    assert resume_config([*ARGS, "--max-steps", "2", "--train.final_ckpt", "false"]).train.final_ckpt is False
    assert resume_config([*ARGS, "--max-steps", "2"]).train.final_ckpt is True


def test_a_run_without_the_final_checkpoint_writes_none_but_periodic_ones(tmp_path: Path) -> None:
    runs = {"default": [], "off": ["--train.final_ckpt", "false"],
            "periodic": ["--train.final_ckpt", "false", "--train.ckpt_every", "2"]}
    for name, extra in runs.items():
        assert cli.main(["train", *ARGS, "--max-steps", "3", *extra, "--out", str(tmp_path / name)]) == 0
        summary = json.loads((tmp_path / name / records.SUMMARY).read_text())
        assert summary["status"] == "ok" and summary["steps"] == 3 and summary["world_size"] == 1
    assert [s for s, _ in complete_checkpoints(tmp_path / "default")] == [3]
    assert complete_checkpoints(tmp_path / "off") == [] and not (tmp_path / "off" / "checkpoints").exists()
    assert [s for s, _ in complete_checkpoints(tmp_path / "periodic")] == [2]


class _StopAtStep2(ClassificationTask):
    """Sends this process SIGUSR1 (a SLURM preemption notice) during the second step's loss."""

    calls = 0

    def loss(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().loss(model, images, labels)


def test_a_stopped_run_still_checkpoints_without_the_final_one(tmp_path: Path) -> None:
    cfg = resume_config([*ARGS, "--max-steps", "6", "--train.final_ckpt", "false", "--dist.preempt_check_every", "1",
                         "--out", str(tmp_path / "run")])
    result = loop.run(cfg, task=_StopAtStep2())
    assert result.summary["status"] == "preempted" and result.summary["steps"] == 2
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [2]  # so the run resumes from it


# ------------------------------------------------------------------------------------------------ the exit
def test_a_live_communication_thread_is_seen_so_the_exit_stays_as_it_was() -> None:
    """A thread named as gloo names its event loop (set through prctl, as pthread_setname_np does) is found while
    it runs, and not after."""
    libc = ctypes.CDLL(None, use_errno=True)
    named, release = threading.Event(), threading.Event()

    def gloo_like() -> None:
        assert libc.prctl(15, b"gloo_tcp_loop", 0, 0, 0) == 0  # PR_SET_NAME: this thread's /proc comm
        named.set()
        release.wait(30)

    before = trainer_main.comm_threads()
    assert before is not None  # Linux: /proc/self/task is readable
    thread = threading.Thread(target=gloo_like, daemon=True)
    thread.start()
    try:
        assert named.wait(30)
        assert sorted(trainer_main.comm_threads() or []) == sorted([*before, "gloo_tcp_loop"])
        assert trainer_main.comm_threads_alive()
    finally:
        release.set()
        thread.join(30)
    # join returns once the Python thread is done; the kernel drops its task from /proc a moment later
    deadline = time.monotonic() + 10
    while sorted(trainer_main.comm_threads() or []) != sorted(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(trainer_main.comm_threads() or []) == sorted(before)


PROBE = """import atexit, gc, os, runpy, sys
atexit.register(lambda: sys.stderr.write(f"rank {os.environ.get('RANK', '0')} frozen={gc.get_freeze_count()}\\n"))
sys.argv[0] = "cnnscale.train"
runpy.run_module("cnnscale.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2])
def test_the_trainer_s_processes_freeze_the_collector_before_they_exit(tmp_path: Path, world: int) -> None:
    """``python -m cnnscale.train`` ends with the garbage collector frozen (no final walk over torch's objects) on
    every rank, since the run joined its gloo threads before (world size 2 under torchrun, port 32410); the run is
    whole and ends ok, with no abort at exit."""
    probe, run = tmp_path / "probe.py", tmp_path / "run"
    probe.write_text(PROBE)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:32410"] if world == 2 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*launch, str(probe), *ARGS, "--max-steps", "2", "--out", str(run)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frozen = {ln.split()[1]: int(ln.split("=")[1]) for ln in proc.stderr.splitlines()
              if ln.startswith("rank ") and "frozen=" in ln}
    assert sorted(frozen) == [str(r) for r in range(world)], proc.stderr[-3000:]
    assert all(n > 100_000 for n in frozen.values()), frozen  # torch's objects, not a handful
    assert "terminate called" not in proc.stderr
    summary = json.loads((run / records.SUMMARY).read_text())
    assert summary["status"] == "ok" and summary["steps"] == 2 and summary["world_size"] == world
    env_json = json.loads((run / records.ENV).read_text())
    assert env_json["world_size"] == world
