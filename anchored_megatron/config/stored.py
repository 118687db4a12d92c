"""The ``model_config.yaml`` kept next to every converted or trainer checkpoint."""

from __future__ import annotations

import dataclasses
import os

from anchored_megatron.config.errors import ConfigError
from anchored_megatron.config.model import ModelConfig

MODEL_CONFIG_NAME = "model_config.yaml"


def read_model_config(ckpt_dir: str, key: str = "checkpoint") -> ModelConfig | None:
    """The ModelConfig stored in ``ckpt_dir``; None when the directory has none. ``key`` names the
    option that pointed there, for errors."""
    from anchored_megatron.config.loader import build, load_yaml

    path = os.path.join(ckpt_dir, MODEL_CONFIG_NAME)
    if not os.path.exists(path):
        return None
    try:
        model = build(ModelConfig, load_yaml(path), "model")
        model.validate()
    except ConfigError as exc:
        raise ConfigError(f"{key}: {path}: {exc}") from None
    return model


def write_model_config(ckpt_dir: str, model: ModelConfig) -> None:
    import yaml

    with open(os.path.join(ckpt_dir, MODEL_CONFIG_NAME), "w", encoding="utf-8") as fh:
        yaml.safe_dump(dataclasses.asdict(model), fh, sort_keys=False)
