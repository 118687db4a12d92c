"""Deterministic, DP-sharded, epoch-aware, resumable order of sequence indices."""

from __future__ import annotations

import numpy as np

SHUFFLES = ("global", "per_rank")
_PER_RANK_STREAM = 0x5EED  # keeps the per-rank streams apart from the global [seed, epoch] one


class EpochSampler:
    """Yields, per global step, this DP rank's ``num_microbatches`` lists of
    ``micro_batch_size`` sequence indices.

    Epoch ``e`` visits the permutation ``default_rng([seed, e]).permutation(num_samples)``
    in order; a global step takes the next ``global_batch = micro_batch_size *
    num_microbatches * dp_size`` entries, and DP rank ``r`` gets the ``r``-th contiguous
    block of them, so the ranks' shards are disjoint and cover the step. The last
    ``num_samples % global_batch`` entries of each epoch's permutation are dropped; the
    permutation changes every epoch, so a different remainder is dropped each time.

    Iterating yields the rest of the current epoch and then moves to the next epoch
    (the epoch counter is global: it keeps counting across outer iterations). The state
    records the position in the permutation, so resuming mid-epoch neither repeats nor
    skips a sample, even with a different DP size or batch shape.

    ``shuffle="per_rank"``: each DP rank keeps one fixed shard for the whole run (``num_samples //
    dp_size`` sequences of a seeded permutation; the last ``num_samples % dp_size`` are never
    used) and visits it in a new order every epoch, so a rank sees the same sequences in every
    epoch (what a per-rank cache of the frozen roles' outputs needs). Steps per epoch are the
    same as with ``"global"``. Resuming mid-epoch needs the same DP size (the shards depend on it).
    """

    def __init__(self, num_samples: int, *, seed: int, dp_rank: int, dp_size: int, micro_batch_size: int, num_microbatches: int,
                 shuffle: str = "global"):
        for name, value, minimum in (
            ("num_samples", num_samples, 1), ("dp_size", dp_size, 1),
            ("micro_batch_size", micro_batch_size, 1), ("num_microbatches", num_microbatches, 1),
        ):
            if not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"EpochSampler: {name} must be an integer >= {minimum}, got {value!r}")
        if shuffle not in SHUFFLES:
            raise ValueError(f"EpochSampler: shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"EpochSampler: dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.micro_batch_size, self.num_microbatches = int(micro_batch_size), int(num_microbatches)
        self.global_batch = self.micro_batch_size * self.num_microbatches * self.dp_size
        if self.global_batch > self.num_samples:
            raise ValueError(
                f"EpochSampler: one global batch needs {self.global_batch} sequences (micro_batch_size x num_microbatches x dp_size) "
                f"but the dataset has only {self.num_samples}"
            )
        self.epoch = 0  # global epoch counter
        self.offset = 0  # entries of this epoch's permutation already handed out
        self._order_epoch = None
        self._order = None
        self._shard = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def steps_left_in_epoch(self) -> int:
        return (self.num_samples - self.offset) // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def rank_epoch_order(self, epoch: int) -> np.ndarray:
        """``shuffle="per_rank"``: this rank's fixed shard in epoch ``epoch``'s order."""
        if self._shard is None:
            size = self.num_samples // self.dp_size
            everything = np.random.default_rng([self.seed, _PER_RANK_STREAM, self.dp_size]).permutation(self.num_samples)
            self._shard = everything[self.dp_rank * size : (self.dp_rank + 1) * size]
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, _PER_RANK_STREAM, self.dp_size, self.dp_rank, epoch])
            self._order = self._shard[rng.permutation(len(self._shard))]
            self._order_epoch = epoch
        return self._order

    def next_step(self) -> list[list[int]]:
        """The next global step's microbatches for this rank (rolls over to the next epoch)."""
        per_rank = self.micro_batch_size * self.num_microbatches
        if self.shuffle == "global":
            start = self.offset + self.dp_rank * per_rank
            mine = self.epoch_order(self.epoch)[start : start + per_rank].tolist()
        else:
            start = self.offset // self.global_batch * per_rank
            mine = self.rank_epoch_order(self.epoch)[start : start + per_rank].tolist()
        # Advance before handing out: a checkpoint taken after this step must not replay it.
        self.offset += self.global_batch
        if self.steps_left_in_epoch == 0:
            self.epoch += 1
            self.offset = 0
        b = self.micro_batch_size
        return [mine[i : i + b] for i in range(0, per_rank, b)]

    def __iter__(self):
        """The remaining steps of the current epoch; afterwards ``epoch`` points at the next one."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_step()

    def __len__(self) -> int:
        return self.steps_left_in_epoch

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_samples": self.num_samples}
        if self.shuffle != "global":  # (checkpoints of global-order runs keep their old form)
            state.update(shuffle=self.shuffle, dp_size=self.dp_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"EpochSampler: checkpoint was taken with num_samples={state['num_samples']}, seed={state['seed']}; "
                f"this run has num_samples={self.num_samples}, seed={self.seed} (the sample order would differ)"
            )
        shuffle = state.get("shuffle", "global")
        if shuffle != self.shuffle:
            raise ValueError(f"EpochSampler: checkpoint was taken with data.shuffle={shuffle}, this run has {self.shuffle} "
                             "(the sample order would differ)")
        if shuffle == "per_rank" and state["dp_size"] != self.dp_size and state["offset"] != 0:
            raise ValueError(
                f"EpochSampler: checkpoint was taken mid-epoch with data.shuffle=per_rank on {state['dp_size']} data-parallel "
                f"ranks; this run has {self.dp_size}, whose shards differ: resume on {state['dp_size']} or from a checkpoint "
                "at an epoch boundary")
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
