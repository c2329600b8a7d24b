"""Files shipped inside the package: the sbatch templates and the built-in studies and recipes.

Layout (package data, listed in pyproject.toml)::

    slurm/train.sbatch  slurm/study.sbatch     the SLURM templates (`cnnscale submit`, `cnnscale study --slurm`)
    configs/studies/*.yaml                     built-in studies, found by name: `cnnscale study quickstart`
    configs/recipes/*.yaml                     training recipes: `--config configs/recipes/resnet18.yaml`

A checkout reaches the same files through symlinks (``configs -> cnnscale/resources/configs``,
``slurm/train.sbatch -> ../cnnscale/resources/slurm/train.sbatch``), so the README's paths work there and there is
one copy of each file. Nothing here imports torch.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from cnnscale.errors import UserError

__all__ = ["resource_path", "builtin_names", "find_builtin", "KINDS"]

KINDS = ("studies", "recipes")


def resource_path(rel: str) -> Path:
    """The installed path of a packaged file, e.g. ``resource_path("slurm/train.sbatch")``."""
    path = Path(str(files(__name__).joinpath(rel)))
    if not path.exists():
        raise UserError(f"packaged file {rel!r} is missing from {path.parent} (a broken install?)")
    return path


def builtin_names(kind: str) -> list[str]:
    """The names of the built-in ``kind`` ("studies" or "recipes"): the YAML files' stems, sorted."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return sorted(p.stem for p in resource_path(f"configs/{kind}").glob("*.yaml"))


def find_builtin(kind: str, name_or_path: str | Path) -> Path:
    """A YAML file: ``name_or_path`` itself when it is an existing file, else the built-in ``kind`` of that name.

    Raises UserError (one line listing the built-in names) when it is neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = builtin_names(kind)
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in names:
        return resource_path(f"configs/{kind}/{stem}.yaml")
    what = "study" if kind == "studies" else "recipe"
    raise UserError(f"no {what} file or built-in {what} {str(name_or_path)!r} (built-in: {', '.join(names)})")
