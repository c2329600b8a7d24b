"""Experiment trackers through Accelerate: TensorBoard's event file read back equals metrics.jsonl (steps, keys,
values), the resolved config is stored as hyperparameters, rank 0 alone writes, a missing tracker is one line before
training starts; MLflow's local file store read back the same way."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import PY, cpu_env, read_json, run, train_cmd

from cnnscale.config import load_config
from cnnscale.config.sections import TRACKERS
from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.train import trackers

BASE = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "640", "--data.val_size", "64",
        "--data.num_workers", "0", "--micro-batch", "32", "--train.log_every", "3", "--train.progress", "none",
        "--train.final_eval", "false"]


def _need(module: str, skip_or_fail) -> None:
    """launch/test.sh installs the extras these tests use; a developer's venv may lack them."""
    if importlib.util.find_spec(module) is None:
        skip_or_fail(f"{module} is not installed (pip install -e '.[dev,tensorboard,mlflow]')")


def _event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("events.out.tfevents.*"))


def _scalar_file(run_dir: Path) -> Path:
    """The one event file that holds scalars (add_hparams writes its own, in a sub-directory)."""
    files = [f for f in _event_files(run_dir) if f.parent == run_dir / trackers.LOG_DIR / trackers.PROJECT]
    assert len(files) == 1, _event_files(run_dir)
    return files[0]


def _tensorboard_scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _tensorboard_hparams(run_dir: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    files = [f for f in _event_files(run_dir) if f not in (_scalar_file(run_dir),)]
    assert len(files) == 1, files
    ea = EventAccumulator(str(files[0]))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in hp.items()}


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should have it: per key, (step, value) in the order written."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records.read_metrics(run_dir / records.METRICS):
        step, values = trackers.tracker_values(rec)
        for key, value in values.items():
            out.setdefault(key, []).append((step, value))
    return out


def _assert_same(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(got) == sorted(want)
    for key, series in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in series], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in series], rel=1e-6), key  # stored as float32


# --------------------------------------------------------------------------------------------- config, values
def test_trackers_flag_is_comma_separated_and_checked():
    assert load_config(["--train.trackers", "tensorboard,mlflow"]).train.trackers == ("tensorboard", "mlflow")
    assert load_config(["--train.trackers", "[wandb, wandb]"]).train.trackers == ("wandb",)
    assert load_config([]).train.trackers == ()
    with pytest.raises(UserError, match=r"train.trackers: unknown value 'tensorbord' \(choose from: tensorboard, "):
        load_config(["--train.trackers", "tensorboard,tensorbord"])


def test_tracker_values_and_hparams():
    rec = {"step": 6, "epoch": 0, "loss": 2.25, "lr": 0.1, "gpu_util": None, "profiling": True}
    assert trackers.tracker_values(rec) == (6, {"epoch": 0.0, "loss": 2.25, "lr": 0.1, "profiling": 1.0})
    hp = trackers.hparams(load_config(["--model", "lenet5", "--lr", "0.05", "--sched.milestones", "[1, 2]"]))
    assert hp["model.name"] == "lenet5" and hp["optim.lr"] == 0.05 and hp["sched.milestones"] == "[1.0, 2.0]"
    assert hp["model.width_mult"] == "null" and hp["train.trackers"] == "[]"
    assert all(isinstance(v, bool | int | float | str) for v in hp.values())


def test_missing_tracker_is_one_line_error_before_training(tmp_path):
    missing = [name for name in TRACKERS if name not in trackers.installed()]
    assert missing, "every tracker is installed: no missing one to test with"
    out = tmp_path / "run"
    proc = run(train_cmd([*BASE, "--max-steps", "3", "--out", str(out), "--train.trackers", f"{missing[0]}"]),
               check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{missing[0]!r} is not installed" in err and "choose from: tensorboard, mlflow, wandb" in err
    assert not out.exists()  # nothing was started


# --------------------------------------------------------------------------------------------- tensorboard
def test_tensorboard_read_back_equals_metrics_jsonl(tmp_path, skip_or_fail):
    _need("tensorboard", skip_or_fail)
    out = tmp_path / "run"
    # 18 steps per epoch (576 images / 32): the end-of-epoch val record shares step 18 with the last train record
    run(train_cmd([*BASE, "--max-steps", "18", "--lr", "0.03", "--out", str(out), "--train.trackers", "tensorboard"]),
        timeout=240)
    got, want = _tensorboard_scalars(_scalar_file(out)), _expected(out)
    _assert_same(got, want)
    assert [s for s, _ in got["loss"]] == [3, 6, 9, 12, 15, 18] and [s for s, _ in got["val_loss"]] == [18]
    print("tensorboard loss read back:", got["loss"])
    hp = _tensorboard_hparams(out)
    assert hp["optim.lr"] == pytest.approx(0.03) and hp["model.name"] == "lenet5" and hp["train.max_steps"] == 18
    assert hp["train.out"] == str(out) and hp["train.trackers"] == "[tensorboard]"


def test_tensorboard_two_processes_rank0_writes_one_event_file(tmp_path, skip_or_fail):
    _need("tensorboard", skip_or_fail)
    out = tmp_path / "ddp"
    proc = run(train_cmd([*BASE, "--max-steps", "6", "--out", str(out), "--train.trackers", "tensorboard"], nproc=2,
                         port=30901), timeout=300)
    assert read_json(out / "env.json")["world_size"] == 2 and read_json(out / "summary.json")["world_size"] == 2
    assert len(_event_files(out)) == 2, _event_files(out)  # rank 0's scalars + its hparams; nothing from rank 1
    assert "Traceback" not in proc.stderr
    _assert_same(_tensorboard_scalars(_scalar_file(out)), _expected(out))


# --------------------------------------------------------------------------------------------- mlflow
def test_mlflow_local_file_store_read_back(tmp_path, skip_or_fail):
    _need("mlflow", skip_or_fail)
    out = tmp_path / "run"
    env = cpu_env(MLFLOW_ALLOW_FILE_STORE="true")  # for the reader below; the run sets it for itself
    env.pop("MLFLOW_TRACKING_URI", None)
    run_env = {k: v for k, v in env.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    run(train_cmd([*BASE, "--max-steps", "6", "--out", str(out), "--train.trackers", "mlflow"]), timeout=300,
        env=run_env)
    store = out / trackers.LOG_DIR / "mlruns"
    script = ("import json, sys, mlflow\n"
              "c = mlflow.tracking.MlflowClient(sys.argv[1])\n"
              "[r] = c.search_runs([c.get_experiment_by_name('cnnscale').experiment_id])\n"
              "hist = {k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)]\n"
              "        for k in r.data.metrics}\n"
              "print(json.dumps({'metrics': hist, 'params': r.data.params, 'name': r.info.run_name}))\n")
    proc = run([PY, "-c", script, store.as_uri()], timeout=120, env=env)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    _assert_same({k: [tuple(x) for x in v] for k, v in rec["metrics"].items()}, _expected(out))
    assert rec["name"] == "run" and rec["params"]["model.name"] == "lenet5" and rec["params"]["train.max_steps"] == "6"
