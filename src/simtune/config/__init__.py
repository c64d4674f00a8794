"""Typed options: one args class per concern, each a dataclass that documents and checks
its own fields, and one generator that turns any of them into argparse flags.

- `TuningConfig` (`simtune train`) is composed of job, launch, data, optim, lora, ppo
  and preference (GRPO, DPO, KTO) args; `ServeArgs`/`ProxyArgs` and the `*Args` of `simtune.config.commands` are the
  other commands' options.
- A field's docstring (the string literal right below it) is its documentation: the
  CLI's `--help`, docs/options.md, and what `field_docs` returns. Option names follow
  Hugging Face / TRL / PEFT where a name exists, so YAML files and habits carry over.

Nothing heavy is imported here: the CLI builds its parser from these classes on every
start, and ``simtune --help`` must answer in well under a second.
"""

from __future__ import annotations

from simtune.config.checks import (
    check_positive_int,
    positive_int,
    positive_int_problem,
    raise_problems,
)
from simtune.config.cli_args import add_cli_args, add_config_args, config_parts, namespace_to
from simtune.config.data import FILTERS, DataArgs
from simtune.config.fields import (
    arg,
    base_type,
    coerce,
    coerce_scalar,
    field_docs,
    field_types,
    own_fields,
)
from simtune.config.job import TUNING_MODES, JobArgs
from simtune.config.launch import LaunchArgs
from simtune.config.lora import LoraArgs
from simtune.config.names import check_mlflow_name, mlflow_name_problem, resolve_workspace
from simtune.config.optim import LR_SCHEDULERS, PRECISIONS, OptimArgs
from simtune.config.ppo import (
    KL_ESTIMATORS,
    NORMALISATIONS,
    PPO_REFERENCES,
    ROLLOUTS,
    PPOArgs,
)
from simtune.config.preference import PreferenceArgs
from simtune.config.tuning import TuningConfig, build_config, load_yaml
from simtune.errors import ConfigError

__all__ = [
    "FILTERS",
    "KL_ESTIMATORS",
    "LR_SCHEDULERS",
    "NORMALISATIONS",
    "PPO_REFERENCES",
    "PRECISIONS",
    "ROLLOUTS",
    "TUNING_MODES",
    "ConfigError",
    "DataArgs",
    "JobArgs",
    "LaunchArgs",
    "LoraArgs",
    "OptimArgs",
    "PPOArgs",
    "PreferenceArgs",
    "TuningConfig",
    "add_cli_args",
    "add_config_args",
    "arg",
    "base_type",
    "build_config",
    "check_mlflow_name",
    "check_positive_int",
    "coerce",
    "coerce_scalar",
    "config_parts",
    "field_docs",
    "field_types",
    "load_yaml",
    "mlflow_name_problem",
    "namespace_to",
    "own_fields",
    "positive_int",
    "positive_int_problem",
    "raise_problems",
    "resolve_workspace",
]
