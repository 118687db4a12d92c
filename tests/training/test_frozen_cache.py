"""``train.frozen_hidden_cache``: a run that reuses the frozen roles' hidden states trains exactly as
one that runs every frozen forward, and it reuses them exactly where a sequence comes back.

Each layout is one launch that trains the same anchored run (snapshot source, a KL-to-base term: three
frozen roles; replay microbatches where the layout allows) with the cache on and off, T=2 outer
iterations x K=3 epochs. The run without the cache is the reference: the same losses per step and the
same weights after it (fp32, <= 1e-5). The share of frozen forwards served from the cache at each step
is checked against a plain simulation of "which sequences has every rank met since that role's
weights last changed", written here from the samplers' orders.
"""

import io

import pytest
import torch

from anchored_megatron.data import EpochSampler
from tests.training.conftest import MODEL, as_bytes, read_metrics, run_config

T, K = 2, 3
ROLES = ("reference", "snapshot", "base")  # the trainer's order of frozen roles for this objective


def trained_rank(cases: dict):
    """Train each case; return {case: {"weights": {name: tensor}, "sequences": (gold, replay),
    "held_bytes": {role: bytes cached at the end} or None, "last_stage": bool}} of this rank."""
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.models.layout import canonical_name
    from anchored_megatron.training.roles import unwrap
    from anchored_megatron.training.trainer import Trainer

    results = {}
    for name, cfg_dict in cases.items():
        trainer = Trainer(build(RunConfig, cfg_dict))
        trainer.setup()
        assert trainer.frozen_names == list(ROLES)
        trainer.run()
        weights = {canonical_name(c, n): p.detach().clone() for c in trainer.student for n, p in unwrap(c).named_parameters()}
        replay = None if trainer.replay_dataset is None else len(trainer.replay_dataset)
        cache = trainer.frozen_cache
        held = None if cache is None else {role: cache.nbytes_of(i) for i, role in enumerate(ROLES)}
        results[name] = {"weights": weights, "sequences": (len(trainer.dataset), replay), "held_bytes": held,
                         "last_stage": trainer.stacks[0].is_last_stage}
    return as_bytes(results)


def expected_cached_shares(sequences, replay_sequences, dp, shuffle, seed, gold_mb, replay_mb, steps, steps_per_iteration):
    """Per step: the share of (microbatch x role) forwards every DP rank can take from its cache; and
    per DP rank, how many sequences each role holds at the end."""
    def samplers(count, sampler_seed, microbatches):
        return [EpochSampler(count, seed=sampler_seed, dp_rank=r, dp_size=dp, micro_batch_size=1, num_microbatches=microbatches,
                             shuffle=shuffle) for r in range(dp)]

    gold = samplers(sequences, seed, gold_mb)
    replay = samplers(replay_sequences, seed + 1, replay_mb) if replay_sequences else None
    seen = [{role: set() for role in ROLES} for _ in range(dp)]
    shares = []
    for step in range(steps):
        if step % steps_per_iteration == 0:
            for rank_seen in seen:
                rank_seen["snapshot"].clear()  # refreshed from the student
        per_rank = []
        for r in range(dp):
            keys = [((False, i),) for micro in gold[r].next_step() for i in micro]
            if replay is not None:
                keys += [((True, i),) for micro in replay[r].next_step() for i in micro]
            per_rank.append(keys)
        cached = 0
        for m in range(len(per_rank[0])):
            for role in ROLES:
                cached += all(set(per_rank[r][m]) <= seen[r][role] for r in range(dp))
        for r in range(dp):
            for keys in per_rank[r]:
                for role in ROLES:
                    seen[r][role].update(keys)
        shares.append(cached / (len(per_rank[0]) * len(ROLES)))
    return shares, [{role: len(held) for role, held in rank_seen.items()} for rank_seen in seen]


def _compare(tiny_run, tmp_path, ranks, world, dp, shuffle, replay, **layout):
    anchor = {"objective": "anchored", "alpha": 0.5, "source": "snapshot", "base_kl_weight": 0.3,
              "outer_iterations": T, "epochs_per_iteration": K}
    extra = {"data__shuffle": shuffle}
    if replay:
        extra.update(data__replay_paths=[tiny_run["data"]], data__replay_fraction=0.2)
    runs = {}
    for cached in (True, False):
        out = tmp_path / f"cache_{cached}"
        cfg = run_config(tiny_run, out, train__frozen_hidden_cache=cached, train__save_at_iteration_end=False, **extra, **layout)
        cfg["anchor"] = anchor
        runs[cached] = (out, cfg)
    per_rank = [torch.load(io.BytesIO(blob)) for blob in ranks(trained_rank, world, {str(c): cfg for c, (_, cfg) in runs.items()}, timeout=1800)]
    with_cache, without = read_metrics(runs[True][0]), read_metrics(runs[False][0])
    assert len(with_cache) == len(without) > 0
    for a, b in zip(with_cache, without):
        for key in ("loss", "kl_step", "kl_reference", "entropy", "grad_norm", "replay_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
    for result in per_rank:
        for name, expected in result["False"]["weights"].items():
            actual = result["True"]["weights"][name]
            assert (actual.double() - expected.double()).norm() <= 1e-5 * expected.double().norm(), name
    sequences, replay_sequences = per_rank[0]["True"]["sequences"]
    gold_mb = 4 // dp
    steps_per_iteration = (sequences // 4) * K
    expected, held = expected_cached_shares(sequences, replay_sequences, dp, shuffle, 3, gold_mb, 1 if replay else 0,
                                            len(with_cache), steps_per_iteration)
    assert [round(r["frozen_cached"], 6) for r in with_cache] == [round(e, 6) for e in expected]
    assert "frozen_cached" not in without[0]
    # The cache must have been read at all: later epochs reuse what the first one computed.
    assert max(expected) > 0.5
    # What the last stage holds: fp32 [seq, hidden] per sequence a role has met since its weights last changed.
    tp = layout.get("parallel__tp", 1)
    for rank, result in enumerate(per_rank):
        dp_rank = rank // tp % dp  # Megatron orders ranks tp first, then dp
        per_sequence = MODEL["seq_length"] * MODEL["hidden_size"] * 4
        expected_bytes = {role: count * per_sequence if result["True"]["last_stage"] else 0 for role, count in held[dp_rank].items()}
        assert result["True"]["held_bytes"] == expected_bytes, (rank, result["True"]["held_bytes"], expected_bytes)
    log = (runs[True][0] / "train.log").read_text()
    assert "train.frozen_hidden_cache: keeping reference, snapshot, base's final hidden states in host memory, up to " in log


@pytest.mark.distributed
def test_cache_trains_like_no_cache_dp2_per_rank_shards(tiny_run, tmp_path, ranks):
    _compare(tiny_run, tmp_path, ranks, 2, 2, "per_rank", replay=False)


@pytest.mark.distributed
def test_cache_trains_like_no_cache_pp2_with_replay(tiny_run, tmp_path, ranks):
    # Pipeline: the first stage skips the cached roles too and sends zeros in their P2P slots.
    _compare(tiny_run, tmp_path, ranks, 2, 1, "global", replay=True, parallel__pp=2)


@pytest.mark.distributed
def test_cache_trains_like_no_cache_tp2(tiny_run, tmp_path, ranks):
    # Each TP rank holds its own copy; the plan must agree across them (they share the frozen
    # forwards' all-reduces).
    _compare(tiny_run, tmp_path, ranks, 2, 1, "global", replay=False, parallel__tp=2)


def test_the_host_memory_check_names_the_option_and_the_figures():
    from anchored_megatron.config import ConfigError
    from anchored_megatron.training.frozen_cache import check_host_memory, estimated_bytes

    # 1000 sequences of 4096 tokens, hidden 4096, two roles, fp32: 1000 * 4096 * 4096 * 4 * 2 bytes = 125 GiB;
    # under sequence parallelism at TP=4 a quarter of the tokens.
    assert estimated_bytes(1000, 4096, 4096, 2, tp=4, sequence_parallel=False) == 1000 * 4096 * 4096 * 8
    assert estimated_bytes(1000, 4096, 4096, 2, tp=4, sequence_parallel=True) == 1000 * 1024 * 4096 * 8
    gib = 1024**3
    assert check_host_memory(10, 3 * gib, 2, 100 * gib) == "up to 3.00 GiB per last-stage rank (10 sequences)"
    assert check_host_memory(10, 3 * gib, 2, None).startswith("up to 3.00 GiB")  # no /proc/meminfo: nothing to check against
    with pytest.raises(ConfigError) as info:
        check_host_memory(1000, 125 * gib, 4, 400 * gib)  # 500 GiB on the host > 0.8 x 400
    assert str(info.value) == (
        "train.frozen_hidden_cache: the frozen roles' hidden states of 1000 sequences per rank need 125.0 GiB per last-stage rank, "
        "500.0 GiB on this host (4 such ranks), which has 400.0 GiB available; set it to false, or spread the data over more "
        "data-parallel ranks")
