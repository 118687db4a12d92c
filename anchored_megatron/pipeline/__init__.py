"""The staged forgetting experiment: stage configs with cache keys, and the runner."""

from anchored_megatron.pipeline.stages import METHODS, ExperimentConfig, StageSpec, plan

__all__ = ["METHODS", "ExperimentConfig", "StageSpec", "plan"]
