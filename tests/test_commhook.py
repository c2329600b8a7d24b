"""Communication timed in DDP's communication hook (cnnscale.profile.commhook): the interval arithmetic on fixed
marks, n/a under DeepSpeed, and on 2 real gloo processes (one launch, this file as the rank script): compute_only
leaves no exposed communication, the default all-reduce does, and the bf16 hook still compresses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cnnscale.config import ProfileConfig
from cnnscale.profile.commhook import CommTimer, TimedDDPKwargs, comm_timer, step_figures, timed_ddp_handler
from cnnscale.profile.profiler import Profiler

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable
PORT = 31310
STEPS, WARMUP, BATCH = 10, 2, 32


def test_step_figures_union_and_exposed_tail() -> None:
    # two buckets overlapping each other, the last launched at 1.0 (compute ends) and done at 1.5
    comm, exposed = step_figures([(0.2, 0.6), (0.5, 0.9), (1.0, 1.5)])
    assert comm == pytest.approx(0.4 + 0.3 + 0.5) and exposed == pytest.approx(0.5)
    # an earlier bucket finishing after the last launch: exposed runs to the latest completion
    assert step_figures([(0.0, 2.0), (1.0, 1.2)]) == (pytest.approx(2.0), pytest.approx(1.0))
    assert step_figures([]) == (0.0, 0.0)


class _Bucket:
    def __init__(self, n: int) -> None:
        self.tensor = torch.ones(n)

    def buffer(self) -> torch.Tensor:
        return self.tensor


def test_timer_wraps_the_hook_and_counts_steps_without_buckets() -> None:
    def inner(state: object, bucket: _Bucket) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(bucket.buffer() * 2)
        return fut

    timer = CommTimer("bf16_compress", inner, cuda=False)
    out = timer.hook(None, _Bucket(10)).wait()
    assert torch.equal(out, torch.full((10,), 2.0))  # the inner hook's result passes through unchanged
    timer.close_step()
    timer.close_step()  # a no_sync step: no bucket
    f = timer.figures()
    assert timer.steps == 2 and f["comm_buckets_per_step"] == 0.5 and f["comm_bytes_per_step"] == 10.0  # 2 B each
    assert f["comm_s"] >= 0 and f["comm_exposed_s"] == pytest.approx(f["comm_s"])  # one bucket: nothing hidden
    assert f["comm_timed_hook"] == "bf16_compress"


def test_handler_keeps_accelerate_fields_and_passes_no_extra_ddp_argument() -> None:
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    h = timed_ddp_handler(DistributedDataParallelKwargs(bucket_cap_mb=7, comm_hook=DDPCommunicationHookType.BF16),
                          timed=True)
    assert isinstance(h, TimedDDPKwargs) and h.timed and h.comm_hook == DDPCommunicationHookType.BF16
    assert h.to_kwargs() == {"bucket_cap_mb": 7}  # what Accelerate passes to DistributedDataParallel(...)
    assert comm_timer(torch.nn.Linear(2, 2)) is None


def test_deepspeed_says_na_and_one_process_says_zero() -> None:
    ds = Profiler(torch.device("cpu"), world_size=2, accelerator=SimpleNamespace(distributed_type="DEEPSPEED"),
                  pcfg=ProfileConfig(warmup_steps=0))
    ds.start()
    ds.step(64)
    ds.stop()
    s = ds.summary()
    assert s["comm_s"] is None and s["comm_exposed_s"] is None and s["sync_s"] is None and s["sync_share"] is None
    assert ds.env()["comm_timing"].startswith("n/a: DeepSpeed")
    one = Profiler(torch.device("cpu"), world_size=1, pcfg=ProfileConfig(warmup_steps=0))
    one.start()
    one.step(64)
    one.stop()
    s1 = one.summary()
    assert s1["comm_s"] == 0.0 and s1["comm_exposed_s"] == 0.0 and s1["comm_overlap"] is None


# ---------------------------------------------------------------------------------------------- 2 real processes
def _rank_main(out: Path) -> None:
    """One rank: three settings through Accelerate's prepare (the hook registered by the handler that
    build_accelerator installs; cnnscale.train.build itself is left out: importing it costs seconds, and
    tests/test_profiling.py covers it) and the real train_step with the real profiler."""
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    from cnnscale.models import create_model
    from cnnscale.profile.profiler import build_profiler
    from cnnscale.train.step import ClassificationTask, sync_context, train_step

    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs()])
    acc.ddp_handler = timed_ddp_handler(acc.ddp_handler, timed=True)  # as cnnscale.train.build.build_accelerator
    gen = torch.Generator().manual_seed(acc.process_index)
    batches = [(torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
               for _ in range(4)]
    res: dict = {"world_size": acc.num_processes, "distributed_type": str(acc.distributed_type)}
    for name, hook, compute_only in (("default", DDPCommunicationHookType.NO, False),
                                     ("compute_only", DDPCommunicationHookType.NO, True),
                                     ("bf16", DDPCommunicationHookType.BF16, False)):
        acc.ddp_handler.comm_hook = hook
        torch.manual_seed(0)
        model = create_model("lenet5")
        model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
        prof = build_profiler(ProfileConfig(warmup_steps=WARMUP), acc.device, acc.num_processes, accelerator=acc,
                              model=model, total_steps=STEPS)
        prof.start()
        for x, y in prof.iter_data((batches * STEPS)[:STEPS]):
            with sync_context(model, compute_only):
                train_step(acc, model, ClassificationTask(), opt, x, y, 0.0, prof)
            prof.step(BATCH * acc.num_processes)
        prof.stop()
        s = prof.summary()
        x, y = batches[0]
        torch.nn.functional.cross_entropy(model(x), y).backward()  # one synced backward: the grads as all-reduced
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        s["grads_bf16_exact"] = bool(torch.equal(grads, grads.bfloat16().float()))
        s["comm_timing"] = prof.env()["comm_timing"]
        res[name] = s
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(res, default=str))
    acc.end_training()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("commhook")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CNNSCALE_COMMHOOK_OUT": str(out)}
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(PORT),
           str(Path(__file__).resolve())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.timeout(320)
def test_two_ranks_compute_only_leaves_no_exposed_comm(two_ranks: dict) -> None:
    assert two_ranks["world_size"] == 2 and two_ranks["distributed_type"].endswith("MULTI_CPU")
    c = two_ranks["compute_only"]
    assert c["comm_timing"] == "ddp comm hook (allreduce)"
    assert c["comm_exposed_s"] < 0.02 * c["train_time_s"] and c["sync_share"] < 0.02
    assert c["comm_buckets_per_step"] == 0  # no_sync every step: DDP never called the hook


@pytest.mark.timeout(320)
def test_two_ranks_default_allreduce_is_exposed(two_ranks: dict) -> None:
    d = two_ranks["default"]
    assert d["comm_buckets_per_step"] >= 1 and d["comm_s"] > 0 and d["comm_exposed_s"] > 0
    assert 0 <= d["comm_overlap"] <= 1 and d["sync_s"] == d["comm_exposed_s"]
    assert d["sync_share"] == pytest.approx(d["comm_exposed_s"] / d["train_time_s"])
    assert d["grads_bf16_exact"] is False  # fp32 all-reduce: the bf16 check below has teeth


@pytest.mark.timeout(320)
def test_two_ranks_bf16_hook_still_compresses(two_ranks: dict) -> None:
    b, d = two_ranks["bf16"], two_ranks["default"]
    assert b["comm_timing"] == "ddp comm hook (bf16_compress)" and b["comm_exposed_s"] > 0
    assert b["grads_bf16_exact"] is True  # every averaged gradient went through bf16 on the wire
    assert b["comm_bytes_per_step"] == d["comm_bytes_per_step"] / 2


if __name__ == "__main__":  # the rank script of the two_ranks fixture (torch.distributed.run starts 2 of these)
    _rank_main(Path(os.environ["CNNSCALE_COMMHOOK_OUT"]))
