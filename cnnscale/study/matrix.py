"""A study's matrix: :class:`Point` (one run), :func:`expand` (every point of a spec), and each point's trainer
arguments. Pure functions of the spec: nothing here launches, reads or writes anything.

Batch rules. Weak: each point runs ``micro_batch`` per process and ``grad_accum`` (default 1), so
``global_batch = micro_batch x grad_accum x N`` grows with N. Strong: ``global_batch`` G is fixed and
``micro_batch = G / (N x grad_accum)``; while that exceeds ``max_micro_batch`` (when set, or the max_batch search's
result), ``grad_accum`` doubles. G must divide exactly, and a micro-batch under ``min_micro_batch`` is an error.

A settings variant may list the world sizes it runs at (``world_sizes: [2, 4]``, a subset of the study's: a DDP
communication setting changes nothing at world size 1) and the network profiles (``networks: [200mbit]``), and may
name its own launch target with ``script:``: a module (started with ``-m``, e.g. the default ``cnnscale.train``) or
a ``.py`` path, relative to the directory the study runs from (``launch/bench_ddp_bare.py`` from a checkout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.study.launcher import TRAIN_MODULE, is_script
from cnnscale.study.spec import ModelSpec, StudySpec, strong_batch

__all__ = ["Point", "expand", "point_args", "check_targets"]

_GA = "train.grad_accum"
_WS = "world_sizes"  # a settings variant's own world sizes (a subset of the study's), e.g. no world size 1
_NETS = "networks"  # a settings variant's own network profiles (a subset of the study's)


@dataclass(frozen=True)
class Point:
    """One run of a study: a model at a world size, precision, batch and settings variant."""

    model: str
    world_size: int
    precision: str
    micro_batch: int
    grad_accum: int
    max_steps: int
    settings: str = "default"
    overrides: tuple[tuple[str, Any], ...] = ()
    script: str = TRAIN_MODULE
    """The launch target: a module (started with ``-m``) or a ``.py`` script path."""
    scaling: str = "weak"
    repeat: int = 0
    """Which run of the point this is (0 .. repeats - 1); not part of :attr:`id`."""
    repeats: int = 1
    """How many runs the point has (the study's ``repeats``, or its ``repeats_at`` for this world size); not part
    of :attr:`id`."""
    network: str = ""
    """The network profile it runs under (``1gbit``; see :mod:`cnnscale.lab.shape`), "" for none: a point of a
    study without networks, a world-size-1 baseline, or a compute_only calibration (which runs in the lab's
    namespaces unshaped when the study has a lab)."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def id(self) -> str:
        ga = f"-ga{self.grad_accum}" if self.grad_accum > 1 else ""
        st = "" if self.settings == "default" else f"-{self.settings}"
        net = f"-{self.network}" if self.network else ""
        return f"{self.model}-ws{self.world_size}-{self.precision}-mb{self.micro_batch}{ga}{st}{net}"

    @property
    def run_name(self) -> str:
        """The run directory's name: :attr:`id` for repeat 0 (so studies made before repeats resume), else
        ``<id>-r<repeat>``."""
        return self.id if self.repeat == 0 else f"{self.id}-r{self.repeat}"


def _cli_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def point_args(p: Point, spec: StudySpec, run_dir: Path, resume: bool = False) -> list[str]:
    """The trainer's command-line arguments of a point; ``resume``: carry on from ``run_dir``'s checkpoint
    (``--resume RUN_DIR`` in place of ``--out RUN_DIR``, the other flags the same)."""
    args = ["--model", p.model, "--data", spec.data, "--max-steps", str(p.max_steps), "--micro-batch",
            str(p.micro_batch), "--grad-accum", str(p.grad_accum), "--mixed-precision", p.precision,
            "--resume" if resume else "--out", str(run_dir), "--train.progress", "plain"]
    for key, value in p.overrides:
        args += [f"--{key}", _cli_value(value)]
    return args


def _variant(spec: StudySpec, sdict: dict[str, Any]) -> tuple[str, int, tuple[tuple[str, Any], ...]]:
    """(launch target, grad_accum, overrides) of a settings variant."""
    script = str(sdict.get("script", TRAIN_MODULE))
    ga = int(sdict.get(_GA, spec.grad_accum))  # a batch setting changes the point, not a flag
    over = tuple(spec.overrides) + tuple((k, v) for k, v in sdict.items() if k not in ("script", _GA, _WS, _NETS))
    return script, ga, over


def _sizes(spec: StudySpec, sdict: dict[str, Any]) -> tuple[int, ...]:
    """The study's world sizes that a variant runs: those it lists under ``world_sizes`` (default: all)."""
    own = sdict.get(_WS)
    return tuple(n for n in spec.world_sizes if own is None or n in own)


def _networks(spec: StudySpec, sdict: dict[str, Any], n: int) -> tuple[str, ...]:
    """The network axis of one (variant, world size): every profile of the study at N >= 2; no network ("") at
    N = 1 (one baseline shared by every profile), for a compute_only calibration (nothing is communicated), and in
    a study without networks."""
    if n == 1 or not spec.profiles or sdict.get("dist.compute_only"):
        return ("",)
    own = sdict.get(_NETS)
    return tuple(r for r in spec.profiles if own is None or r in own)


def _weak_points(spec: StudySpec, m: ModelSpec, max_micro: int | None, variant: tuple[str, dict[str, Any]],
                 prec: str) -> list[Point]:
    sname, sdict = variant
    steps = m.max_steps or spec.max_steps
    script, ga, over = _variant(spec, sdict)
    batches = (max_micro,) if max_micro else (m.micro_batches or spec.micro_batches)
    return [Point(m.name, n, prec, mb, ga, steps, sname, over, script, network=net)
            for mb in batches for n in _sizes(spec, sdict)
            if not (sdict.get("dist.compute_only") and n == 1)  # a calibration run: nothing to leave out at 1
            for net in _networks(spec, sdict, n)]


def _strong_points(spec: StudySpec, m: ModelSpec, max_micro: int | None, variant: tuple[str, dict[str, Any]],
                   prec: str) -> list[Point]:
    sname, sdict = variant
    steps = m.max_steps or spec.max_steps
    script, ga, over = _variant(spec, sdict)
    gb = m.global_batch or spec.global_batch
    cap = max_micro or spec.max_micro_batch
    points = []
    for n in _sizes(spec, sdict):
        mb, ga_n = strong_batch(gb, n, ga, cap, spec.min_micro_batch)
        points += [Point(m.name, n, prec, mb, ga_n, steps, sname, over, script, "strong", network=net)
                   for net in _networks(spec, sdict, n)]
    return points


def expand(spec: StudySpec, max_batches: dict[str, int] | None = None) -> list[Point]:
    """Every point of the matrix, model-major, world size then network profile innermost, then the whole matrix
    again for each further repeat (round-robin: never one point K times in a row, so drift of the machine falls on
    every point alike); a point with fewer runs (``repeats_at``) drops out of the later passes. A model with
    ``settings: [..]`` runs only those variants. ``max_batches``: model -> found micro-batch.

    Raises UserError when the batch rules fail or two points would share an id."""
    build = _weak_points if spec.scaling == "weak" else _strong_points
    points: list[Point] = []
    for m in spec.models:
        max_micro = (max_batches or {}).get(m.name)
        for variant in spec.settings:
            if m.settings and variant[0] not in m.settings:
                continue
            for prec in spec.precisions:
                points += build(spec, m, max_micro, variant, prec)
    ids = [p.id for p in points]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"{spec.source}: the matrix repeats points {', '.join(dup)}")
    return [replace(p, repeat=k, repeats=spec.repeats_for(p.world_size)) for k in range(spec.max_repeats)
            for p in points if k < spec.repeats_for(p.world_size)]


def check_targets(spec: StudySpec, points: list[Point]) -> None:
    """Fail before launching anything when a settings variant's ``script`` path does not exist here."""
    missing = sorted({p.script for p in points if is_script(p.script) and not Path(p.script).is_file()})
    if missing:
        raise UserError(f"{spec.source}: script {missing[0]!r} not found (relative to {Path.cwd()}); give a path "
                        "that exists or a module name such as cnnscale.train")
