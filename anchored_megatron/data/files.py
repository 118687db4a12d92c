"""The files a data section names: given, and present. Checked by the preflight before a run and
by ``build_sft_dataset`` for callers that build a dataset directly."""

from __future__ import annotations

import os

from anchored_megatron.config import ConfigError, DataConfig
from anchored_megatron.config.data import looks_like_jinja


def check_data_files(data: DataConfig, prefix: str = "data") -> None:
    """The section's values first (the file checks rely on them), then that every file it names
    is given and exists: the data, the tokenizer, a chat template file and the replay data."""
    data.validate(prefix)
    if not isinstance(data.paths, (list, tuple)) or not data.paths:
        raise ConfigError(f"{prefix}.paths: must be a non-empty list of local files, got {data.paths!r}")
    for i, path in enumerate(data.paths):
        if not os.path.isfile(path):
            raise ConfigError(f"{prefix}.paths[{i}]: {path}: file not found")
    _check_tokenizer_file(data, prefix)
    template = data.chat_template
    if template is not None and template != "default" and not looks_like_jinja(template) and not os.path.isfile(template):
        raise ConfigError(f"{prefix}.chat_template: {template!r} is neither 'default', a Jinja template, nor an existing file")
    for i, path in enumerate(data.replay_paths):
        if not os.path.isfile(path):
            raise ConfigError(f"{prefix}.replay_paths[{i}]: {path}: file not found")


def _check_tokenizer_file(data: DataConfig, prefix: str) -> None:
    if not isinstance(data.tokenizer, str) or not data.tokenizer:
        raise ConfigError(f"{prefix}.tokenizer: required: a sentencepiece .model file or an HF tokenizer directory")
    if not os.path.exists(data.tokenizer):
        raise ConfigError(f"{prefix}.tokenizer: {data.tokenizer}: not found")
    if os.path.isdir(data.tokenizer) and not any(
        os.path.isfile(os.path.join(data.tokenizer, name)) for name in ("tokenizer.json", "tokenizer.model")
    ):
        raise ConfigError(f"{prefix}.tokenizer: {data.tokenizer}: directory has neither tokenizer.json nor tokenizer.model")
