"""The small sections of a run config: parallel layout, optimizer, the method, checkpoints, loop.

Each dataclass checks its own values in ``validate()``; checks that need two sections, the
world size or the files on disk live in ``validate.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from anchored_megatron.config.data import SUPPORTED_SUFFIXES
from anchored_megatron.config.errors import require


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    # Expert-parallel size (MoE models): the experts of each layer are split over ep ranks. The
    # experts keep tensor-parallel size tp, so ep ranks are carved out of the data-parallel ones.
    ep: int = 1
    # Megatron-FSDP: shard every role's weights (and the student's grads and Adam state) over
    # the data-parallel ranks instead of replicating them; see docs/scale-out.md.
    fsdp: bool = False

    def validate(self, world_size: int | None = None, prefix: str = "parallel") -> None:
        require(isinstance(self.tp, int) and self.tp >= 1, f"{prefix}.tp", f"must be an integer >= 1, got {self.tp!r}")
        require(isinstance(self.pp, int) and self.pp >= 1, f"{prefix}.pp", f"must be an integer >= 1, got {self.pp!r}")
        if self.vpp is not None:
            require(isinstance(self.vpp, int) and self.vpp >= 1, f"{prefix}.vpp", f"must be an integer >= 1 or null, got {self.vpp!r}")
            require(self.pp > 1 or self.vpp == 1, f"{prefix}.vpp", f"needs parallel.pp > 1, got pp={self.pp}, vpp={self.vpp}")
        require(not self.sequence_parallel or self.tp > 1, f"{prefix}.sequence_parallel", "needs parallel.tp > 1")
        require(isinstance(self.ep, int) and not isinstance(self.ep, bool) and self.ep >= 1, f"{prefix}.ep", f"must be an integer >= 1, got {self.ep!r}")
        require(isinstance(self.fsdp, bool), f"{prefix}.fsdp", f"must be true or false, got {self.fsdp!r}")
        require(
            not self.fsdp or self.pp == 1, f"{prefix}.fsdp",
            f"shards over data-parallel ranks without pipeline stages; got pp={self.pp}: use parallel.pp=1 with "
            "parallel.fsdp=true (combine it with parallel.tp instead), or parallel.fsdp=false",
        )
        if world_size is not None:
            require(
                world_size % (self.tp * self.pp) == 0,
                f"{prefix}.tp",
                f"tp x pp = {self.tp} x {self.pp} does not divide the world size {world_size}",
            )
            dp = self.data_parallel_size(world_size)
            # Megatron-Core lays the experts out as tp x ep x expert-data-parallel x pp over the
            # same ranks as tp x dp x pp: ep must divide the data-parallel size.
            require(
                dp % self.ep == 0,
                f"{prefix}.ep",
                f"{self.ep} does not divide the data-parallel size {dp} (world size {world_size} / (tp x pp = {self.tp} x {self.pp}))",
            )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    warmup_fraction: float = 0.05  # of the steps of one schedule (a stage when reset per iteration)
    weight_decay: float = 0.0  # not applied to biases and norm weights
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    distributed_optimizer: bool = True

    def validate(self, prefix: str = "optim") -> None:
        require(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, optim.lr], got {self.min_lr}")
        require(self.lr_schedule in ("cosine", "linear", "constant"), f"{prefix}.lr_schedule", f"must be cosine, linear or constant, got {self.lr_schedule!r}")
        require(0 <= self.warmup_fraction < 1, f"{prefix}.warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, f"{prefix}.adam_beta1", "betas must be in [0, 1)")
        require(self.clip_grad >= 0, f"{prefix}.clip_grad", f"must be >= 0, got {self.clip_grad}")


OBJECTIVES = ("anchored", "sft", "sft_kl", "distill", "dft", "asft", "taid")
# Objectives without a frozen reference (the student alone).
REFERENCE_FREE = ("sft", "dft")


@dataclass
class AnchorConfig:
    """The method. ``anchored`` trains T outer iterations x K epochs toward the moving anchor;
    the baselines (``sft``, ``sft_kl``, ``distill``, ``dft``, ``asft``, ``taid``) run the same
    T x K epochs, one stage each unless T is set."""

    objective: str = "anchored"  # anchored | sft | sft_kl | distill | dft | asft | taid
    alpha: float = 0.5
    alpha_schedule: str = "constant"  # constant | linear (from alpha to alpha_end over the iterations)
    alpha_end: float | None = None  # taid: t at the last step (default 1.0)
    source: str = "snapshot"  # snapshot: frozen copy refreshed per iteration | live: the student, detached
    interpolation: str = "logit"  # logit | prob
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0  # anchored/distill: loss = (1-w) divergence + w CE
    kl_weight: float = 0.1  # sft_kl: CE + kl_weight KL(p_base || p_student); asft: DFT's CE + the same KL
    base_kl_weight: float = 0.0  # anchored: + base_kl_weight KL(p_base || p_student), the base a third frozen role
    outer_iterations: int = 5  # T
    epochs_per_iteration: int = 5  # K
    reset_optimizer_per_iteration: bool = False

    def validate(self, prefix: str = "anchor") -> None:
        require(self.objective in OBJECTIVES, f"{prefix}.objective", f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("alpha", "jsd_beta", "ce_weight"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0,
                f"{prefix}.{name}",
                f"must be in [0, 1], got {value!r}",
            )
        require(self.alpha_schedule in ("constant", "linear"), f"{prefix}.alpha_schedule", f"must be constant or linear, got {self.alpha_schedule!r}")
        if self.alpha_schedule == "linear" or (self.objective == "taid" and self.alpha_end is not None):
            require(
                isinstance(self.alpha_end, (int, float)) and 0.0 <= self.alpha_end <= 1.0,
                f"{prefix}.alpha_end",
                f"must be in [0, 1], got {self.alpha_end!r}",
            )
        require(self.source in ("snapshot", "live"), f"{prefix}.source", f"must be snapshot or live, got {self.source!r}")
        require(self.interpolation in ("logit", "prob"), f"{prefix}.interpolation", f"must be logit or prob, got {self.interpolation!r}")
        require(
            self.divergence in ("forward_kl", "reverse_kl", "jsd"),
            f"{prefix}.divergence",
            f"must be forward_kl, reverse_kl or jsd, got {self.divergence!r}",
        )
        require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        require(self.kl_weight >= 0, f"{prefix}.kl_weight", f"must be >= 0, got {self.kl_weight}")
        require(isinstance(self.base_kl_weight, (int, float)) and not isinstance(self.base_kl_weight, bool) and self.base_kl_weight >= 0,
                f"{prefix}.base_kl_weight", f"must be a number >= 0, got {self.base_kl_weight!r}")
        if self.objective == "asft":
            require(self.kl_weight > 0, f"{prefix}.kl_weight", "must be > 0 with objective=asft (0 is objective=dft)")
        for name in ("outer_iterations", "epochs_per_iteration"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{prefix}.{name}", f"must be an integer >= 1, got {value!r}")

    @property
    def needs_reference(self) -> bool:
        return self.objective not in REFERENCE_FREE

    @property
    def needs_snapshot(self) -> bool:
        return self.objective == "anchored" and self.source == "snapshot"

    @property
    def needs_base(self) -> bool:
        """A frozen copy of the base (the student's starting checkpoint) for base_kl_weight."""
        return self.objective == "anchored" and self.base_kl_weight > 0

    @property
    def frozen_roles(self) -> tuple[str, ...]:
        """The frozen models next to the student, in the order their outputs are handed over."""
        return tuple(name for name, needed in (("reference", self.needs_reference), ("snapshot", self.needs_snapshot),
                                               ("base", self.needs_base)) if needed)


@dataclass
class CheckpointRef:
    """A model to load: a converted / trainer checkpoint directory (None = random init, tests only)."""

    checkpoint: str | None = None


KEEP_BEST_RULES = ("target_loss",)


@dataclass
class EvalConfig:
    """Evaluation during training: held-out target data and general data (what the model should
    keep), evaluated at step 0, every ``interval`` steps, at each outer-iteration end and at the
    run's end. Same formats and chat handling as ``data.paths`` (the data section's tokenizer,
    template, sequence length and packing)."""

    paths: list[str] = field(default_factory=list)  # held-out target data: its loss (CE on the responses)
    # General data, e.g. prompts with the base's own answers: its loss and KL(p_base || p_theta),
    # the forgetting monitor, where the base is student.checkpoint.
    general_paths: list[str] = field(default_factory=list)
    interval: int = 0  # steps between evaluations; 0 = only at step 0, outer-iteration ends and the run's end
    max_sequences: int | None = None  # of each set, the first N sequences; None = all
    at_start: bool = True  # evaluate before the first step of a fresh run (the base's figures)

    @property
    def enabled(self) -> bool:
        return bool(self.paths or self.general_paths)

    def validate(self, prefix: str = "eval") -> None:
        for name in ("paths", "general_paths"):
            value = getattr(self, name)
            require(isinstance(value, (list, tuple)), f"{prefix}.{name}", f"must be a list of local files, got {value!r}")
            for i, path in enumerate(value):
                require(isinstance(path, str) and path.endswith(SUPPORTED_SUFFIXES), f"{prefix}.{name}[{i}]",
                        f"must be a {', '.join(SUPPORTED_SUFFIXES)} file path, got {path!r}")
        require(isinstance(self.interval, int) and not isinstance(self.interval, bool) and self.interval >= 0,
                f"{prefix}.interval", f"must be an integer >= 0, got {self.interval!r}")
        if self.max_sequences is not None:
            require(isinstance(self.max_sequences, int) and self.max_sequences >= 1, f"{prefix}.max_sequences",
                    f"must be an integer >= 1 or null, got {self.max_sequences!r}")
        require(isinstance(self.at_start, bool), f"{prefix}.at_start", f"must be true or false, got {self.at_start!r}")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    log_interval: int = 1
    save_interval: int = 0  # steps between checkpoints; 0 = only at each outer-iteration end
    save_at_iteration_end: bool = True
    keep_checkpoints: int = 2  # newest trainer checkpoints kept on disk
    max_nonfinite_in_a_row: int = 5  # skipped updates before the run aborts
    max_steps: int | None = None  # stop early (tests, smoke runs); None = all T x K epochs
    verify_checkpoint_checksums: bool = True  # on load; file sizes are always checked against the manifest
    allow_reference_change: bool = False  # resume with a reference.checkpoint other than the one trained against
    tensorboard: bool = True
    progress_bar: bool = True
    # Keep the frozen roles' final hidden states in host memory, per sequence, and reuse them
    # instead of running those roles again: the reference's for the whole run, the snapshot's
    # until it is refreshed. Exact; needs model.fused_output_loss. Costs host memory (logged at start).
    frozen_hidden_cache: bool = False
    # How long a rank waits in a collective for the others (Megatron-LM's --distributed-timeout-minutes):
    # a rank that stops answering ends the run after this long. It also bounds start-up waits, such as
    # the other ranks waiting while global rank 0 tokenizes the data.
    collective_timeout_minutes: float = 30.0
    # Besides the newest keep_checkpoints, keep the checkpoint with the best evaluation:
    # "target_loss" = the lowest eval target loss (needs eval.paths). Every evaluation is then
    # followed by a save, so that each evaluated step has its checkpoint.
    keep_best: str | None = None
    # With keep_best: only evaluations whose general KL to the base stays at or under this bound
    # compete (needs eval.general_paths).
    keep_best_max_general_kl: float | None = None

    def validate(self, prefix: str = "train") -> None:
        for name in ("micro_batch_size", "global_batch_size", "log_interval", "keep_checkpoints", "max_nonfinite_in_a_row"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{prefix}.{name}", f"must be an integer >= 1, got {value!r}")
        require(isinstance(self.save_interval, int) and self.save_interval >= 0, f"{prefix}.save_interval", f"must be an integer >= 0, got {self.save_interval!r}")
        if self.max_steps is not None:
            require(isinstance(self.max_steps, int) and self.max_steps >= 1, f"{prefix}.max_steps", f"must be an integer >= 1 or null, got {self.max_steps!r}")
        require(isinstance(self.frozen_hidden_cache, bool), f"{prefix}.frozen_hidden_cache", f"must be true or false, got {self.frozen_hidden_cache!r}")
        timeout = self.collective_timeout_minutes
        require(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0,
                f"{prefix}.collective_timeout_minutes", f"must be a number of minutes > 0, got {timeout!r}")
        require(self.keep_best in (None, *KEEP_BEST_RULES), f"{prefix}.keep_best",
                f"must be null or one of {', '.join(KEEP_BEST_RULES)}, got {self.keep_best!r}")
        bound = self.keep_best_max_general_kl
        if bound is not None:
            require(isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound) and bound >= 0,
                    f"{prefix}.keep_best_max_general_kl", f"must be a number >= 0 or null, got {bound!r}")
            require(self.keep_best is not None, f"{prefix}.keep_best_max_general_kl", "is used only with train.keep_best; set both or neither")

    def num_microbatches(self, data_parallel_size: int, prefix: str = "train") -> int:
        per_step = self.micro_batch_size * data_parallel_size
        require(
            self.global_batch_size % per_step == 0,
            f"{prefix}.global_batch_size",
            f"{self.global_batch_size} is not divisible by train.micro_batch_size x data-parallel size = "
            f"{self.micro_batch_size} x {data_parallel_size}",
        )
        return self.global_batch_size // per_step
