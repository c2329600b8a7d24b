"""Loading a :class:`~cnnscale.config.sections.Config`: YAML file, overrides, command line.

Precedence: dataclass defaults < ``--config FILE.yaml`` < ``overrides`` (given by a command, e.g. a teacher's data
section) < the short flags (``--model``, ``--lr``, ...) and ``--section.field value``. Every error (unknown key,
wrong type, out-of-range value) is a one-line :class:`~cnnscale.errors.UserError`; ``--help`` prints every flag with
its help and default, and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from cnnscale.config.argv import CommandParser
from cnnscale.config.coerce import from_mapping
from cnnscale.config.ranges import short
from cnnscale.config.sections import SECTIONS, Config
from cnnscale.config.yamlfile import read_yaml_file
from cnnscale.errors import UserError

__all__ = ["load_config", "config_from_args", "train_parser", "apply_overrides", "parse_cli", "load_yaml",
           "config_to_dict", "SHORT_FLAGS"]

# Short flags shared by launch/train.py, `cnnscale train` and slurm/train.sbatch.
SHORT_FLAGS: dict[str, str] = {
    "--model": "model.name",
    "--data": "data.name",
    "--data-dir": "data.data_dir",
    "--epochs": "train.epochs",
    "--max-steps": "train.max_steps",
    "--micro-batch": "train.micro_batch",
    "--grad-accum": "train.grad_accum",
    "--lr": "optim.lr",
    "--mixed-precision": "train.mixed_precision",
    "--out": "train.out",
    "--resume": "train.resume",
    "--overwrite": "train.overwrite",
    "--seed": "train.seed",
    "--loader": "data.loader",
    "--device": "train.device",
}
_BARE = {"--resume": "auto"}  # short flags that may be given without a value
_USAGE = "%(prog)s [-h] [--config FILE.yaml] [--model NAME] [--short-flag VALUE ...] [--section.field VALUE ...]"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe reader (:func:`~cnnscale.config.yamlfile.read_yaml_file`: UTF-8, no
    aliases, no duplicate keys, bounded size); a missing file, bad bytes or bad YAML is a one-line UserError."""
    p = Path(path)
    data = read_yaml_file(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _apply(sections: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """``{section: dataclass}`` with ``{section: {field: value}}`` applied, each value coerced and range-checked."""
    new = dict(sections)
    for sec, values in overrides.items():
        if sec not in SECTIONS:
            raise UserError(f"{source}: unknown section {short(sec)} (choose from: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {short(sec)} must be a mapping, got {type(values).__name__}")
        new[sec] = from_mapping(SECTIONS[sec], values, source, f"{sec}.", base=new[sec])
    return new


def _sections(cfg: Config) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in SECTIONS}


def apply_overrides(base: Config, overrides: dict[str, Any], source: str) -> Config:
    """``base`` with ``{section: {field: value}}`` applied, each value coerced and range-checked, then the
    cross-section rules; errors name ``source`` (a file name, "overrides" or "command line")."""
    return Config(**_apply(_sections(base), overrides, source))


def _default_prog() -> str:
    script = Path(sys.argv[0] if sys.argv else "")
    if script.name == "train.py":
        return "train.py"
    return "python -m cnnscale.train" if script.parts[-2:] == ("train", "__main__.py") else "cnnscale train"


def train_parser(prog: str | None = None, description: str | None = None) -> CommandParser:
    """The training flags: ``--config``, the short flags, and ``--section.field`` for every field of every section.

    Commands that train (distill, prune) add their own section to it with :meth:`CommandParser.add_section`.
    """
    parser = CommandParser(prog or _default_prog(), usage=_USAGE, description=description or (
        "Train one run. Precedence: field defaults < --config FILE.yaml < flags. "
        "Batch: global_batch = micro_batch x grad_accum x world_size."))
    for name, cls in SECTIONS.items():
        parser.add_section(name, cls)
    for flag, dest in SHORT_FLAGS.items():
        parser.add_alias(flag, dest, optional=_BARE.get(flag))
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of sections (configs/recipes/*.yaml)")
    return parser


def config_from_args(ns: argparse.Namespace, parser: CommandParser, path: str | Path | None = None,
                     overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """The :class:`Config` of parsed training flags (``parser`` from :func:`train_parser`): defaults < YAML
    (``path``, else ``--config``) < ``overrides`` < flags. ``--resume`` alone resumes ``--out``."""
    path = path or getattr(ns, "config", None)
    sections = _sections(Config())
    if path:
        sections = _apply(sections, load_yaml(path), str(path))
    for over, src in ((overrides or {}, "overrides"), (parser.overrides(ns, SECTIONS), "command line")):
        if over:
            sections = _apply(sections, over, src)
    cfg = Config(**sections)  # the cross-section rules, once, on the final values of every source
    train = cfg.train
    if train.epochs == 0 and train.max_steps == 0:
        train = dataclasses.replace(train, epochs=1)
    if train.resume == "auto" and not train.out:
        raise UserError("--resume without a directory resumes --out: give --resume RUN_DIR or --out RUN_DIR")
    if train.resume == "auto":
        train = dataclasses.replace(train, resume=train.out)
    return dataclasses.replace(cfg, train=train)


def load_config(argv: list[str] | None = None, path: str | Path | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Build a :class:`Config` from training flags ``argv`` (``--help`` prints them all and exits 0), a YAML file
    and ``overrides``; see the module docstring for the precedence."""
    parser = train_parser()
    return config_from_args(parser.parse_args(list(argv or [])), parser, path, overrides)


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Split training flags into the ``--config`` path and ``{section: {field: value}}``. Unknown flags are errors."""
    parser = train_parser()
    ns = parser.parse_args(list(argv))
    return ns.config, parser.overrides(ns)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        sec = dataclasses.asdict(getattr(cfg, f.name))
        out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
    return out
