"""Experiment trackers (TensorBoard, MLflow, W&B, ...) through Accelerate's ``log_with``, on the main process only.

``--train.trackers tensorboard[,mlflow,wandb,...]`` names them (``train.trackers`` in a YAML file: a list). Then:

- :func:`check_installed` fails the run in one line (exit 2) before anything starts when a named tracker's package
  is missing, listing the choices and which are installed;
- :func:`log_with` and :func:`project_config` are what :func:`cnnscale.train.build.build_accelerator` passes to the
  ``Accelerator``;
- :func:`start` (from :class:`cnnscale.train.rundir.RunFiles`, main process only) points the Accelerator's
  ``project_dir`` at the run directory and calls ``init_trackers`` with the resolved config, flattened to
  ``section.field`` keys, as the hyperparameters;
- :func:`log` sends each metrics.jsonl record to the trackers: the same step and the same keys, except values that
  are null in the record (a GPU figure on CPU), since a tracker has no "n/a";
- ``accelerator.end_training()`` (at the end of every run, on every path) closes them.

Layout: ``RUN/trackers`` is the Accelerator's ``logging_dir``.

- TensorBoard: ``RUN/trackers/cnnscale/``, the scalars' event file, and the hyperparameters in a sub-directory of
  their own (``SummaryWriter.add_hparams`` writes them so); ``tensorboard --logdir runs/`` shows every run.
- MLflow: a local file store ``RUN/trackers/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set. MLflow 3.x keeps its
  file store in maintenance mode, so ``MLFLOW_ALLOW_FILE_STORE=true`` is set for it (its SQL store needs SQLAlchemy).
- W&B: ``RUN/trackers/wandb`` (``WANDB_MODE=offline`` keeps it local).

Cost: a tracker's ``log`` runs on the main process at log steps only; TensorBoard's writer flushes the file each time
(a few hundred microseconds). A resumed run appends a new event file in the same directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import ProjectConfiguration, imports

from cnnscale.config import Config, TrainConfig, config_to_dict, show_default
from cnnscale.config.sections import TRACKERS
from cnnscale.errors import UserError

__all__ = ["TRACKERS", "PROJECT", "LOG_DIR", "installed", "check_installed", "log_with", "project_config", "start",
           "hparams", "log", "tracker_values"]

PROJECT = "cnnscale"
"""The project name given to ``init_trackers``: TensorBoard's sub-directory, MLflow's experiment, W&B's project."""
LOG_DIR = "trackers"
"""The Accelerator's ``logging_dir`` inside the run directory."""

_AVAILABLE: dict[str, Callable[[], bool]] = {
    "tensorboard": imports.is_tensorboard_available, "mlflow": imports.is_mlflow_available,
    "wandb": imports.is_wandb_available, "comet_ml": imports.is_comet_ml_available,
    "aim": imports.is_aim_available, "clearml": imports.is_clearml_available,
    "dvclive": imports.is_dvclive_available, "swanlab": imports.is_swanlab_available,
    "trackio": imports.is_trackio_available,
}
_EXTRAS = {"tensorboard": "cnnscale[tensorboard]", "mlflow": "cnnscale[mlflow]", "wandb": "cnnscale[wandb]"}
_USER_MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI")  # the user's own store, if any, wins over the run's


def installed() -> list[str]:
    """The trackers whose package is importable here (a metadata look-up each, no import)."""
    return [name for name in TRACKERS if _AVAILABLE[name]()]


def check_installed(names: Sequence[str]) -> None:
    """One-line :class:`UserError` naming the first tracker in ``names`` that is not installed, how to install it, and
    the choices. Accelerate itself would only log the missing one at debug level and train without it."""
    for name in names:
        if not _AVAILABLE[name]():
            have = ", ".join(installed()) or "none"
            raise UserError(f"train.trackers: {name!r} is not installed (pip install '{_EXTRAS.get(name, name)}'; "
                            f"installed here: {have}; choose from: {', '.join(TRACKERS)})")


def log_with(tcfg: TrainConfig) -> list[str] | None:
    """``Accelerator(log_with=...)``: the named trackers, or None (no tracker, Accelerate's default)."""
    return list(tcfg.trackers) or None


def project_config(tcfg: TrainConfig) -> ProjectConfiguration:
    """``Accelerator(project_config=...)``. With trackers, ``project_dir`` is the run directory when it is known before
    the process group starts (``--out`` or ``--resume``), else the provisional ``runs``: TensorBoard's tracker needs a
    ``logging_dir`` at construction, and the default run name is chosen by rank 0 later. :func:`start` points both at
    the resolved directory before any tracker opens a file. Without trackers: Accelerate's default (no directory)."""
    if not tcfg.trackers:
        return ProjectConfiguration()
    run_dir = Path(tcfg.resume or tcfg.out or "runs")
    return ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOG_DIR))


def hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """The resolved config as flat hyperparameters, ``{"train.lr": 0.1, ...}``; a value that is not a bool, number or
    string (a list, a null) as it would be typed on the command line (``[100.0, 150.0]``, ``null``), since
    TensorBoard's ``add_hparams`` takes scalars and strings only."""
    out: dict[str, bool | int | float | str] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            keep = isinstance(value, bool | int | float | str)
            out[f"{section}.{key}"] = value if keep else show_default(value)
    return out


def start(accelerator: Any, run_dir: Path, cfg: Config) -> None:
    """Open the trackers of ``cfg.train.trackers`` in ``run_dir`` and store ``hparams(cfg)``. Call on the main process
    only (the trackers' own ``start`` is main-only too); a no-op without trackers."""
    if not cfg.train.trackers:
        return
    logging_dir = Path(run_dir) / LOG_DIR
    accelerator.project_configuration.project_dir = str(run_dir)
    accelerator.project_configuration.logging_dir = str(logging_dir)
    kwargs: dict[str, dict[str, Any]] = {}
    if "mlflow" in cfg.train.trackers:
        # MLflow reads the variables when the tracker starts (setting them here needs no import of mlflow).
        os.environ["MLFLOW_TRACKING_URI"] = _USER_MLFLOW_URI or (logging_dir / "mlruns").absolute().as_uri()
        if _USER_MLFLOW_URI is None:  # MLflow 3.x refuses a file store unless asked (its SQL store needs SQLAlchemy)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        kwargs["mlflow"] = {"run_name": Path(run_dir).name}
    if "wandb" in cfg.train.trackers:
        logging_dir.mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {"name": Path(run_dir).name, "dir": str(logging_dir)}
    accelerator.init_trackers(PROJECT, config=hparams(cfg), init_kwargs=kwargs)


def tracker_values(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """``(step, values)`` of one metrics.jsonl record as the trackers get it: every key but ``step``, whose value is a
    number (bools as 0/1); null values left out."""
    values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}
    return int(record["step"]), values


def log(accelerator: Any, record: dict[str, Any]) -> None:
    """Send one metrics.jsonl record to the trackers (``accelerator.log`` is main-only; no trackers: nothing)."""
    if accelerator.trackers:
        step, values = tracker_values(record)
        accelerator.log(values, step=step)
