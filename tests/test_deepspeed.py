"""DeepSpeed ZeRO-1, 2 and 3 through Accelerate, on CPU with 2 real processes (gloo, DeepSpeed's CPU accelerator).

Each run memorises a small synthetic set (random labels, 64 images, Adam), so its loss must fall far. The first
DeepSpeed run on a machine compiles a shared-memory comm op (about a minute): TORCH_EXTENSIONS_DIR keeps it, from
the environment, else ``$CNNSCALE_CACHE_DIR/torch_extensions``, else ``<repo>/.torch_extensions``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import BIN, REPO, cpu_env, read_json, run

from cnnscale.config import load_config
from cnnscale.errors import UserError
from cnnscale.models import create_model
from cnnscale.records.io import read_metrics

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
pytest.importorskip("transformers", reason="Accelerate's DeepSpeed path needs transformers")

PORTS = {"1": 30141, "2": 30142, "3": 30143, "3_offload": 30144, "mismatch": 30145, "resume": 30146}
LEARN = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "64", "--data.val_size", "0",
         "--data.num_workers", "0", "--train.eval_every_epoch", "false", "--micro-batch", "32",
         "--optim.name", "adam", "--lr", "0.003", "--sched.name", "none", "--train.progress", "plain"]


def ds_env() -> dict[str, str]:
    cache = os.environ.get("CNNSCALE_CACHE_DIR")
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(cache) / "torch_extensions" if cache
                                                         else REPO / ".torch_extensions")
    Path(ext).mkdir(parents=True, exist_ok=True)
    return cpu_env(TORCH_EXTENSIONS_DIR=ext)


def ds_cmd(config: str, port: int, args: list[str]) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", config, "--num_processes", "2",
            "--main_process_port", str(port), str(REPO / "launch" / "train.py"), *args]


# (stage file, steps, grad_accum, precision): ZeRO-2 also covers bf16 (inputs cast to the model's dtype) and
# gradient accumulation; the offload variant runs ZeRO-3 with parameters and optimizer states on the CPU.
CASES = [("1", 40, 1, "no"), ("2", 40, 2, "bf16"), ("3", 40, 1, "no"),
         pytest.param("3_offload", 30, 1, "no", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("stage", "steps", "accum", "precision"), CASES)
def test_zero_stage_trains_on_two_processes(tmp_path: Path, stage: str, steps: int, accum: int,
                                            precision: str) -> None:
    out = tmp_path / f"zero{stage}"
    args = [*LEARN, "--max-steps", str(steps), "--grad-accum", str(accum), "--mixed-precision", precision,
            "--train.log_every", "10", "--out", str(out)]
    if accum > 1:
        args += ["--micro-batch", "16"]  # 16 x 2 accumulated x 2 ranks: still the whole 64-image set per step
    run(ds_cmd(f"launch/accelerate/deepspeed_zero{stage}.yaml", PORTS[stage], args), timeout=420, env=ds_env())

    env, summary = read_json(out / "env.json"), read_json(out / "summary.json")
    assert env["world_size"] == 2 and summary["world_size"] == 2
    assert env["distributed_type"] == "DEEPSPEED"
    assert env["zero_stage"] == int(stage[0])
    assert env["zero_offload_optimizer"] == ("cpu" if "offload" in stage else "none")
    assert env["mixed_precision"] == precision  # what DeepSpeed really ran, not Accelerate's "no"
    assert env["param_count"] == sum(p.numel() for p in create_model("lenet5").parameters())
    assert env["predicted_rank_bytes"]["model_states"] > 0
    assert summary["status"] == "ok" and summary["steps"] == steps and summary["grad_accum"] == accum
    assert summary["global_batch"] == 64 and len(summary["rank_peak_rss_bytes"]) == 2
    # the engine steps inside backward: no optimiser time of its own (n/a, not ~0); fwd_bwd_s holds it
    assert summary["optim_s"] is None and summary["fwd_bwd_s"] > 0

    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == steps // 10
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses}"

    ck = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert ck.name == f"step_{steps:08d}" and (ck / "trainer_state.json").is_file()
    shards = sorted(p.name for p in (ck / "pytorch_model").glob("*optim_states.pt"))
    assert len(shards) == 2, f"optimizer states should be partitioned over 2 ranks: {shards}"
    if stage == "2":
        _resumes(out, args, steps, losses)


def _resumes(out: Path, args: list[str], steps: int, losses: list[float]) -> None:
    """ZeRO-2 (bf16, accumulation 2): save_state wrote the engine's partitioned checkpoint; ``--resume`` loads it
    and goes on for 10 more steps from the trained weights, not from a fresh model."""
    more = [a for a in args if a != "--out" and a != str(out)]
    more[more.index("--max-steps") + 1] = str(steps + 10)
    run(ds_cmd("launch/accelerate/deepspeed_zero2.yaml", PORTS["resume"], [*more, "--resume", str(out)]),
        timeout=420, env=ds_env())
    summary, recs = read_json(out / "summary.json"), [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert summary["status"] == "ok" and summary["steps"] == steps + 10 and summary["world_size"] == 2
    assert [r["step"] for r in recs] == list(range(10, steps + 11, 10))
    assert recs[-1]["loss"] < 0.5 * losses[0], "the resumed run should go on from the trained weights"
    assert (out / "checkpoints" / f"step_{steps + 10:08d}" / "trainer_state.json").is_file()


def test_grad_accum_mismatch_is_one_line_error(tmp_path: Path) -> None:
    ds = json.loads((REPO / "launch/accelerate/ds_zero1.json").read_text())
    ds["gradient_accumulation_steps"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    yaml_text = (REPO / "launch/accelerate/deepspeed_zero1.yaml").read_text()
    (tmp_path / "ds.yaml").write_text(yaml_text.replace("launch/accelerate/ds_zero1.json", str(tmp_path / "ds.json")))
    proc = run(ds_cmd(str(tmp_path / "ds.yaml"), PORTS["mismatch"],
                      [*LEARN, "--max-steps", "2", "--out", str(tmp_path / "run")]),
               timeout=300, env=ds_env(), check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert errors, proc.stderr[-3000:]
    assert "gradient_accumulation_steps=4" in errors[0] and "--grad-accum" in errors[0]
    assert f'File "{REPO / "cnnscale"}' not in proc.stderr  # the launcher's own traceback aside, no trace of ours
    assert not (tmp_path / "run" / "summary.json").exists()


# ------------------------------------------------------------------------------- in-process, no processes started
def _fake_acc(ds: dict, accum: int = 1, world: int = 2) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=ds, zero_stage=ds["zero_optimization"]["stage"],
                             gradient_accumulation_steps="auto", gradient_clipping="auto")
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=accum,
                           num_processes=world)


def _ds_json(name: str = "ds_zero2.json") -> dict:
    return json.loads((REPO / "launch/accelerate" / name).read_text())


def test_configure_fills_auto_from_cnnscale_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnscale.train import deepspeed as ds_config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = load_config(["--micro-batch", "16", "--grad-accum", "4", "--mixed-precision", "bf16",
                       "--train.clip_grad", "1.5"])
    acc = _fake_acc(_ds_json(), accum=4)
    ds_config.configure_deepspeed(acc, cfg)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 2 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_allow_untested_optimizer"] is True  # the client torch optimizer
    env = ds_config.deepspeed_env(acc)
    assert env["zero_stage"] == 2 and env["mixed_precision"] == "bf16" and env["zero_offload_param"] == "none"
    assert str(ds_config.input_dtype(acc)) == "torch.bfloat16"


@pytest.mark.parametrize(("key", "value", "flags", "needle"), [
    ("train_micro_batch_size_per_gpu", 8, [], "--micro-batch"),
    ("bf16", {"enabled": True}, [], "--mixed-precision"),
    ("gradient_clipping", 1.0, [], "--train.clip_grad"),
])
def test_configure_refuses_disagreeing_json(monkeypatch: pytest.MonkeyPatch, key: str, value: object,
                                            flags: list[str], needle: str) -> None:
    from cnnscale.train import deepspeed as ds_config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    ds = _ds_json()
    ds[key] = value
    with pytest.raises(UserError, match=needle) as err:
        ds_config.configure_deepspeed(_fake_acc(ds), load_config(["--micro-batch", "32", *flags]))
    assert "\n" not in str(err.value)


def test_configure_refuses_dropped_deepspeed_and_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnscale.train import deepspeed as ds_config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_plugin = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU"):
        ds_config.configure_deepspeed(no_plugin, load_config([]))
    with pytest.raises(UserError, match="fast.compile"):
        ds_config.configure_deepspeed(_fake_acc(_ds_json()), load_config(["--fast.compile", "true"]))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    ds_config.configure_deepspeed(no_plugin, load_config([]))  # plain DDP: nothing to do
    assert ds_config.deepspeed_env(no_plugin) == {"zero_stage": None}


@pytest.mark.parametrize("name", ["ds_zero1.json", "ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"])
def test_shipped_configs_leave_batch_and_precision_to_cnnscale(name: str) -> None:
    ds = _ds_json(name)
    stage = int(name[len("ds_zero")])
    assert ds["zero_optimization"]["stage"] == stage and ds["zero_allow_untested_optimizer"] is True
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    yaml_text = (REPO / f"launch/accelerate/deepspeed_{name[3:-5]}.yaml").read_text()
    assert f"deepspeed_config_file: launch/accelerate/{name}" in yaml_text
    assert "\nmixed_precision" not in yaml_text and "gradient_accumulation_steps:" not in yaml_text


def test_a_ddp_run_never_imports_deepspeed(tmp_path: Path) -> None:
    """A run that does not use DeepSpeed does not import it (2-3 s of CPU per process on this box; and imported after
    the process group started it kept gloo threads alive at exit). Every import is logged (PYTHONPROFILEIMPORTTIME):
    none of the two ranks' imports is deepspeed, and the run still trains on world size 2."""
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:31950", str(REPO / "launch" / "train.py"), *LEARN, "--max-steps", "2",
           "--out", str(out)]
    proc = run(cmd, timeout=300, env=cpu_env(PYTHONPROFILEIMPORTTIME="1"))
    imports = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert sum(ln.rstrip().endswith("| cnnscale.train.loop") for ln in imports) == 2, proc.stderr[-2000:]
    assert not [ln for ln in imports if ln.rstrip().rsplit("|", 1)[-1].strip().split(".")[0] == "deepspeed"]
    assert read_json(out / "env.json")["world_size"] == 2
    assert read_json(out / "summary.json")["status"] == "ok"


def test_unwrap_model_strips_data_parallel_without_importing_deepspeed() -> None:
    from torch import nn

    from cnnscale.train.build import unwrap_model

    model = create_model("lenet5")
    acc = SimpleNamespace(unwrap_model=lambda m: pytest.fail("accelerate's unwrap_model imports deepspeed"))
    assert unwrap_model(acc, model) is model
    assert unwrap_model(acc, nn.DataParallel(model)) is model
