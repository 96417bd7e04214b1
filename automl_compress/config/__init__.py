"""Typed, frozen, self-validating configuration.

The dataclasses are the schema and hold every default; YAML files hold only overrides, and
``--set section.key=value`` overrides those. Unknown keys are errors that name the closest valid
key. Every name is importable from here; the pieces live in:

- :mod:`automl_compress.config.compression`: the sections of the compression itself (task,
  capture, menu, solver, cost, alloc, eval) and :func:`parse_pattern`.
- :mod:`automl_compress.config.training`: the RL search's sections (env, agent).
- :mod:`automl_compress.config.run`: the executor section and the whole-run :class:`Config`.
- :mod:`automl_compress.config.loading`: YAML loading with ``--set`` overrides, the type
  coercers, and the YAML dump.
"""

from automl_compress.config.compression import (
    AUTO,
    BN_MODES,
    BN_SWITCHES,
    CORRECTION_CHOICES,
    OBJECTIVES,
    PATTERNS,
    AllocConfig,
    CaptureConfig,
    CostConfig,
    EvalConfig,
    MenuConfig,
    SolverConfig,
    TaskConfig,
    parse_pattern,
)
from automl_compress.config.loading import config_to_dict, dump_config, load_config
from automl_compress.config.run import EXECUTORS, Config, ExecutorConfig
from automl_compress.config.training import AgentConfig, EnvConfig

__all__ = [
    "AUTO",
    "BN_MODES",
    "BN_SWITCHES",
    "CORRECTION_CHOICES",
    "EXECUTORS",
    "OBJECTIVES",
    "PATTERNS",
    "AgentConfig",
    "AllocConfig",
    "CaptureConfig",
    "Config",
    "CostConfig",
    "EnvConfig",
    "EvalConfig",
    "ExecutorConfig",
    "MenuConfig",
    "SolverConfig",
    "TaskConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_pattern",
]
