"""The report's inputs: run records found under the roots, their settings label, the model's size and FLOPs as the
records state them, the study's all-reduce fit and the interconnect to predict on.

Only files are read (:mod:`cnnscale.records.run`); nothing here builds a model or imports torch. A record that does
not say its model's parameters or FLOPs (records from before env.json carried them) gives None, and the figure
that needs it is "n/a", with one warning naming the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records.io import read_json
from cnnscale.records.run import Run, find_runs, liveness, load_run
from cnnscale.report.lenient import read_leniently, sanitize
from cnnscale.scaling import model as scaling

__all__ = ["load_records", "run_status", "status_note",
           "settings_label", "find_fits", "pick_interconnect", "run_params", "run_train_flops",
           "run_model", "run_world_size", "ALLREDUCE_FIT", "CONFIG_KEYS"]

ALLREDUCE_FIT = "allreduce.json"
CONFIG_KEYS = ("dist",)
"""The config.yaml sections the report reads (parsing only these keeps 1,000 runs fast)."""


def run_model(run: Run) -> str | None:
    """The run's model name: from summary.json, else the study's point, else env.json."""
    names = (run.summary.model if run.summary else None, run.point.model if run.point else None, run.env.model)
    return next((n for n in names if isinstance(n, str)), None)


def run_world_size(run: Run) -> int | None:
    """The run's world size: from summary.json, else the study's point, else env.json."""
    sizes = (run.summary.world_size if run.summary else None, run.point.world_size if run.point else None,
             run.env.world_size)
    return next((n for n in sizes if n is not None), None)


def run_status(run: Run) -> str:
    """The run's status, with a ``running`` summary told apart: ``running`` while its owner lives, else ``dead``
    (:func:`cnnscale.records.run.liveness`: the run's lock, pid and heartbeat)."""
    status = run.status
    return liveness(run.path) if status == "running" else status


def status_note(run: Run, status: str) -> str | None:
    """One line on why a run that did not end ok has no figures (None for ok, or when its records say why)."""
    s = run.summary
    if status == "running":
        return "still running: no figures yet"
    if status == "dead":
        return ("its process is gone and left no final status (killed, or its machine went down); resume it with "
                f"--resume {run.path}")
    if status == "preempted" and s is not None:
        at = f" at step {s.steps}/{s.total_steps}" if s.steps is not None else ""
        return f"stopped by {s.signal or 'a signal'}{at}" + (f"; resume with {s.resume}" if s.resume else "")
    return None


def _load(path: Path) -> tuple[Run | None, list[str]]:
    """One run directory, never raising: the run and notes on what was odd or left out, or None and the warning
    that says why it is skipped."""
    try:
        run, notes = load_run(path, config_keys=CONFIG_KEYS), []
    except UserError as exc:  # a record from a newer cnnscale: none of its figures can be trusted
        return None, [f"skipped {exc}"]
    except (ValueError, OSError) as exc:  # a corrupt file or one odd value: keep what can be read
        run, notes = read_leniently(path, CONFIG_KEYS)
        if run is None:
            return None, [f"skipped {exc}"]
    run, more = sanitize(run)
    notes += more
    ws = run_world_size(run)
    if run_model(run) is None or ws is None or ws < 1:
        return None, [f"skipped {path}: " + "; ".join([*notes, "no model, or no world size of at least 1"])]
    return run, notes


def load_records(roots: list[str | Path]) -> tuple[list[Run], list[str]]:
    """Every readable run under ``roots`` and a warning per skipped directory, or per odd value in a kept one.

    Never raises on a record: a corrupt or partial directory, a value that does not fit its field (``"img_per_s":
    "fast"``, NaN, ``"world_size": 0``) or a record from a newer cnnscale is one warning naming the run
    (:mod:`cnnscale.report.lenient`). max_batch search probes (point settings ``probe``) are not points of the study
    and are left out. UserError only when no run at all could be read.
    """
    runs, warns = [], []
    for path in find_runs(roots):
        run, notes = _load(path)
        if run is None:
            warns += notes
            continue
        if notes:
            warns.append(f"{path}: {'; '.join(notes)}")
        if run.point is not None and run.point.settings == "probe":
            continue
        runs.append(run)
    if not runs:
        why = f" ({len(warns)} skipped: {warns[0]})" if warns else ""
        raise UserError(f"no runs found in {', '.join(map(str, roots))}{why}")
    return runs, warns


def settings_label(run: Run) -> str:
    """The study's settings variant name, else one derived from non-default DDP settings in config.yaml."""
    if run.point is not None and run.point.settings:
        return run.point.settings
    if run.summary is not None and run.summary.runner == "bench_ddp_bare":
        return "bare_ddp"
    dist = run.config.get("dist") or {}
    parts = [f"zero{run.env.zero_stage}"] if run.env.zero_stage is not None else []
    if dist.get("comm_hook", "none") != "none":
        parts.append(f"hook={dist['comm_hook']}")
    if dist.get("bucket_mb", 25) != 25:
        parts.append(f"bucket={dist['bucket_mb']}MB")
    if dist.get("static_graph"):
        parts.append("static_graph")
    if dist.get("compute_only"):
        parts.append("compute_only")
    return ",".join(parts) or "default"


def run_params(run: Run) -> int | None:
    """Parameters of the run's model as its records state them (env.json, else summary.json), or None."""
    s = run.summary
    for n in (run.env.params, s.params if s else None, run.env.param_count):
        if n:
            return int(n)
    return None


def run_train_flops(run: Run) -> float | None:
    """Training FLOPs (forward + backward) of one image as the records state them, or None."""
    for flops in (run.env.train_flops_per_img, run.env.flops_per_img):
        if flops:
            return float(flops)
    if run.summary is not None and run.summary.gflops_per_img:
        return float(run.summary.gflops_per_img) * 1e9
    return None


def find_fits(roots: list[str | Path], runs: list[Run]) -> dict[str, dict[str, Any]]:
    """``allreduce.json`` benchmark fits by directory: in each root and in each run's parent (a study directory)."""
    fits: dict[str, dict[str, Any]] = {}
    for d in {Path(r) for r in roots} | {Path(run.path).parent for run in runs}:
        f = d / ALLREDUCE_FIT
        if f.is_file():
            try:
                fits[str(d.resolve())] = read_json(f)
            except (OSError, ValueError):
                continue
    return fits


def pick_interconnect(run: Run, fits: dict[str, dict[str, Any]], name: str | None) -> scaling.Interconnect:
    """``name`` if given; else the run's study fit on CPU ("measured"), else a preset for the run's hardware."""
    fit = fits.get(str(Path(run.path).parent.resolve()))
    if name == "measured" or (name is None and fit and fit.get("device_type", "cpu") == run.env.device_type):
        if not fit:
            raise UserError(f"--interconnect measured: no {ALLREDUCE_FIT} beside {run.path}")
        return scaling.interconnect_from_fit(fit)
    if name:
        return scaling.get_interconnect(name)
    if (run.env.device_type or "cpu") != "cuda":
        return scaling.PRESETS["cpu-shm"]
    return scaling.PRESETS["ib-hdr" if (run.env.num_nodes or 1) > 1 else "nvlink"]
