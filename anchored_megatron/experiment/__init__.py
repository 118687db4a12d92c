"""The forgetting experiment behind the demo and bench/forgetting.py: its jobs (trainer runs
with cache keys) and the runner that trains and evaluates them."""

from anchored_megatron.experiment.jobs import METHODS, ExperimentConfig, JobSpec, plan

__all__ = ["METHODS", "ExperimentConfig", "JobSpec", "plan"]
