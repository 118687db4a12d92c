"""The ``data:`` section: which files, which tokenizer, how records become sequences."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from anchored_megatron.config.errors import ConfigError


SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
BAD_RECORD_POLICIES = ("error", "skip")
SHUFFLES = ("global", "per_rank")


@dataclass
class DataConfig:
    """Where the SFT data lives and how it becomes training sequences.

    ``weights[i]`` is how many times each record of ``paths[i]`` appears per epoch:
    1.0 = once, 2.0 = twice, 0.5 = a seeded half of its records. ``None`` = all 1.0.

    ``chat_template``: ``None`` uses the tokenizer's own template when it has one,
    else the built-in default (see ``chat_template.py``); ``"default"`` forces the
    built-in one; otherwise a Jinja template string or the path of a file holding one.
    """

    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    tokenizer: str | None = None  # sentencepiece .model file, or an HF tokenizer directory (tokenizer.json)
    chat_template: str | None = None
    packing: bool = True  # several documents per sequence (block-diagonal attention); False = one per sequence, padded
    on_bad_record: str = "error"  # error | skip
    truncate: bool = False  # cut documents longer than seq_length instead of rejecting them
    cache_dir: str | None = None  # tokenised data lives here; default ~/.cache/anchored_megatron/sft
    # A replay trust region (anchored, snapshot only): records from these files (general prompts
    # with responses, e.g. the base's own) make up ``replay_fraction`` of every step's sequences,
    # on top of the gold ones, with the loss KL(p_snapshot || p_theta) and no teacher. With
    # objective sft: rehearsal, the CE on the replay responses (the same data without the trust region).
    replay_paths: list[str] = field(default_factory=list)
    replay_fraction: float = 0.0
    # global: every epoch a new permutation of all sequences, split over the data-parallel ranks;
    # per_rank: each rank keeps one fixed shard and reorders it every epoch (train.frozen_hidden_cache
    # needs it with more than one data-parallel rank: a rank must meet its sequences again).
    shuffle: str = "global"

    def validate(self, prefix: str = "data") -> None:
        """The values, reading no file. ``paths`` and ``tokenizer`` may be left out (a plan may be
        made before the data is staged); that they are given and exist is checked before a run by
        ``data.files.check_data_files``."""
        if self.paths:
            if not isinstance(self.paths, (list, tuple)):
                raise ConfigError(f"{prefix}.paths: must be a non-empty list of local files, got {self.paths!r}")
            for i, path in enumerate(self.paths):
                key = f"{prefix}.paths[{i}]"
                if not isinstance(path, str) or not path:
                    raise ConfigError(f"{key}: must be a file path, got {path!r}")
                if not path.endswith(SUPPORTED_SUFFIXES):
                    raise ConfigError(f"{key}: {path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
        if self.weights is not None:
            if not isinstance(self.weights, (list, tuple)) or len(self.weights) != len(self.paths):
                raise ConfigError(
                    f"{prefix}.weights: needs one weight per entry of {prefix}.paths ({len(self.paths)}), got {self.weights!r}"
                )
            for i, weight in enumerate(self.weights):
                ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0
                if not ok:
                    raise ConfigError(f"{prefix}.weights[{i}]: must be a finite number > 0, got {weight!r}")
        if self.chat_template is not None:
            if not isinstance(self.chat_template, str) or not self.chat_template:
                raise ConfigError(f"{prefix}.chat_template: must be 'default', a Jinja template or a file path, got {self.chat_template!r}")
        for name in ("packing", "truncate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{prefix}.{name}: must be true or false, got {getattr(self, name)!r}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ConfigError(f"{prefix}.on_bad_record: must be 'error' or 'skip', got {self.on_bad_record!r}")
        self._validate_replay(prefix)
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"{prefix}.shuffle: must be one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ConfigError(f"{prefix}.cache_dir: must be a directory path or null, got {self.cache_dir!r}")

    def _validate_replay(self, prefix: str) -> None:
        if not isinstance(self.replay_paths, (list, tuple)):
            raise ConfigError(f"{prefix}.replay_paths: must be a list of local files, got {self.replay_paths!r}")
        for i, path in enumerate(self.replay_paths):
            if not isinstance(path, str) or not path.endswith(SUPPORTED_SUFFIXES):
                raise ConfigError(f"{prefix}.replay_paths[{i}]: must be a {', '.join(SUPPORTED_SUFFIXES)} file path, got {path!r}")
        fraction = self.replay_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ConfigError(f"{prefix}.replay_fraction: must be a number in [0, 1), got {fraction!r}")
        if bool(self.replay_paths) != (fraction > 0):
            missing = f"{prefix}.replay_fraction" if self.replay_paths else f"{prefix}.replay_paths"
            raise ConfigError(f"{missing}: {prefix}.replay_paths and {prefix}.replay_fraction > 0 go together")

    def replay_microbatches(self, gold_microbatches: int) -> int:
        """Replay microbatches per step and data-parallel rank: ``replay_fraction`` of all of them."""
        exact = gold_microbatches * self.replay_fraction / (1.0 - self.replay_fraction)
        count = round(exact)
        if count < 1 or abs(exact - count) > 1e-6:
            valid = ", ".join(f"{n / (gold_microbatches + n):.3g} ({n})" for n in range(1, 4))
            raise ConfigError(
                f"data.replay_fraction: {self.replay_fraction} of each step's sequences is {exact:.3g} microbatches next to the "
                f"{gold_microbatches} gold ones per data-parallel rank; it must be a whole number: e.g. {valid}")
        return count

    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        return os.path.join(os.path.expanduser("~"), ".cache", "anchored_megatron", "sft")


def looks_like_jinja(text: str) -> bool:
    """A ``data.chat_template`` value is a template (not a file path) when it has Jinja markup."""
    return "{{" in text or "{%" in text
