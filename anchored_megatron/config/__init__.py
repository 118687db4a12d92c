"""Run configuration: dataclasses for every option, the YAML + ``key=value`` loader, model
presets, and the one validation of the values (``validate.validate_run``; the checks that read
files are ``planning.preflight``). Torch-free and a leaf (it imports no other package of ours),
so it loads in a fraction of a second and a run can be planned (``anchored-sft --dry-run``) on
any machine."""

from anchored_megatron.config.data import DataConfig
from anchored_megatron.config.errors import ConfigError
from anchored_megatron.config.loader import build, load_run_config, load_yaml, merge_overrides, parse_override
from anchored_megatron.config.model import ModelConfig
from anchored_megatron.config.presets import PRESETS, apply_preset
from anchored_megatron.config.run import RunConfig
from anchored_megatron.config.sections import (
    OBJECTIVES, AnchorConfig, CheckpointRef, EvalConfig, OptimConfig, ParallelConfig, TrainConfig,
)

__all__ = [
    "OBJECTIVES", "PRESETS", "AnchorConfig", "CheckpointRef", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "apply_preset", "build", "load_run_config", "load_yaml",
    "merge_overrides", "parse_override",
]
