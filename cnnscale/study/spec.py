"""A study file, validated: :class:`StudySpec` from YAML, and the strong-scaling batch rule.

See :mod:`cnnscale.study.local` for the file format. Like the run config, a study is a frozen dataclass with a
docstring per field, its values converted by the one coercion (:func:`cnnscale.config.coerce.from_mapping`) and its
ranges and choices declared beside each field (:func:`cnnscale.config.ranges.setting`) and checked by the one
validator (``__post_init__`` holds only the cross-field rules). Every error names the file and, where there are
any, the valid choices; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from cnnscale.config import DATASETS, PRECISIONS, coerce, field_types, from_mapping, load_yaml
from cnnscale.config.ranges import RANGE, Range, check_fields, check_value, setting, short
from cnnscale.errors import UserError
from cnnscale.lab.shape import parse_profile
from cnnscale.records.schema import SCALINGS
from cnnscale.study.launcher import LAUNCHERS

__all__ = ["StudySpec", "ModelSpec", "load_spec", "parse_spec", "strong_batch", "SCALINGS", "SPEC_KEYS",
           "MODEL_KEYS"]

def _fail(src: str, msg: str) -> UserError:
    return UserError(f"{src}: {msg}")


def _required(**rules: Any) -> Any:
    """A required field (no default) with its :class:`Range`."""
    return field(default=MISSING, metadata={RANGE: Range(**rules)})


@dataclass(frozen=True)
class ModelSpec:
    """One model of a study: a name, or a mapping that also overrides some of the study's values for it."""

    name: str = _required(min_len=1, max_len=100)
    """Registered model name (``cnnscale models`` lists them)."""
    micro_batches: tuple[int, ...] = setting((), ge=1, cap=65536)
    """Overrides the study's micro_batches for this model (weak scaling); () keeps the study's."""
    global_batch: int = setting(0, ge=0, cap=2**24)
    """Overrides the study's global_batch for this model (strong scaling); 0 keeps the study's."""
    max_steps: int = setting(0, ge=0, cap=10**9)
    """Overrides the study's max_steps for this model; 0 keeps the study's."""
    settings: tuple[str, ...] = setting((), free="each the name of one of the study's settings variants")
    """The study's settings variants this model runs (e.g. [default, bf16_hook]); () runs them all."""

    def __post_init__(self) -> None:
        check_fields(self, f"model {short(self.name, 60)}: ")


@dataclass(frozen=True)
class StudySpec:
    """A scaling study: models x world sizes x precisions x micro-batches x settings, each point a training run."""

    name: str = _required(min_len=1, max_len=100, free="the default output directory runs/<name>")
    """The study's name (its default output directory is runs/<name>)."""
    models: tuple[ModelSpec, ...] = _required(free="each entry a ModelSpec, checked by itself")
    """The models, in order; at least one."""
    description: str = setting("", max_len=10_000)
    """Free text, shown by --dry-run and kept in study.yaml."""
    scaling: str = setting("weak", choices=SCALINGS)
    """weak (fixed per-process micro-batch) or strong (fixed global batch, split over the world size)."""
    world_sizes: tuple[int, ...] = setting((1, 2), ge=1, cap=65536, nonempty=True)
    """Process counts to run each model at."""
    precisions: tuple[str, ...] = setting(("no",), choices=PRECISIONS, nonempty=True)
    """Mixed-precision modes to run (no, fp16, bf16)."""
    micro_batches: tuple[int, ...] = setting((32,), ge=1, cap=65536, nonempty=True)
    """Weak scaling: images per process per forward/backward, one point each."""
    global_batch: int = setting(0, ge=0, cap=2**24)
    """Strong scaling: images per optimiser step, fixed across world sizes (0: unset)."""
    grad_accum: int = setting(1, ge=1, cap=65536)
    """Micro-batches accumulated per optimiser step (strong scaling doubles it while micro > max_micro_batch)."""
    max_micro_batch: int = setting(0, ge=0, cap=65536)
    """Strong scaling: largest micro-batch before grad_accum doubles (0: no limit)."""
    min_micro_batch: int = setting(1, ge=1, cap=65536)
    """Strong scaling: smallest micro-batch allowed (a world size that needs less is an error)."""
    max_steps: int = setting(20, ge=1, cap=10**9)
    """Optimiser steps per point."""
    repeats: int = setting(1, ge=1, cap=1000)
    """Runs of every point, round-robin (every point once, then every point again): the report's spread."""
    repeats_at: tuple[tuple[int, int], ...] = setting((), free="world sizes and counts checked on load")
    """Per world size, runs instead of ``repeats``: ``repeats_at: {1: 5, 2: 5}`` runs the points of N = 1 and 2
    five times (where a point's spread between launches is widest), the others ``repeats`` times."""
    data: str = setting("synthetic", choices=DATASETS)
    """Data set of every point (cifar10, imagefolder, synthetic)."""
    timeout_s: float = setting(900.0, ge=1, cap=30 * 86400)
    """Seconds a point may run before it is stopped and recorded as timed out."""
    threads_per_process: int = setting(1, ge=0, cap=4096)
    """torch threads per process (0: leave as is)."""
    launcher: str = setting("accelerate", choices=LAUNCHERS)
    """How the local backend starts the processes of a point: accelerate (launch), torchrun, or direct (the study
    starts each rank itself with the env:// rendezvous, no agent process)."""
    overrides: tuple[tuple[str, Any], ...] = setting((), free="each value checked by the training run's config")
    """``section.field: value`` given to every point's training run."""
    settings: tuple[tuple[str, dict[str, Any]], ...] = setting((("default", {}),), free="names checked on load")
    """Named variants, each with its own ``section.field: value`` overrides (or ``script:``), one point each."""
    max_batch: dict[str, int] | None = setting(None, free="start and steps checked on load (MAX_BATCH_RANGE)")
    """Search the largest micro-batch per model first: {start: 1024, steps: 3} (None: no search)."""
    allreduce_bench: bool = setting(True)
    """Time a 2-process all-reduce before the points, to fit the measured interconnect."""
    gpus_per_node: int = setting(0, ge=0, cap=4096)
    """Devices per machine (0: every point runs on this one); the local backend refuses larger world sizes."""
    networks: tuple[str, ...] = setting((), free="each checked by cnnscale.lab.shape.parse_profile")
    """Network profiles, one more matrix axis (unshaped, or a tc rate: 10gbit, 1gbit, 200mbit): every point of world
    size >= 2 runs once per profile, one process per network namespace of the lab (cnnscale.lab); () no lab."""
    network: str = setting("", free="a profile, checked by cnnscale.lab.shape.parse_profile")
    """One network profile, ``network: {profile: 1gbit}`` (or ``network: 1gbit``): the same as a one-item networks."""
    source: str = setting("<study>", free="filled in by the loader")
    """Where the spec came from (the file), named in every error."""
    raw: dict[str, Any] | None = setting(None, free="filled in by the loader")
    """The mapping as read, written back as study.yaml."""

    @property
    def profiles(self) -> tuple[str, ...]:
        """The network profiles of the matrix (``network`` or ``networks``); () when the study has no lab."""
        return self.networks or ((self.network,) if self.network else ())

    def repeats_for(self, world_size: int) -> int:
        """Runs of a point of this world size: ``repeats_at``'s count for it, else ``repeats``."""
        return dict(self.repeats_at).get(world_size, self.repeats)

    @property
    def max_repeats(self) -> int:
        """The most runs of any point (the round-robin's number of passes)."""
        return max([self.repeats, *(k for _, k in self.repeats_at)])

    def __post_init__(self) -> None:
        src = self.source
        if not self.models:
            raise _fail(src, "models must be a non-empty list of names or {name: ..} mappings")
        try:
            check_fields(self)
        except UserError as exc:
            raise _fail(src, str(exc)) from None
        # the cross-field rules
        for key, names in (("networks", self.networks), ("network", (self.network,) if self.network else ())):
            for name in names:
                try:
                    parse_profile(name)
                except UserError as exc:
                    raise _fail(src, f"{key}: {exc}") from None
        if self.network and self.networks:
            raise _fail(src, "give network (one profile) or networks (a list), not both")
        if len(set(self.networks)) != len(self.networks):
            raise _fail(src, f"networks lists a profile twice: {', '.join(self.networks)}")
        extra = [n for n, _ in self.repeats_at if n not in self.world_sizes]
        if extra:
            raise _fail(src, f"repeats_at world sizes {extra} are not among the study's world_sizes "
                        f"{list(self.world_sizes)}")
        variants = [name for name, _ in self.settings]
        for name, over in self.settings:
            for key, mine in (("world_sizes", self.world_sizes), ("networks", self.profiles)):
                extra = [x for x in over.get(key, ()) if x not in mine]
                if extra:
                    raise _fail(src, f"settings.{name}.{key} {extra} are not among the study's {key} {list(mine)}")
        for m in self.models:
            bad = [x for x in m.settings if x not in variants]
            if bad:
                raise _fail(src, f"model {short(m.name, 60)}: settings {short(bad[0])} is not one of the study's "
                            f"settings (choose from: {', '.join(variants)})")
        if self.scaling == "strong" and not self.global_batch and not all(m.global_batch for m in self.models):
            raise _fail(src, "strong scaling needs global_batch (fixed images per optimiser step)")


MAX_BATCH_RANGE = {"start": Range(ge=1, cap=65536), "steps": Range(ge=1, cap=100)}

# the keys a study file may have: every field but the two the loader fills in
SPEC_KEYS = tuple(f.name for f in fields(StudySpec) if f.name not in ("source", "raw"))
MODEL_KEYS = tuple(f.name for f in fields(ModelSpec))


def strong_batch(global_batch: int, world_size: int, grad_accum: int = 1, max_micro: int = 0,
                 min_micro: int = 1) -> tuple[int, int]:
    """(micro_batch, grad_accum) for strong scaling: ``micro = G / (N x grad_accum)``, doubling grad_accum while
    ``micro > max_micro`` (when max_micro > 0). Raises UserError when G does not divide or micro < min_micro."""
    ga = grad_accum
    while True:
        if global_batch % (world_size * ga):
            raise UserError(f"strong scaling: global_batch {global_batch} is not divisible by world size "
                            f"{world_size} x grad_accum {ga}")
        micro = global_batch // (world_size * ga)
        if not max_micro or micro <= max_micro:
            break
        ga *= 2
    if micro < min_micro:
        raise UserError(f"strong scaling: global_batch {global_batch} at world size {world_size} gives micro_batch "
                        f"{micro} < min_micro_batch {min_micro}")
    return micro, ga


def _flatten(src: str, what: str, d: Any, prefix: str = "") -> dict[str, Any]:
    """``{data: {num_workers: 0}}`` and ``{data.num_workers: 0}`` both give ``{"data.num_workers": 0}``."""
    if not isinstance(d, dict):
        raise _fail(src, f"{what} must be a mapping of section.field: value, got {type(d).__name__}")
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(src, what, v, key + "."))
        elif key == "world_sizes" and what.startswith("settings."):  # a variant run at some world sizes only
            flat[key] = coerce(f"{what}.world_sizes", v, tuple[int, ...])
            check_value(f"{what}.world_sizes", flat[key], Range(ge=1, cap=65536, nonempty=True))
        elif key == "networks" and what.startswith("settings."):  # ... or under some network profiles only
            flat[key] = coerce(f"{what}.networks", v, tuple[str, ...])
            check_value(f"{what}.networks", flat[key], Range(nonempty=True))
        elif "." not in key and key != "script":
            raise _fail(src, f"{what} key {short(key)} must be section.field (e.g. dist.comm_hook)")
        else:
            flat[key] = v
    return flat


def _models(src: str, value: Any) -> tuple[ModelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(src, "models must be a non-empty list of names or {name: ..} mappings")
    out = []
    for m in value:
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            raise _fail(src, f"a model entry must be a name or a mapping with 'name', got {short(m)}")
        out.append(from_mapping(ModelSpec, m, src, "models."))
    return tuple(out)


def _settings(src: str, value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    if value is None:
        return (("default", {}),)
    if not isinstance(value, dict) or not value:
        raise _fail(src, "settings must be a mapping of variant name -> overrides")
    out = []
    for name, over in value.items():
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise _fail(src, f"settings name {short(name)} must be letters, digits, '_' or '-'")
        out.append((str(name), _flatten(src, f"settings.{name}", over or {})))
    return tuple(out)


def _max_batch(src: str, value: Any) -> dict[str, int] | None:
    if not value:
        return None
    given = value if isinstance(value, dict) else {}  # `max_batch: true` searches with the defaults
    unknown = sorted(set(given) - {"start", "steps"})
    if unknown:
        raise _fail(src, f"unknown key 'max_batch.{unknown[0]}' (valid keys: start, steps)")
    out = {k: coerce(f"max_batch.{k}", given.get(k, default), int) for k, default in (("start", 1024), ("steps", 3))}
    for k, v in out.items():
        check_value(f"max_batch.{k}", v, MAX_BATCH_RANGE[k])
    return out


def _repeats_at(src: str, value: Any) -> tuple[tuple[int, int], ...]:
    """``repeats_at: {1: 5, 2: 5}`` -> ``((1, 5), (2, 5))``, each world size and count checked."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _fail(src, f"repeats_at must be a mapping of world size: runs (e.g. {{1: 5, 2: 5}}), got {short(value)}")
    out = []
    for n, k in value.items():
        n, k = coerce("repeats_at world size", n, int), coerce(f"repeats_at.{n}", k, int)
        check_value(f"repeats_at.{n}", k, Range(ge=1, cap=1000))
        out.append((n, k))
    return tuple(sorted(out))


def _network(src: str, value: Any) -> Any:
    """``network: {profile: 1gbit}`` -> ``"1gbit"``; a bare value is checked by the field."""
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - {"profile"}, key=str)
    if unknown or "profile" not in value:
        raise _fail(src, f"network must be {{profile: NAME}}, got keys {short(sorted(map(str, value)))}")
    return value["profile"]


def _parse(raw: Any, src: str) -> StudySpec:
    if not isinstance(raw, dict):
        raise _fail(src, f"expected a mapping of study keys, got {type(raw).__name__}")
    bad = sorted(set(raw) - set(SPEC_KEYS), key=str)
    if bad:
        raise _fail(src, f"unknown key {short(bad[0])} (valid keys: {', '.join(SPEC_KEYS)})")
    for key in ("name", "models"):
        if key not in raw:
            raise _fail(src, f"missing required key {short(key)}")
    kw: dict[str, Any] = {"models": _models(src, raw["models"]),
                          "overrides": tuple(_flatten(src, "overrides", raw.get("overrides") or {}).items()),
                          "settings": _settings(src, raw.get("settings")),
                          "max_batch": _max_batch(src, raw.get("max_batch")),
                          "repeats_at": _repeats_at(src, raw.get("repeats_at"))}
    if "network" in raw:
        kw["network"] = coerce("network", _network(src, raw["network"]), str)
    types_ = field_types(StudySpec)
    kw.update({k: coerce(k, v, types_[k]) for k, v in raw.items() if k not in kw})
    return StudySpec(**kw, source=src, raw=raw)


def parse_spec(raw: dict[str, Any], src: str = "<study>") -> StudySpec:
    """Validate a study mapping. Unknown keys and bad values are one-line UserErrors naming ``src``."""
    try:
        return _parse(raw, src)
    except UserError as exc:
        msg = str(exc)
        raise (exc if msg.startswith(f"{src}: ") else _fail(src, msg)) from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    return parse_spec(load_yaml(path), str(path))
