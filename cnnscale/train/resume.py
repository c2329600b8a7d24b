"""``--resume DIR``: the run in DIR, continued. Torch-free (``cnnscale train`` resolves it before importing torch).

- The base is ``DIR/config.yaml``; ``--config FILE`` and flags beside ``--resume`` override only what they name
  (``--max-steps`` / ``--epochs`` extend the run, ``--data-dir`` moves the data). Naming only one of
  ``--max-steps`` and ``--epochs`` clears the other, so ``--epochs 3`` on a ``--max-steps 10`` run means 3 epochs.
- A value that contradicts what the checkpoint holds or how its data stream was cut (:data:`FIXED`: the model, the
  optimiser and schedule, the batch, the precision, the seed, the data set) is one line naming both values.
- A finished run (summary ``ok``) resumed without extending it is a no-op: one line, nothing written.
- ``--out`` beside ``--resume`` must name the same directory (SLURM's requeue and a study pass both).
The LR schedule of an extended run: :mod:`cnnscale.train.schedule` (its module docstring states the rule).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cnnscale.config import SECTIONS, Config, apply_overrides, config_from_args, load_yaml, train_parser
from cnnscale.errors import UserError
from cnnscale.records.io import CONFIG, SUMMARY, read_json
from cnnscale.records.run import checkpoint_dirs, holds_run

__all__ = ["resume_config", "check_resume", "finished_message", "refusal", "fresh_run_refusal", "FIXED", "LENGTH"]

FIXED = ("model.*", "optim.*", "sched.*", "data.name", "data.val_size", "data.synthetic_size", "data.limit_train",
         "train.micro_batch", "train.grad_accum", "train.mixed_precision", "train.seed")
"""Fields a resume may not change (``section.*``: the whole section): the checkpoint holds the model's and the
optimiser's state, and the data position (epoch, micro-batches consumed) means something only for the same stream."""
LENGTH = ("train.epochs", "train.max_steps")
"""The run's length: what a resume may extend."""


def _known(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A saved config as overrides, keeping only sections and keys this version knows (older runs load)."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        vals = raw.get(name)
        if isinstance(vals, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            out[name] = {k: v for k, v in vals.items() if k in known}
    return out


def _run_base(run_dir: Path) -> dict[str, dict[str, Any]]:
    if not run_dir.is_dir():
        raise UserError(f"--resume: no such run directory: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        if not checkpoint_dirs(run_dir):
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        raise UserError(f"--resume: {run_dir} holds no run (no {CONFIG}); start it with --out {run_dir}")
    return _known(load_yaml(run_dir / CONFIG))


def _value(cfg: Config, dotted: str) -> Any:
    sec, _, fld = dotted.partition(".")
    return getattr(getattr(cfg, sec), fld)


def _fixed_fields() -> list[str]:
    out = []
    for spec in FIXED:
        sec, _, fld = spec.partition(".")
        names = [f.name for f in dataclasses.fields(SECTIONS[sec])] if fld == "*" else [fld]
        out += [f"{sec}.{n}" for n in names]
    return out


def check_resume(cfg: Config, run_cfg: Config | None = None) -> list[str]:
    """The changes of ``cfg`` against the run it resumes (``run_cfg``, else ``cfg.train.resume``'s config.yaml), as
    ``field old -> new`` strings for the fields that may change; a change to a :data:`FIXED` field is a UserError
    naming both values. Cost: one small YAML file."""
    run_dir = Path(cfg.train.resume)
    if run_cfg is None:
        run_cfg = apply_overrides(Config(), _run_base(run_dir), str(run_dir / CONFIG))
    for name in _fixed_fields():
        old, new = _value(run_cfg, name), _value(cfg, name)
        if old != new:
            raise UserError(f"--resume {run_dir}: {name} {new!r} contradicts the run's {name} {old!r} (what its "
                            "checkpoint holds); drop the flag, or start a new run with --out")
    changed = []
    for f in dataclasses.fields(Config):
        for g in dataclasses.fields(getattr(cfg, f.name)):
            name = f"{f.name}.{g.name}"
            if name in ("train.resume", "train.out"):
                continue
            old, new = _value(run_cfg, name), _value(cfg, name)
            if old != new:
                changed.append(f"{name} {old!r} -> {new!r}")
    return changed


def resume_config(argv: list[str]) -> Config:
    """The :class:`Config` of training flags ``argv`` (``--help`` prints them and exits 0). With ``--resume DIR``:
    DIR/config.yaml < ``--config FILE`` < flags, checked by :func:`check_resume`; without, :func:`load_config`'s."""
    parser = train_parser()
    ns = parser.parse_args(list(argv))
    flags = parser.overrides(ns, SECTIONS)
    tflags = flags.get("train", {})
    resume, out = tflags.get("resume", ""), tflags.get("out", "")
    if not resume:
        return config_from_args(ns, parser)
    if resume == "auto":
        if not out:
            raise UserError("--resume without a directory resumes --out: give --resume RUN_DIR or --out RUN_DIR")
        resume = out
    if out and Path(out).resolve() != Path(resume).resolve():
        raise UserError(f"--resume {resume} continues that run in place; --out {out} names another directory "
                        "(drop --out, or start a new run with --out alone)")
    run_dir = Path(resume)
    base = _run_base(run_dir)
    run_cfg = apply_overrides(Config(), base, str(run_dir / CONFIG))
    named = set(tflags) | set((load_yaml(ns.config).get("train") or {}) if getattr(ns, "config", None) else ())
    train = {**base.get("train", {}), "resume": resume, "out": str(run_dir)}
    for one, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
        if one in named and other not in named:
            train[other] = 0
    layered = {**base, "train": train}
    if getattr(ns, "config", None):
        for sec, vals in load_yaml(ns.config).items():
            layered[sec] = {**layered.get(sec, {}), **vals} if isinstance(vals, dict) else vals
        ns.config = None  # applied above, between the run's config and the flags
    cfg = config_from_args(ns, parser, overrides=layered)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=str(run_dir), out=str(run_dir)))
    check_resume(cfg, run_cfg)
    return cfg


def finished_message(cfg: Config) -> str | None:
    """One line when ``cfg`` resumes a finished run (summary ``ok``) without changing its length, else None; then
    the resume is a no-op and the run's records stay as they are."""
    run_dir = Path(cfg.train.resume)
    try:
        summary = read_json(run_dir / SUMMARY)
        saved = load_yaml(run_dir / CONFIG).get("train") or {}
    except (OSError, ValueError, UserError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "ok":
        return None
    if any(saved.get(k.split(".")[1]) != _value(cfg, k) for k in LENGTH):
        return None
    return (f"run {run_dir} is already finished (status ok, {summary.get('steps')} steps): nothing to do; "
            "extend it with --max-steps N or --epochs N")


def refusal(run_dir: Path) -> str:
    """The one line refusing a fresh run into ``run_dir``, which holds a run."""
    return (f"{run_dir} already holds a run: continue it with --resume {run_dir}, or start over with --overwrite "
            f"(moves the old run aside to {run_dir}.old-<time>)")


def fresh_run_refusal(cfg: Config) -> str | None:
    """:func:`refusal` when ``cfg`` starts a fresh run (no ``--resume``, no ``--overwrite``) into an ``--out`` that
    holds a run, else None: answered before torch is imported (the trainer checks again under the run's lock)."""
    t = cfg.train
    if t.resume or t.overwrite or not t.out or not holds_run(Path(t.out)):
        return None
    return refusal(Path(t.out))
