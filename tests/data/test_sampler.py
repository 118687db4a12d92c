"""DP shards are disjoint and cover the epoch; resuming at any step continues the exact order."""

import itertools

import numpy as np
import pytest

from anchored_megatron.data import EpochSampler


def make(num_samples=103, seed=7, dp_rank=0, dp_size=3, mbs=2, nmb=4):
    return EpochSampler(num_samples, seed=seed, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=mbs, num_microbatches=nmb)


def flat(step):
    return [i for micro in step for i in micro]


def test_shards_disjoint_and_cover_the_epoch():
    n, dp, mbs, nmb = 103, 3, 2, 4
    samplers = [make(n, dp_rank=r, dp_size=dp, mbs=mbs, nmb=nmb) for r in range(dp)]
    steps = [list(s) for s in samplers]
    global_batch = mbs * nmb * dp
    assert all(len(rank_steps) == n // global_batch == s.steps_per_epoch for rank_steps, s in zip(steps, samplers))
    seen = []
    for step in range(n // global_batch):
        per_rank = [flat(steps[r][step]) for r in range(dp)]
        assert all(len(x) == mbs * nmb for x in per_rank)
        assert all(len(micro) == mbs for r in range(dp) for micro in steps[r][step])
        for a, b in itertools.combinations(per_rank, 2):
            assert not set(a) & set(b)
        seen += [i for x in per_rank for i in x]
    assert len(seen) == len(set(seen)) == (n // global_batch) * global_batch
    assert set(seen) <= set(range(n))
    # the dropped remainder is exactly the tail of this epoch's permutation
    permutation = np.random.default_rng([7, 0]).permutation(n).tolist()
    assert seen == permutation[: len(seen)]
    assert all(s.epoch == 1 and s.offset == 0 for s in samplers)


def test_order_is_deterministic_per_seed_and_epoch():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    first_a, first_b, first_c = list(a), list(b), list(c)
    assert first_a == first_b and first_a != first_c
    assert list(a) != first_a  # the next epoch is a new permutation


def run_steps(sampler, count):
    return [sampler.next_step() for _ in range(count)]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 5, 9])
def test_resume_continues_exact_order(stop_after):
    reference = run_steps(make(), 12)  # crosses two epoch boundaries (4 steps per epoch)
    interrupted = make()
    run_steps(interrupted, stop_after)
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert run_steps(resumed, 12 - stop_after) == reference[stop_after:]


def test_resume_through_iteration_and_epoch_counter():
    sampler = make()
    seen_epochs = []
    iterator = iter(sampler)
    next(iterator)
    next(iterator)
    state = sampler.state_dict()
    assert state["epoch"] == 0
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == resumed.steps_per_epoch - 2 and resumed.epoch == 1
    for _ in range(3):  # K epochs per outer iteration: the counter keeps going
        seen_epochs.append(resumed.epoch)
        assert len(list(resumed)) == resumed.steps_per_epoch
    assert seen_epochs == [1, 2, 3] and resumed.epoch == 4


def test_resume_with_a_different_dp_size_neither_repeats_nor_skips():
    n = 88  # 3 steps of 8, then 4 steps of 16: no remainder to drop
    before = [make(n, dp_rank=r, dp_size=2, mbs=2, nmb=2) for r in range(2)]  # global batch 8
    consumed = []
    for _ in range(3):
        for s in before:
            consumed += flat(s.next_step())
    after = [make(n, dp_rank=r, dp_size=4, mbs=2, nmb=2) for r in range(4)]  # global batch 16
    for s in after:
        s.load_state_dict(before[0].state_dict())
    rest = []
    for step in zip(*(list(s) for s in after)):
        rest += [i for per_rank in step for i in flat(per_rank)]
    assert not set(consumed) & set(rest)
    assert len(consumed) + len(rest) == n == len(set(consumed) | set(rest))


def test_state_from_another_dataset_is_refused():
    state = make(num_samples=103).state_dict()
    with pytest.raises(ValueError, match="num_samples=103"):
        make(num_samples=104).load_state_dict(state)


def test_too_few_samples_for_one_global_batch():
    with pytest.raises(ValueError, match="one global batch needs 24"):
        make(num_samples=20)


def make_per_rank(dp_rank, dp_size=3, num_samples=103, seed=7, mbs=2, nmb=4):
    return EpochSampler(num_samples, seed=seed, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=mbs, num_microbatches=nmb,
                        shuffle="per_rank")


def test_per_rank_shards_are_fixed_disjoint_and_reordered_every_epoch():
    n, dp = 103, 3
    samplers = [make_per_rank(r) for r in range(dp)]
    epochs = [[[i for step in s for i in flat(step)] for _ in range(4)] for s in samplers]  # 4 epochs per rank
    per_rank = 2 * 4
    steps = n // (per_rank * dp)
    assert all(s.steps_per_epoch == steps == make(n).steps_per_epoch for s in samplers)
    shard_size = n // dp
    shards = []
    for rank_epochs in epochs:
        assert all(len(e) == steps * per_rank for e in rank_epochs)
        visited = set().union(*map(set, rank_epochs))
        assert len(visited) <= shard_size  # a rank never leaves its shard
        assert len({tuple(e) for e in rank_epochs}) == 4  # a new order every epoch
        assert all(len(set(e)) == len(e) for e in rank_epochs)  # no repeats inside an epoch
        shards.append(visited)
    for a, b in itertools.combinations(shards, 2):
        assert not a & b
    # The shards are the slices of one seeded permutation (written out here).
    everything = np.random.default_rng([7, 0x5EED, dp]).permutation(n)
    for r, visited in enumerate(shards):
        assert visited <= set(everything[r * shard_size:(r + 1) * shard_size].tolist())


@pytest.mark.parametrize("stop_after", [0, 2, 4, 7])
def test_per_rank_resume_continues_exact_order(stop_after):
    reference = run_steps(make_per_rank(1), 10)
    interrupted = make_per_rank(1)
    run_steps(interrupted, stop_after)
    resumed = make_per_rank(1)
    resumed.load_state_dict(interrupted.state_dict())
    assert run_steps(resumed, 10 - stop_after) == reference[stop_after:]


def test_per_rank_resume_refuses_another_dp_size_mid_epoch_and_another_mode():
    sampler = make_per_rank(0, dp_size=3)
    sampler.next_step()
    with pytest.raises(ValueError, match="mid-epoch with data.shuffle=per_rank on 3 data-parallel ranks; this run has 2"):
        make_per_rank(0, dp_size=2).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="data.shuffle=per_rank, this run has global"):
        make().load_state_dict(sampler.state_dict())
    list(sampler)  # to the epoch boundary: the new shards start a fresh epoch
    resized = make_per_rank(0, dp_size=2)
    resized.load_state_dict(sampler.state_dict())
    assert resized.epoch == 1 and resized.offset == 0
