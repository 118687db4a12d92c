"""Megatron DDP wrapping, the (distributed) optimizer and its LR / weight-decay schedule."""

from __future__ import annotations

import torch

from anchored_megatron.config import OptimConfig


def wrap_ddp(chunks, use_distributed_optimizer: bool):
    """Wrap trainable chunks in Megatron DDP (fp32 grad buffers and reductions)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Only the first chunk's buckets start immediately: Megatron-LM's convention.
        wrapped.append(
            DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        )
    return wrapped


def build_optimizer(wrapped_chunks, cfg: OptimConfig, params_dtype: torch.dtype, total_steps: int):
    """Megatron optimizer + its scheduler for ``total_steps`` steps (warm-up then ``cfg.lr_schedule``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            use_distributed_optimizer=cfg.distributed_optimizer,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            params_dtype=params_dtype,
        ),
        wrapped_chunks,
    )
    return optimizer, build_scheduler(optimizer, cfg, total_steps)


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    """The LR of update k (1-based) of ``total_steps`` with W = round(warmup_fraction x total_steps)
    warm-up steps: lr x k / W while k <= W, then the decay from lr toward min_lr, reaching min_lr
    one step after the last update, so every update (the last included) moves the weights
    even when min_lr is 0."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total_steps = max(1, total_steps)
    warmup = int(round(cfg.warmup_fraction * total_steps))  # < total_steps + 1, as Megatron requires
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.lr_schedule != "constant" else cfg.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps + 1 if cfg.lr_schedule != "constant" else warmup + 1,
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
    # Megatron's scheduler gives the LR of its step count; update k runs at count k (count 0 is
    # the warm-up's lr 0), and the trainer steps the scheduler after each update.
    scheduler.step(increment=1)
    return scheduler


def reset_optimizer_state(optimizer) -> None:
    """Forget Adam's moments and step counts (a fresh optimizer for a new stage), keeping the
    master weights. Works for plain, distributed and chained Megatron optimizers."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        torch_opt = opt.optimizer
        for state in torch_opt.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()


# The scheduler's saved fields that come from options, and the option each comes from.
_SCHEDULE_OPTIONS = (
    ("max_lr", "optim.lr"),
    ("min_lr", "optim.min_lr"),
    ("lr_decay_style", "optim.lr_schedule"),
    ("lr_warmup_steps", "optim.warmup_fraction"),
    ("start_wd", "optim.weight_decay"),
)


def check_resumed_schedule(scheduler, saved: dict, checkpoint: str) -> None:
    """Refuse to resume with optimizer options other than those the checkpoint trained with.

    Megatron's scheduler keeps the checkpoint's values on load and ignores the ones it was
    built with, so a changed ``optim.lr`` would be dropped without a word.
    """
    from anchored_megatron.config import ConfigError

    for field, option in _SCHEDULE_OPTIONS:
        mine, theirs = getattr(scheduler, field), saved.get(field)
        if theirs is not None and mine != theirs:
            what = f"warm-up steps {mine} (optim.warmup_fraction x the run's steps)" if field == "lr_warmup_steps" else f"{mine!r}"
            raise ConfigError(
                f"{option}: gives {what}, but {checkpoint} was trained with {theirs!r}; a resumed run keeps the "
                f"schedule it started with: set {option} back, or start a new run (another output_dir) from this "
                "checkpoint as student.checkpoint"
            )


def load_scheduler_state(scheduler, state: dict) -> None:
    """Megatron's scheduler *adds* the saved step count to its own on load; start from 0."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(state)
