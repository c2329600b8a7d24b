"""Distillation, pruning and quantisation: the loss by hand, sparsity, int8 outputs, clean errors, 2-process distill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import BIN, PY, REPO, cpu_env, read_json, run
from safetensors.torch import load_file, save_file

from cnnscale import cli
from cnnscale.compress.common import clean_state_dict, eval_accuracy, load_run_model
from cnnscale.compress.distill import DistillTask, distillation_loss
from cnnscale.compress.prune import apply_global_l1, make_permanent, sparsity_report
from cnnscale.compress.quantize import (
    TORCHAO,
    lower_pt2e,
    module_counts,
    quantize_dynamic_seed,
    quantize_static_fx,
    quantize_static_pt2e,
    size_on_disk,
)
from cnnscale.config import config_to_dict, load_config
from cnnscale.models import create_model
from cnnscale.records import io as records

SYN = ["--data", "synthetic", "--data.synthetic_size", "600", "--data.val_size", "100", "--data.num_workers", "0"]


def _fake_run(path: Path, num_classes: int = 10, weights: bool = True) -> Path:
    """A run directory as ``cnnscale train`` leaves it: config.yaml + checkpoints/step_*/model.safetensors."""
    cfg = load_config(["--model", "lenet5", "--model.num_classes", str(num_classes), *SYN])
    records.write_yaml(path / "config.yaml", config_to_dict(cfg))
    if weights:
        ck = path / "checkpoints" / "step_00000001"
        ck.mkdir(parents=True)
        torch.manual_seed(0)
        save_file(create_model("lenet5", num_classes=num_classes).state_dict(), str(ck / "model.safetensors"))
        (ck / "trainer_state.json").write_text(json.dumps({"step": 1, "epoch": 0, "batches_in_epoch": 1}))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _fake_run(tmp_path_factory.mktemp("teacher") / "run")


# --------------------------------------------------------------------------------------------- distillation
def test_distillation_loss_matches_hand_computed_value():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.7

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kl = sum(sum(p * math.log(p / q) for p, q in zip(softmax([x / T for x in ti]), softmax([x / T for x in si])))
             for si, ti in zip(s.tolist(), t.tolist())) / 2
    ce = sum(-math.log(softmax(si)[yi]) for si, yi in zip(s.tolist(), y.tolist())) / 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert expected == pytest.approx(0.6191371401298119, abs=1e-12)  # computed once with pencil-and-math
    assert distillation_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(s, t, y, T, 0.0).item() == pytest.approx(ce, rel=1e-6)  # alpha 0: plain CE
    assert distillation_loss(t, t, y, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # same logits: no KL


def test_distill_task_trains_student_only():
    teacher, student = create_model("lenet5"), create_model("lenet5")
    task = DistillTask(teacher, temperature=4.0, alpha=0.5)
    task.loss(student, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))).backward()
    assert not task.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_distill_two_processes(tmp_path, teacher):
    out = tmp_path / "student"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", "30501", "-m", "cnnscale", "distill", "--teacher", str(teacher),
           "--distill.temperature", "3", "--distill.alpha", "0.8", "--model", "lenet5", "--max-steps", "4",
           "--micro-batch", "16", "--out", str(out), "--train.progress", "none", *SYN]
    run(cmd, timeout=600)
    assert read_json(out / "env.json")["world_size"] == 2
    summary, rec = read_json(out / "summary.json"), read_json(out / "distill.json")
    assert summary["status"] == "ok" and summary["world_size"] == 2 and summary["steps"] == 4
    assert rec["world_size"] == 2 and rec["temperature"] == 3.0 and rec["alpha"] == 0.8
    assert rec["teacher_model"] == "lenet5" and 0 <= rec["student_test_acc"] <= 1
    assert (out / "checkpoints" / "step_00000004" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- pruning
def test_global_pruning_reaches_sparsity_and_still_trains():
    torch.manual_seed(0)
    model = create_model("lenet5")
    names = apply_global_l1(model, 0.7, include_linear=False)
    assert names == ["features.0", "features.3"]
    n = sum(m.weight.numel() for m in (model.features[0], model.features[3]))
    rep = sparsity_report(model, names)
    assert rep["pruned_weights"] == n
    assert rep["pruned_weights_sparsity"] == pytest.approx(round(0.7 * n) / n, abs=1e-12)
    assert rep["layers"]["classifier.1"]["sparsity"] == 0.0  # linear layers untouched by default
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # masked weights stay zero through training (the mask hook re-applies every forward)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 3, 32, 32)), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert make_permanent(model) == 2
    assert not hasattr(model.features[0], "weight_orig") and not model.features[0]._forward_pre_hooks
    assert sparsity_report(model, names)["pruned_weights_sparsity"] == pytest.approx(round(0.7 * n) / n, abs=1e-12)
    res = eval_accuracy(model, [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))])
    assert res["n"] == 32 and 0 <= res["acc"] <= 1


def test_prune_cli_finetunes_under_ddp(tmp_path, teacher):
    """Masks are set before accelerator.prepare wraps the model in DDP (2 processes) and hold through fine-tuning."""
    out = tmp_path / "pruned"
    run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", "30503", "-m", "cnnscale", "prune", str(teacher), "--amount", "0.5", "--include-linear",
         "--finetune-epochs", "1", "--max-steps", "3", "--micro-batch", "16", "--out", str(out),
         "--train.progress", "none"], timeout=600)
    rec, summary = read_json(out / "prune.json"), read_json(out / "summary.json")
    assert read_json(out / "env.json")["world_size"] == 2
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["world_size"] == 2
    assert rec["layers_pruned"] == 5 and rec["pruned_weights_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert all(0 <= rec[k] <= 1 for k in ("test_acc_before", "test_acc_pruned", "test_acc_after"))
    weights = load_file(str(out / "model.safetensors"))  # permanent: plain weights, no masks
    assert not any(k.endswith(("_orig", "_mask")) for k in weights)
    model, _ = load_run_model(out)
    ck = clean_state_dict(load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors")))
    assert all(torch.equal(model.state_dict()[k], ck[k]) for k in ck)  # checkpoint masks fold to the same weights


# --------------------------------------------------------------------------------------------- quantisation
def test_static_quantisation_is_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    calib = [(torch.randn(32, 3, 32, 32), None) for _ in range(4)]
    q = quantize_static_fx(model, calib, batches=4)
    x = torch.randn(32, 3, 32, 32)
    with torch.inference_mode():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert module_counts(q) == {"conv_float": 0, "conv_int8": 2, "linear_float": 0, "linear_int8": 3}
    assert size_on_disk(q, tmp_path / "q.pt") < size_on_disk(model, tmp_path / "f.pt") / 2
    # The seed's dynamic recipe names Conv2d but quantises only the Linear layers.
    assert module_counts(quantize_dynamic_seed(model)) == {"conv_float": 2, "conv_int8": 0, "linear_float": 0,
                                                           "linear_int8": 3}


def test_quantize_cli_reports_size_latency(tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", "lenet5", "--repeats", "2", "--warmup", "1", "--calib-batches", "2",
                     "--batch", "16", "--out", str(out), *SYN]) == 0
    rec = read_json(out / "quantize.json")
    v = rec["variants"]
    assert v["static"]["size_bytes"] < v["float"]["size_bytes"] / 2 and v["static"]["conv_int8"] == 2
    assert v["dynamic"]["conv_float"] == 2 and v["dynamic"]["linear_int8"] == 3
    assert all(r["median_ms"] > 0 and r["test_acc"] is None for r in v.values())  # untrained: no accuracy
    assert "static" in capsys.readouterr().out


def _need_torchao(skip_or_fail) -> None:
    if TORCHAO is None:
        skip_or_fail("torchao is not installed (pip install -e '.[torchao]'; launch/test.sh installs it)")


def test_pt2e_static_quantisation_on_torchao(tmp_path, skip_or_fail):
    """torchao's PT2E flow quantises the same layers as the old FX path, stays as close to float, is as small; the
    exported graph takes another batch size (dynamic batch dimension); lowered by inductor it gives the same output."""
    _need_torchao(skip_or_fail)
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    calib = [(torch.randn(32, 3, 32, 32), None) for _ in range(4)]
    q = quantize_static_pt2e(model, calib, batches=4)
    x = torch.randn(32, 3, 32, 32)
    with torch.inference_mode():
        ref, out = model(x), q(x)
        assert q(x[:5]).shape == (5, 10)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert module_counts(q) == {"conv_float": 0, "conv_int8": 2, "linear_float": 0, "linear_int8": 3}
    assert module_counts(model) == {"conv_float": 2, "conv_int8": 0, "linear_float": 3, "linear_int8": 0}
    assert size_on_disk(q, tmp_path / "q.pt") < size_on_disk(model, tmp_path / "f.pt") / 2
    lowered, seconds = lower_pt2e(q, x)
    with torch.inference_mode():
        low = lowered(x)
    assert seconds > 0 and (low - out).abs().max() <= 0.05 * ref.abs().max()


def test_quantize_cli_puts_old_and_new_path_side_by_side(tmp_path, capsys, skip_or_fail):
    _need_torchao(skip_or_fail)
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", "lenet5", "--repeats", "2", "--warmup", "1", "--calib-batches", "2",
                     "--batch", "16", "--pt2e-compile", "false", "--out", str(out), *SYN]) == 0
    rec = read_json(out / "quantize.json")
    v = rec["variants"]
    assert sorted(v) == ["dynamic", "float", "pt2e", "static"] and rec["torchao"] == TORCHAO
    assert v["pt2e"]["conv_int8"] == 2 and v["pt2e"]["linear_int8"] == 3 and v["pt2e"]["median_ms"] > 0
    assert v["pt2e"]["size_bytes"] < v["float"]["size_bytes"] / 2 and rec["pt2e_compile_s"] is None
    assert "pt2e" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, needle", [
    (["prune", "{tmp}/nope", "--amount", "0.5"], "no such run directory"),
    (["prune", "{teacher}", "--amount", "1.5"], "strictly between 0 and 1"),
    (["prune", "{teacher}", "--amount", "0"], "strictly between 0 and 1"),
    (["prune", "--amount", "0.5"], "RUN_DIR is required"),
    (["prune", "{empty}", "--amount", "0.5"], "no checkpoint"),
    (["distill", "--model", "lenet5"], "--teacher RUN_DIR is required"),
    (["distill", "--teacher", "{empty}", "--model", "lenet5"], "no checkpoint"),
    (["distill", "--teacher", "{teacher5}", "--model", "lenet5", *SYN], "teacher has 5 classes"),
    (["distill", "--teacher", "{teacher}", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["distill", "--teacher", "{teacher}", "--alpha", "1.5"], "distill.alpha must be in [0, 1]"),
    (["quantize", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["quantize", "{teacher}", "--backend", "tpu"], "choose from"),
    (["quantize"], "give a trained RUN_DIR"),
])
def test_bad_input_gives_one_line_error(tmp_path, teacher, capsys, argv, needle):
    paths = {"tmp": tmp_path, "teacher": teacher, "empty": _fake_run(tmp_path / "empty", weights=False),
             "teacher5": _fake_run(tmp_path / "t5", num_classes=5)}
    assert cli.main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command, own", [
    ("distill", ["--teacher", "--distill.teacher", "--temperature", "--distill.alpha", "(default: 4.0)"]),
    ("prune", ["RUN_DIR", "--amount", "--prune.amount", "--include-linear", "--finetune-epochs", "(default: 0.5)"]),
    ("quantize", ["RUN_DIR", "--backend", "--quant.backend", "--calib-batches", "--repeats", "(default: x86)"]),
])
def test_help_lists_own_and_training_flags_with_defaults(capsys, command, own):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    missing = [flag for flag in [*own, "--max-steps", "--micro-batch", "--data.limit_test", "--config"]
               if flag not in out]
    assert missing == [], out


def test_cli_error_as_subprocess_has_no_traceback(tmp_path):
    proc = run([PY, "-m", "cnnscale", "prune", str(tmp_path / "missing"), "--amount", "0.5"], check=False,
               timeout=300, env=cpu_env())
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "no such run directory" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five models on CPU: ~1 min idle, ~10 min on the shared 2-core box
def test_accuracy_gpu_script_dry_run(tmp_path):
    """The GPU accuracy script end to end on CPU (2 steps per model, real JPEG data when the archive is found)."""
    out = tmp_path / "out"
    proc = run(["bash", str(REPO / "launch" / "accuracy_gpu.sh"), "--dry-run", "--out", str(out)], timeout=1700,
               env=cpu_env(threads=2))
    table = read_json(out / "accuracy.json")
    assert {r["model"] for r in table["runs"]} == {"lenet5", "alexnet", "vgg16", "resnet18", "mobilenet_v2"}
    assert all(r["status"] == "ok" and 0 <= r["test_acc"] <= 1 for r in table["runs"])
    assert "time_to_threshold_s" in table["runs"][0] and "lenet5" in proc.stdout
