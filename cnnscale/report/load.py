"""The report's inputs: run records found under the roots, their settings label, the model's size and FLOPs as the
records state them, the study's all-reduce fit and the interconnect to predict on.

Only files are read (:mod:`cnnscale.records.run`); nothing here builds a model or imports torch. A record that does
not say its model's parameters or FLOPs (records from before env.json carried them) gives None, and the figure
that needs it is "n/a", with one warning naming the run.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records.io import read_json
from cnnscale.records.run import Run, find_runs, liveness, load_run
from cnnscale.report.lenient import read_leniently, sanitize
from cnnscale.scaling import model as scaling

__all__ = ["load_records", "run_status", "status_note",
           "settings_label", "find_fits", "pick_interconnect", "run_params", "run_train_flops",
           "run_model", "run_world_size", "run_network", "network_record", "lab_fit", "profile_preset",
           "profile_rate_bps", "profile_order",
           "ALLREDUCE_FIT", "LAB_FIT", "LAB_WEIGHT_POWER", "CONFIG_KEYS"]

ALLREDUCE_FIT = "allreduce.json"
LAB_FIT = "allreduce-{profile}-ws{n}.json"
"""The lab's all-reduce fit of one network profile at one world size, in the study directory."""
LAB_WEIGHT_POWER = 1.0
"""The lab's α-β fits weight each size by 1/t (:func:`cnnscale.scaling.model.fit_alpha_beta`): a shaped link's
small messages are erratic (1-4 ms at 1-64 KiB under tbf at 200mbit), and a relative-error fit that follows them
misses the 16 MiB all-reduce by 30%; weighted by 1/t it stays within 5% from 1 MiB up, where the buckets are."""
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


def run_network(run: Run) -> str:
    """The run's network profile (the lab's ``network`` axis), "" for none: point.json's when the run is a study's
    point (a lab's compute_only calibration runs in the namespaces unshaped, but has no network axis), else
    env.json's."""
    if run.point is not None:
        prof = getattr(run.point, "network", None)
    else:
        prof = network_record(run).get("profile")
    return prof if isinstance(prof, str) else ""


def network_record(run: Run) -> dict[str, Any]:
    """env.json's ``network`` record (profile, rate, measured link), or {} when the run has none."""
    rec = getattr(run.env, "network", None)
    return rec if isinstance(rec, dict) else {}


def find_fits(roots: list[str | Path], runs: list[Run]) -> dict[str, dict[str, Any]]:
    """``allreduce.json`` benchmark fits by directory: in each root and in each run's parent (a study directory);
    and the lab's per-profile, per-N fits (``allreduce-<profile>-ws<N>.json``) by their resolved file path."""
    fits: dict[str, dict[str, Any]] = {}
    for d in {Path(r) for r in roots} | {Path(run.path).parent for run in runs}:
        found = [(str(d.resolve()), d / ALLREDUCE_FIT)] if (d / ALLREDUCE_FIT).is_file() else []
        found += [(str(f.resolve()), f) for f in sorted(d.glob("allreduce-*-ws*.json"))] if d.is_dir() else []
        for key, f in found:
            try:
                fits[key] = read_json(f)
            except (OSError, ValueError):
                continue
    return fits


def lab_fit(run: Run, fits: dict[str, dict[str, Any]], profile: str, n: int) -> dict[str, Any] | None:
    """The lab's all-reduce fit of ``profile`` at world size ``n`` beside ``run`` (its study directory), or None."""
    if not profile:
        return None
    fit = fits.get(str((Path(run.path).parent / LAB_FIT.format(profile=profile, n=n)).resolve()))
    return fit if fit and fit.get("sizes_bytes") and fit.get("times_s") else None


def profile_rate_bps(profile: str) -> float | None:
    """The rate a profile's name states (``200mbit`` -> 2e8 bits/s), None for ``unshaped`` or another name."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg])bit", profile)
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] if m else None


def profile_order(profiles: set[str] | list[str]) -> list[str]:
    """Profiles fastest first (``unshaped`` before any rate, names without a rate last, by name)."""
    def key(p: str) -> tuple:
        rate = profile_rate_bps(p)
        return (0 if p == "unshaped" else 1 if rate else 2, -(rate or 0.0), p)
    return sorted(set(profiles), key=key)


def profile_preset(run: Run, profile: str) -> scaling.Interconnect:
    """The "preset" of a lab profile with no all-reduce fit: the link env.json measured (bandwidth, half the
    round trip), else the profile's rate at 90% (one-way latency 50 µs); cpu-shm for an unshaped link."""
    rec = network_record(run)
    measured = rec.get("measured") if isinstance(rec.get("measured"), dict) else {}
    bw, rtt = measured.get("bandwidth_Bps"), measured.get("rtt_s")
    rate = rec.get("rate_bps") or profile_rate_bps(profile)
    if not bw and rate:
        bw = 0.9 * float(rate) / 8
    if not bw:
        return replace(scaling.PRESETS["cpu-shm"], name=f"{profile}:preset")
    lat = float(rtt) / 2 if rtt else 50e-6
    return scaling.Interconnect(f"{profile}:preset", float(bw), lat, 0.0, f"preset from the {profile} link")


def pick_interconnect(run: Run, fits: dict[str, dict[str, Any]], name: str | None) -> scaling.Interconnect:
    """``name`` if given; else, for a lab run (a network profile), the fit of its own profile and N
    (``<profile>:fitted``) or the profile's preset (``<profile>:preset``); else the run's study fit on CPU
    ("measured"), else a preset for the run's hardware."""
    profile = run_network(run)
    if name is None and profile:
        n = run_world_size(run) or 1
        fit = lab_fit(run, fits, profile, n)
        if fit:
            ic = scaling.interconnect_from_fit({**fit, "world_size": fit.get("world_size", n)},
                                               weight_power=LAB_WEIGHT_POWER)
            return replace(ic, name=f"{profile}:fitted")
        return profile_preset(run, profile)
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
