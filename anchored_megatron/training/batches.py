"""One step's microbatches: the gold data's, then the replay data's (``data.replay_paths``), each
collated onto the device.

Two things ride along in a microbatch dict for the forward step (``forward_step.py``): a replay
microbatch is marked (``REPLAY_KEY``: its loss follows the replay terms and its sums are kept apart
from the gold metrics), and with ``train.frozen_hidden_cache`` each microbatch carries its
``FrozenPlan`` (``PLAN_KEY``: which frozen roles it may skip), decided for all ranks at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from anchored_megatron.data import collate
from anchored_megatron.training.forward_step import REPLAY_KEY
from anchored_megatron.training.frozen_cache import PLAN_KEY, FrozenHiddenCache


@dataclass(frozen=True)
class Source:
    """A dataset and the sampler that walks this rank's share of it."""

    dataset: object
    sampler: object
    replay: bool = False


def step_microbatches(sources: list[Source], device, cache: FrozenHiddenCache | None = None) -> list[dict]:
    """Every microbatch of the next step, source after source."""
    batches = []
    keys = []  # per microbatch, its sequences' cache keys: (replay, index)
    for source in sources:
        for indices in source.sampler.next_step():
            batch = {k: v.to(device, non_blocking=True) for k, v in collate([source.dataset[i] for i in indices]).items()}
            if source.replay:
                batch[REPLAY_KEY] = True
            batches.append(batch)
            keys.append(tuple((source.replay, i) for i in indices))
    if cache is not None:
        for batch, plan in zip(batches, cache.plan_step(keys, device)):
            batch[PLAN_KEY] = plan
    return batches


def cached_share(microbatches: list[dict]) -> float:
    """The share of the step's frozen-role forwards served from the cache."""
    plans = [batch[PLAN_KEY].cached for batch in microbatches]
    return sum(map(sum, plans)) / (len(plans) * len(plans[0]))
