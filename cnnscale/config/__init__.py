"""Run configuration: frozen dataclasses per component (:mod:`.sections`), loaded from YAML and the command line
(:mod:`.load`, safe YAML in :mod:`.yamlfile`) through the one parser (:mod:`.argv`), the one coercion
(:mod:`.coerce`) and the one range validator (:mod:`.ranges`) of every command.

``from cnnscale.config import Config, load_config, ...`` is the public surface; nothing here imports torch.
"""

from __future__ import annotations

from cnnscale.config.argv import CommandParser, choice_type, number_type, show_default
from cnnscale.config.coerce import coerce, field_docs, field_types, from_mapping, parse_text
from cnnscale.config.load import (
    SHORT_FLAGS,
    apply_overrides,
    config_from_args,
    config_to_dict,
    load_config,
    load_yaml,
    parse_cli,
    train_parser,
)
from cnnscale.config.ranges import Range, check_fields, setting, short
from cnnscale.config.sections import (
    COMM_HOOKS,
    COMPILE_MODES,
    DATASETS,
    LOADERS,
    OPTIMIZERS,
    PRECISIONS,
    PROGRESS_MODES,
    SCHEDULERS,
    SECTIONS,
    Config,
    DataConfig,
    DistConfig,
    FastConfig,
    ModelConfig,
    OptimConfig,
    ProfileConfig,
    SchedConfig,
    TrainConfig,
    global_batch,
)

__all__ = [
    "Config", "ModelConfig", "DataConfig", "OptimConfig", "SchedConfig", "TrainConfig", "ProfileConfig",
    "FastConfig", "DistConfig", "SECTIONS", "global_batch",
    "OPTIMIZERS", "SCHEDULERS", "PRECISIONS", "DATASETS", "LOADERS", "COMM_HOOKS", "PROGRESS_MODES", "COMPILE_MODES",
    "load_config", "config_from_args", "train_parser", "apply_overrides", "parse_cli", "load_yaml", "config_to_dict",
    "SHORT_FLAGS", "CommandParser", "choice_type", "number_type", "show_default",
    "coerce", "parse_text", "field_types", "field_docs", "from_mapping", "Range", "setting", "check_fields", "short",
]
