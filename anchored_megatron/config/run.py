"""The whole run: one YAML file (+ dotted overrides) maps onto this tree."""

from __future__ import annotations

from dataclasses import dataclass, field

from anchored_megatron.config.data import DataConfig
from anchored_megatron.config.model import ModelConfig
from anchored_megatron.config.sections import (
    AnchorConfig, CheckpointRef, EvalConfig, OptimConfig, ParallelConfig, TrainConfig,
)


@dataclass
class RunConfig:
    output_dir: str = ""
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    student: CheckpointRef = field(default_factory=CheckpointRef)
    reference: CheckpointRef = field(default_factory=CheckpointRef)
    data: DataConfig = field(default_factory=DataConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Dotted keys the user set (filled by ``loader.build``): presets and checkpoints fill only the
    # rest, and an option the objective does not use is refused only when it was set.
    explicit_keys: frozenset = field(default_factory=frozenset, repr=False, compare=False, metadata={"internal": True})

    def validate(self, world_size: int) -> None:
        """The values only (``validate.validate_run``); before a run, ``planning.preflight.prepare_run``
        also completes the config and checks the files."""
        from anchored_megatron.config.validate import validate_run

        validate_run(self, world_size)

    def to_dict(self) -> dict:
        """Every option as plain data (what ``config.yaml`` next to a run holds)."""
        from anchored_megatron.config.loader import to_dict

        return to_dict(self)
