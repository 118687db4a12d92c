"""The model files kept with every converted or trainer checkpoint.

``model_config.yaml`` is the ModelConfig the weights are for. ``hf_config.json`` is the source
HF config.json byte for byte: conversion writes it and every trainer checkpoint carries it on,
so export writes back the config the model came with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from anchored_megatron.checkpoint.errors import CheckpointError
from anchored_megatron.config.errors import ConfigError
from anchored_megatron.config.model import ModelConfig

MODEL_CONFIG_NAME = "model_config.yaml"
HF_CONFIG_NAME = "hf_config.json"  # a byte copy of the source config.json, so export can reproduce it


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


def load_model_config(ckpt_dir: str, key: str = "--ckpt") -> ModelConfig:
    """The ModelConfig stored next to a converted (or trainer) checkpoint, which must have one."""
    model = read_model_config(ckpt_dir, key)
    if model is None:
        path = os.path.join(ckpt_dir, MODEL_CONFIG_NAME)
        raise CheckpointError(f"{path}: not found (a converted checkpoint has its model config there)")
    return model


def write_model_config(ckpt_dir: str, model: ModelConfig, hf_config_file: str | None = None) -> None:
    """``model_config.yaml``, plus a byte copy of ``hf_config_file`` (the HF config.json the
    weights descend from) as ``hf_config.json`` so export can give it back unchanged."""
    import yaml

    with open(os.path.join(ckpt_dir, MODEL_CONFIG_NAME), "w", encoding="utf-8") as fh:
        yaml.safe_dump(dataclasses.asdict(model), fh, sort_keys=False)
    if hf_config_file is not None:
        shutil.copyfile(hf_config_file, os.path.join(ckpt_dir, HF_CONFIG_NAME))


def write_trainer_model_config(ckpt_dir: str, model: ModelConfig, student_checkpoint: str | None) -> None:
    """The model files of a trainer checkpoint ``<root>/iter_N``, carrying the HF config along.

    The HF config comes from where the weights descend: the run's previous checkpoint (so a
    resumed run keeps it), else the student's source checkpoint. Neither holding one (a
    random-init run) leaves it out, and export synthesises a config.
    """
    from anchored_megatron.checkpoint.dirs import previous_checkpoint, resolve_checkpoint_dir

    previous = previous_checkpoint(ckpt_dir)
    source = kept_hf_config_file(previous) if previous is not None else None
    if source is None and student_checkpoint is not None:
        source = kept_hf_config_file(resolve_checkpoint_dir(student_checkpoint, "student.checkpoint"))
    write_model_config(ckpt_dir, model, source)


def kept_hf_config_file(ckpt_dir: str) -> str | None:
    """The HF config.json kept with a checkpoint, or None when it has none."""
    path = os.path.join(ckpt_dir, HF_CONFIG_NAME)
    return path if os.path.isfile(path) else None


def load_hf_config(ckpt_dir: str) -> dict | None:
    """The HF config kept with a checkpoint (keys in their source order), or None."""
    path = kept_hf_config_file(ckpt_dir)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
