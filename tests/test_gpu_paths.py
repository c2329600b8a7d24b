"""The CUDA paths, exercised on CPU (issue 18): fakes where a GPU would be needed (a fake ``nvidia-smi`` on PATH,
``torch.cuda.is_available`` patched), real processes where the path runs on CPU too.

Ports: 30800-30899 (this file's own range).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState
from helpers import BIN, PY, REPO, cpu_env, read_json, run

from cnnscale.compress.distill import DistillTask
from cnnscale.config import load_config
from cnnscale.errors import UserError
from cnnscale.models import create_model
from cnnscale.profile import gpus
from cnnscale.profile.mfu import HOST_SYNCS_PER_STEP, compute_dtype, host_syncs_per_step, lookup_peak, resolve_peak
from cnnscale.profile.profiler import Profiler
from cnnscale.study import launcher
from cnnscale.train import build

TINY = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "64", "--data.val_size", "0",
        "--micro-batch", "8", "--max-steps", "2", "--data.num_workers", "0", "--train.progress", "none",
        "--train.eval_every_epoch", "false", "--data.limit_test", "8"]
H100 = [f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d}aaaa-bbbb)" for i in range(8)]


def _fake_smi(tmp_path: Path, lines: list[str]) -> Path:
    """A directory holding an ``nvidia-smi`` that lists ``lines`` for ``-L`` and prints a driver header otherwise."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    smi = bindir / "nvidia-smi"
    listing = "\n".join(lines)
    smi.write_text("#!/bin/sh\nif [ \"$1\" = -L ]; then\ncat <<'EOF'\n" + listing + "\nEOF\nexit 0\nfi\n"
                   "echo '| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |'\n")
    smi.chmod(0o755)
    return bindir


@pytest.fixture
def fresh_state():
    """An in-process Accelerator leaves a singleton state behind: reset it around the test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------- 1. non_blocking copies
def test_batches_are_copied_non_blocking(fresh_state: None) -> None:
    acc = build.build_accelerator(load_config(TINY))
    assert acc.dataloader_config.non_blocking is True and acc.non_blocking is True
    assert acc.dataloader_config.use_seedable_sampler is True


# ---------------------------------------------------------------------------------- 2. no silent CPU fallback
def test_gpus_listed_but_unusable_fail_before_training_in_one_line(tmp_path: Path) -> None:
    bindir = _fake_smi(tmp_path, H100)
    env = cpu_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = tmp_path / "run"
    proc = run([PY, str(REPO / "launch" / "train.py"), *TINY, "--out", str(out)], env=env, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in ("GPUs present but unusable", "nvidia-smi lists 8 GPU(s)", "NVIDIA H100 80GB HBM3",
                   "driver 535.104.05", "supports CUDA 12.2", f"torch {torch.__version__}",
                   f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build",
                   "CUDA 12.2 or older", "--device cpu"):
        assert needle in err[0], (needle, err[0])
    assert not out.exists()  # failed before anything was written
    # --device cpu keeps an explicit CPU run on the same node
    ok = run([PY, str(REPO / "launch" / "train.py"), *TINY, "--device", "cpu", "--out", str(out)], env=env,
             timeout=300)
    assert read_json(out / "summary.json")["status"] == "ok", ok.stderr[-2000:]
    assert read_json(out / "env.json")["device_type"] == "cpu"
    assert load_config(["--device", "cpu"]).train.device == "cpu"


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpus, "listed_gpus", lambda: [])
    assert build.resolve_device("auto") == "cpu" and build.resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match=r"^train.device cuda, but nvidia-smi lists no GPU .*--device cpu"):
        build.resolve_device("cuda")
    monkeypatch.setattr(gpus, "listed_gpus", lambda: list(H100))
    monkeypatch.setattr(gpus, "driver_versions", lambda: ("550.54", "12.4"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match=r"nvidia-smi lists 8 GPU\(s\) \(NVIDIA H100 80GB HBM3; driver 550.54"):
        build.resolve_device("auto")
    assert build.resolve_device("cpu") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose: a CPU run, not an error
    assert build.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build.resolve_device("auto") == "cuda" and build.resolve_device("cuda") == "cuda"


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert gpus.filter_visible(H100, None) == H100
    assert gpus.filter_visible(H100, "") == [] and gpus.filter_visible(H100, "-1") == []
    assert gpus.filter_visible(H100, "3,1") == [H100[3], H100[1]]
    assert gpus.filter_visible(H100, "0,9,1") == [H100[0]]  # CUDA stops at the first id that names no device
    assert gpus.filter_visible(H100, "GPU-0005aaaa") == [H100[5]]


def test_more_processes_than_gpus_is_one_line() -> None:
    build.check_gpu_count(2, 2)
    with pytest.raises(UserError, match=r"^4 processes on this node but 2 visible GPU\(s\).*at most 2 per node"):
        build.check_gpu_count(4, 2)


# ---------------------------------------------------------------------------------- 3. timeout vs compilation
def test_collective_timeout_is_compile_aware(fresh_state: None) -> None:
    assert build.collective_timeout(load_config([])) == 120
    assert build.collective_timeout(load_config(["--fast.compile", "true"])) == build.COMPILE_TIMEOUT_S == 1800
    assert build.collective_timeout(load_config(["--fast.compile", "true", "--dist.timeout_s", "3600"])) == 3600
    acc = build.build_accelerator(load_config([*TINY, "--fast.compile", "true"]))
    assert acc.init_handler.timeout == timedelta(seconds=1800)


# ---------------------------------------------------------------------------------- 4. static_graph + accumulation
def test_static_graph_with_accumulation_is_refused_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run([PY, str(REPO / "launch" / "train.py"), *TINY, "--dist.static_graph", "true", "--grad-accum", "2",
                "--out", str(out)], check=False, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "dist.static_graph true cannot be combined with train.grad_accum 2" in proc.stderr
    assert not out.exists()
    build.check_ddp(load_config(["--dist.static_graph", "true"]))  # alone it is fine
    with pytest.raises(UserError, match="dist.compute_only"):
        build.check_ddp(load_config(["--dist.static_graph", "true", "--dist.compute_only", "true"]))


# ---------------------------------------------------------------------------------- 5. GLOO_SOCKET_IFNAME on GPU nodes
def test_sbatch_sets_the_gloo_interface_on_gpu_nodes_too(tmp_path: Path) -> None:
    text = (REPO / "cnnscale" / "resources" / "slurm" / "train.sbatch").read_text()
    funcs = text[text.index("cnnscale_iface() {"):text.index("export -f cnnscale_iface cnnscale_node")]
    show = tmp_path / "show-env"
    show.write_text('#!/bin/sh\necho "GLOO=$GLOO_SOCKET_IFNAME"\n')
    show.chmod(0o755)
    script = ("ip() { echo '2: ib0    inet 10.9.8.7/16 brd 10.9.255.255 scope global ib0'; }\n" + funcs +
              "\ncnnscale_node --model lenet5\n")
    for gpus_per_node in ("8", "0"):
        env = {"PATH": os.environ["PATH"], "CNNSCALE_NODE_GPUS": gpus_per_node, "CNNSCALE_NODE_HEAD": "10.9.8.7",
               "CNNSCALE_NODE_PY": str(show), "CNNSCALE_NODE_TARGET": "cnnscale.train", "CNNSCALE_NODE_MODULE": "1",
               "CNNSCALE_NODE_NPROC": "16", "CNNSCALE_NODE_PORT": "30801", "SLURM_NODEID": "1", "SLURM_NNODES": "2"}
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "GLOO=ib0", (gpus_per_node, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------- 6. prune's device
def test_prune_uses_the_accelerators_device(monkeypatch: pytest.MonkeyPatch, fresh_state: None) -> None:
    cfg = load_config(TINY)
    assert build.process_device(cfg) == build.build_accelerator(cfg).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert build.process_device(cfg) == torch.device("cuda", 3)  # rank 3's GPU, not GPU 0
    assert build.process_device(load_config([*TINY, "--device", "cpu"])) == torch.device("cpu")
    from cnnscale.compress import prune

    assert prune.process_device is build.process_device  # prune asks the builder, not torch.device("cuda")


# ---------------------------------------------------------------------------------- 7. bare DDP baseline
def _bare() -> object:
    spec = importlib.util.spec_from_file_location("bench_ddp_bare", REPO / "launch" / "bench_ddp_bare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bare_baseline_chooses_cuda_and_nccl_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    bare = _bare()
    assert bare.device_and_backend() == (torch.device("cpu"), "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert bare.device_and_backend() == (torch.device("cuda", 2), "nccl")


def test_bare_baseline_runs_two_gloo_ranks_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bare"
    run([str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", "127.0.0.1:30810", str(REPO / "launch" / "bench_ddp_bare.py"), "--model", "lenet5",
         "--micro-batch", "8", "--max-steps", "3", "--warmup-steps", "1", "--out", str(out)], timeout=300)
    env, summary = read_json(out / "env.json"), read_json(out / "summary.json")
    assert env["world_size"] == 2 and env["backend"] == "gloo" and env["device_type"] == "cpu"
    assert summary["status"] == "ok" and summary["world_size"] == 2 and summary["img_per_s"] > 0
    assert summary["step_ms_p50"] > 0 and summary["global_batch"] == 16


# ---------------------------------------------------------------------------------- 8. MFU peak without TF32
def test_mfu_peak_falls_back_to_fp32_without_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lookup_peak("Tesla V100-SXM2-16GB", "tf32") == (15.7, "table:V100 SXM fp32 (no TF32)")
    assert lookup_peak("Tesla V100-PCIE-32GB", "tf32") == (14.0, "table:V100 PCIe fp32 (no TF32)")
    assert lookup_peak("Tesla T4", "tf32") == (8.1, "table:T4 fp32 (no TF32)")
    assert lookup_peak("NVIDIA H100 80GB HBM3", "tf32") == (494.0, "table:H100 SXM tf32")  # TF32 where it exists
    assert lookup_peak("Tesla V100-SXM2-16GB", "bf16") == (None, None)  # no bf16 on V100: n/a, not a guess
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert compute_dtype("no", "cuda", True) == "tf32"
    assert resolve_peak(torch.device("cuda", 0), "no", tf32=True) == (8.1, "table:T4 fp32 (no TF32)")
    assert resolve_peak(torch.device("cuda", 0), "fp16") == (65.0, "table:T4 fp16")


# ---------------------------------------------------------------------------------- 9. profiler fields
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_optimiser_time_is_na_under_deepspeed() -> None:
    for kind, measured in (("DistributedType.DEEPSPEED", False), ("DistributedType.MULTI_CPU", True)):
        clock = _Clock()
        acc = SimpleNamespace(distributed_type=kind)
        prof = Profiler(torch.device("cpu"), world_size=1, clock=clock, accelerator=acc)
        prof.start()
        for _batch in prof.iter_data([1, 2]):
            with prof.phase("fwd_bwd"):
                clock.t += 0.2
            with prof.phase("optim"):
                clock.t += 0.1
            prof.step(8)
        prof.stop()
        s = prof.summary()
        assert (s["optim_s"] == pytest.approx(0.2)) if measured else s["optim_s"] is None, (kind, s["optim_s"])
        assert s["fwd_bwd_s"] == pytest.approx(0.4)
    assert prof.env()["data_wait_clock"] == "host"


def test_sync_probe_uses_the_tasks_loss() -> None:
    calls = []

    class Task:
        def loss(self, model, images, labels):
            calls.append(images.shape[0])
            return model(images).float().pow(2).mean()

    acc = SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", no_sync=lambda m: _null(), autocast=_null)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    prof = Profiler(torch.device("cpu"), world_size=2, accelerator=acc, model=model, task=Task())
    prof.sync.probe(0.01, (torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)))
    assert calls == [4] and len(prof.sync.unsynced_s) == 1


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# ---------------------------------------------------------------------------------- 10. fp16's host syncs
def test_fp16_host_syncs_counted_on_the_grad_scaler(monkeypatch: pytest.MonkeyPatch, fresh_state: None) -> None:
    """What Accelerate's optimizer step does with a GradScaler, on CPU's GradScaler: count the .item() calls."""
    assert HOST_SYNCS_PER_STEP == {"no": 0, "bf16": 0, "fp16": 1} and host_syncs_per_step("bf16") == 0
    build.build_accelerator(load_config(TINY))  # the state AcceleratedOptimizer reads
    model = torch.nn.Linear(4, 2)
    opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False,
                               scaler=torch.amp.GradScaler("cpu"))
    opt.scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    count = {"item": 0}
    item = torch.Tensor.item

    def counted(self: torch.Tensor) -> object:
        count["item"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    opt.step()
    monkeypatch.setattr(torch.Tensor, "item", item)
    assert count["item"] == HOST_SYNCS_PER_STEP["fp16"]


# ---------------------------------------------------------------------------------- 11. distillation under DeepSpeed
def test_distill_teacher_takes_deepspeeds_dtype() -> None:
    plugin = SimpleNamespace(deepspeed_config={"bf16": {"enabled": True}})
    acc = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=plugin))
    task = DistillTask(create_model("lenet5"))
    task.prepare(acc)
    assert {p.dtype for p in task.teacher.parameters()} == {torch.bfloat16}
    images = torch.randn(2, 3, 32, 32).bfloat16()  # what prepare_inputs gives the student under DeepSpeed bf16
    student = create_model("lenet5").bfloat16()
    loss = task.loss(student, images, torch.tensor([1, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    plain = DistillTask(create_model("lenet5"))
    plain.prepare(SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace()))
    assert {p.dtype for p in plain.teacher.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------- 12. study launches on GPUs
def test_study_refuses_world_sizes_above_the_gpu_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = _fake_smi(tmp_path, H100[:2])
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert len(gpus.visible_gpus()) == 2
    launcher.check_gpu_world_sizes([1, 2])
    with pytest.raises(UserError, match=r"^world size 4, 8 needs one GPU per process but this machine shows 2 GPU"):
        launcher.check_gpu_world_sizes([1, 2, 4, 8])
    launcher.check_gpu_world_sizes([1, 8], gpus=[])  # no GPU at all: CPU processes, any world size
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nmodels: [lenet5]\nworld_sizes: [1, 4]\nmax_steps: 2\n")
    out = tmp_path / "out"
    proc = run([PY, "-m", "cnnscale", "study", str(study), "--out", str(out)], check=False, timeout=120,
               env=cpu_env(PATH=os.environ["PATH"]))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "world size 4 needs one GPU per process but this machine shows 2 GPU(s)" in proc.stderr
    assert not (out / "study.yaml").exists()


def test_study_launches_pass_the_launcher_defaults_explicitly() -> None:
    cmd = launcher.build_command("cnnscale.train", ["--a"], 2, 30820, python="/nonexistent/python")
    for flag, value in (("--dynamo_backend", "no"), ("--mixed_precision", "no"), ("--machine_rank", "0"),
                        ("--num_machines", "1")):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert cmd.index("--dynamo_backend") < cmd.index("-m", 3)  # launcher flags, before the target


def test_env_records_the_data_wait_clock_and_host_syncs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run([PY, str(REPO / "launch" / "train.py"), *TINY, "--mixed-precision", "bf16", "--out", str(out)], timeout=300)
    env = json.loads((out / "env.json").read_text())
    assert env["data_wait_clock"] == "host" and env["host_syncs_per_step"] == 0


# ---------------------------------------------------------------------------------- 13. accuracy script's deadline
def test_accuracy_script_deadline_and_file_limit(tmp_path: Path) -> None:
    """With a deadline that nothing fits in, every model is recorded as skipped; OUT holds the table, the steps
    and the archive (at most 8 files), all written although no model ran."""
    out = tmp_path / "out"
    proc = run(["bash", str(REPO / "launch" / "accuracy_gpu.sh"), "--dry-run", "--out", str(out)], timeout=300,
               env=cpu_env(threads=2, PYTHON=PY, ACCURACY_DEADLINE="1"))
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["accuracy.json", "accuracy.md", "results.tar.gz", "steps.tsv"], files
    table = read_json(out / "accuracy.json")
    assert [r["status"] for r in table["runs"]] == ["skipped"] * 5, table
    steps = (out / "steps.tsv").read_text().splitlines()[1:]
    assert [ln.split("\t")[1] for ln in steps if not ln.startswith("decode")] == ["skipped"] * 5
    assert "skipped (deadline" in proc.stdout


def test_study_launch_with_explicit_defaults_runs_two_ranks(tmp_path: Path) -> None:
    """The accelerate form a study point uses, with the launcher defaults spelled out, still gives world size 2."""
    out = tmp_path / "point"
    cmd = launcher.build_command(launcher.TRAIN_MODULE, [*TINY, "--out", str(out)], 2, 30830)
    assert "--dynamo_backend" in cmd
    run(cmd, timeout=300, env=cpu_env())
    assert read_json(out / "summary.json")["world_size"] == 2 and read_json(out / "env.json")["world_size"] == 2
    assert read_json(out / "env.json")["distributed_type"] == "MULTI_CPU"
