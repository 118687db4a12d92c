"""The one validation of a run config's values, used by the trainer, ``--dry-run`` and the pipeline.

``validate_run`` checks every section, the checks that need two sections or the world size, and
nothing else: it reads no file, changes nothing and needs no process group. What depends on files
(the model completed from the student checkpoint, the data, tokenizers, checkpoints and output
directory) is ``planning.preflight``, whose ``prepare_run`` completes the config, calls this and
then checks the files.
"""

from __future__ import annotations

from anchored_megatron.config.errors import ConfigError, require
from anchored_megatron.config.model import ModelConfig

# anchor.* options and the objectives that use them (the others ignore them, so setting one is refused).
_ANCHOR_OPTION_USERS = {
    "alpha": ("anchored", "taid"),
    "alpha_schedule": ("anchored",),
    "alpha_end": ("anchored", "taid"),
    "source": ("anchored",),
    "interpolation": ("anchored",),
    "divergence": ("anchored", "distill"),
    "jsd_beta": ("anchored", "distill"),
    "temperature": ("anchored", "distill"),
    "ce_weight": ("anchored", "distill"),
    "kl_weight": ("sft_kl", "asft"),
    "base_kl_weight": ("anchored",),
}


def validate_run(cfg, world_size: int) -> None:
    """Raise ConfigError (naming the option) for any value this run cannot use.

    Files are optional here (a plan may be made before the data and checkpoints are staged):
    ``planning.preflight`` requires them. The verdict is the same before and after
    ``preflight.complete_run``.
    """
    require(isinstance(cfg.output_dir, str) and cfg.output_dir != "", "output_dir", "is required (where metrics and checkpoints go)")
    require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), "seed", f"must be an integer, got {cfg.seed!r}")
    cfg.parallel.validate(world_size)
    cfg.model.validate(cfg.parallel)
    cfg.anchor.validate()
    cfg.optim.validate()
    cfg.train.validate()
    cfg.data.validate()
    cfg.eval.validate()
    check_packing(cfg.model, cfg.data.packing)
    gold_microbatches = cfg.train.num_microbatches(cfg.parallel.data_parallel_size(world_size))
    if cfg.data.replay_paths:
        cfg.data.replay_microbatches(gold_microbatches)
    _check_options_the_objective_uses(cfg)
    _check_pipeline_schedule(cfg)
    _check_moe_training(cfg)
    _check_fsdp(cfg)
    _check_frozen_hidden_cache(cfg, cfg.parallel.data_parallel_size(world_size))
    _check_checkpoint_options(cfg)
    _check_evaluation(cfg)


def check_packing(model: ModelConfig, packing: bool) -> None:
    """The TE spec's attention is plain causal: Megatron's TEDotProductAttention ignores the
    block-diagonal ``attention_mask`` of packed rows, so packed documents would attend to each
    other. Until the forward step passes ``packed_seq_params`` (THD), refuse that combination."""
    if packing and model.transformer_impl == "transformer_engine":
        raise ConfigError(
            "data.packing: packed documents need the block-diagonal attention mask, which the Transformer Engine "
            "layer spec ignores (its attention is plain causal); set data.packing=false with "
            "model.transformer_impl=transformer_engine, or use model.transformer_impl=local"
        )


# ---- cross-section checks --------------------------------------------------------------------
def changed(cfg, key: str) -> bool:
    """The user set ``key`` to something other than its default: a value that would change
    the run if it were used. (A restated default, e.g. from a copied config.yaml, changes nothing.)"""
    if key not in cfg.explicit_keys:
        return False
    section, name = key.split(".", 1)
    value = getattr(getattr(cfg, section), name)
    return value != getattr(type(getattr(cfg, section))(), name)


def _check_options_the_objective_uses(cfg) -> None:
    """An option this run would ignore, set to a value that would matter, is refused by name."""
    objective = cfg.anchor.objective
    for name, users in _ANCHOR_OPTION_USERS.items():
        if objective not in users and changed(cfg, f"anchor.{name}"):
            raise ConfigError(f"anchor.{name}: is not used by anchor.objective={objective} (only by {' or '.join(users)}); remove it")
    if changed(cfg, "anchor.jsd_beta") and cfg.anchor.divergence != "jsd":
        raise ConfigError(f"anchor.jsd_beta: is used only with anchor.divergence=jsd, got divergence={cfg.anchor.divergence}; remove it")
    if changed(cfg, "anchor.alpha_end") and cfg.anchor.alpha_schedule != "linear" and objective != "taid":
        raise ConfigError("anchor.alpha_end: is used only with anchor.alpha_schedule=linear; remove it or set the schedule")
    if cfg.data.replay_paths and not (cfg.anchor.needs_snapshot or objective == "sft"):
        raise ConfigError(f"data.replay_paths: the replay loss is KL(p_snapshot || p_theta), which needs anchor.objective=anchored "
                          f"with anchor.source=snapshot, or the CE on the replay responses with anchor.objective=sft (rehearsal); "
                          f"got objective={objective}, source={cfg.anchor.source}")
    if changed(cfg, "reference.checkpoint") and not cfg.anchor.needs_reference:
        raise ConfigError(f"reference.checkpoint: is not used by anchor.objective={objective} (it has no frozen reference); remove it")
    if changed(cfg, "model.fp8_recipe") and cfg.model.fp8 is None:
        raise ConfigError("model.fp8_recipe: is used only with model.fp8 (hybrid or e4m3); remove it or set model.fp8")
    if changed(cfg, "model.fused_output_chunk_tokens") and not cfg.model.fused_output_loss:
        raise ConfigError("model.fused_output_chunk_tokens: is used only with model.fused_output_loss=true; remove it or enable the fusion")


def _check_pipeline_schedule(cfg) -> None:
    if cfg.parallel.pp > 1 and (cfg.parallel.vpp or 1) > 1 and cfg.anchor.objective != "sft":
        raise ConfigError(
            "parallel.vpp: the interleaved pipeline schedule cannot carry the frozen roles' hidden states "
            "(Megatron-Core ignores adjust_tensor_shapes_fn there); use parallel.vpp: null with "
            f"anchor.objective={cfg.anchor.objective}, or anchor.objective=sft"
        )


def _check_moe_training(cfg) -> None:
    if cfg.model.is_moe and cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
        raise ConfigError(
            f"parallel.tp: training a MoE model at tp={cfg.parallel.tp} needs parallel.sequence_parallel=true "
            "(Megatron-Core refuses MoE layers under tensor parallelism without it), which needs "
            "model.transformer_impl=transformer_engine; with the local spec split the experts with parallel.ep at tp=1"
        )


FSDP_REFUSED_OUTPUT_OPTIONS = ("model.fused_output_loss", "model.fused_output_chunk_tokens")


def fsdp_refuses(cfg, option: str) -> bool:
    """The user asked for the fused output loss through ``option`` (one of
    ``FSDP_REFUSED_OUTPUT_OPTIONS``): under FSDP that is refused rather than turned off."""
    return option in cfg.explicit_keys and (option == "model.fused_output_loss" or changed(cfg, option))


def _check_fsdp(cfg) -> None:
    if not cfg.parallel.fsdp:
        return
    if cfg.model.is_moe:
        raise ConfigError(
            f"parallel.fsdp: a MoE model (model.num_moe_experts={cfg.model.num_moe_experts}) is not sharded with Megatron-FSDP "
            "here; split its experts with parallel.ep and keep parallel.fsdp=false"
        )
    if "optim.distributed_optimizer" in cfg.explicit_keys and not cfg.optim.distributed_optimizer:
        raise ConfigError(
            "optim.distributed_optimizer: parallel.fsdp=true always shards the optimizer state over the data-parallel "
            "ranks; remove optim.distributed_optimizer=false or set parallel.fsdp=false"
        )
    if not cfg.model.fused_output_loss:
        return
    # The fused loss reads the roles' whole output weights after their forward; under
    # Megatron-FSDP those weights exist only as shards by then. Its default gives way to FSDP
    # (preflight.complete_run turns it off, and the resolved config written next to the run
    # shows it off); a user's explicit true is refused.
    for option in FSDP_REFUSED_OUTPUT_OPTIONS:
        if fsdp_refuses(cfg, option):
            raise ConfigError(
                f"{option}: the fused output loss is not available with parallel.fsdp=true (the output weights are sharded outside "
                "the forward); set model.fused_output_loss=false or parallel.fsdp=false"
            )


def _check_frozen_hidden_cache(cfg, data_parallel_size: int) -> None:
    if not cfg.train.frozen_hidden_cache:
        return
    if not cfg.anchor.frozen_roles:
        raise ConfigError(f"train.frozen_hidden_cache: anchor.objective={cfg.anchor.objective} has no frozen role whose outputs "
                          "could be cached; remove it")
    # Under FSDP the fusion is off whether or not preflight.complete_run has written that yet
    # (an explicit true was refused above).
    if not cfg.model.fused_output_loss or cfg.parallel.fsdp:
        why = " (parallel.fsdp=true turns the fusion off)" if cfg.parallel.fsdp else ""
        raise ConfigError("train.frozen_hidden_cache: caches the final hidden states that the fused output loss consumes; "
                          f"it needs model.fused_output_loss=true{why}")
    if data_parallel_size > 1 and cfg.data.shuffle != "per_rank":
        raise ConfigError(
            f"train.frozen_hidden_cache: with {data_parallel_size} data-parallel ranks and data.shuffle={cfg.data.shuffle} a rank "
            "meets a sequence again only by chance, so the cache would rarely be read; set data.shuffle=per_rank")


def _check_checkpoint_options(cfg) -> None:
    """Which checkpoints the objective needs; whether they exist and fit is ``planning.preflight``'s."""
    if cfg.anchor.needs_reference:
        require(
            cfg.reference.checkpoint is not None or cfg.student.checkpoint is None,
            "reference.checkpoint",
            f"is required for anchor.objective={cfg.anchor.objective} (the frozen teacher"
            + (f", i.e. the base model, for {cfg.anchor.objective})" if cfg.anchor.objective in ("sft_kl", "asft") else ")"),
        )
    if cfg.anchor.needs_base:
        require(cfg.student.checkpoint is not None, "anchor.base_kl_weight",
                "needs student.checkpoint: the base the KL term holds the student to is the checkpoint the student starts from")


def _check_evaluation(cfg) -> None:
    """Evaluation options that need data, and keep_best's rule its figures."""
    evaluation, train = cfg.eval, cfg.train
    if not evaluation.enabled:
        for key in ("eval.interval", "eval.max_sequences", "eval.at_start"):
            if changed(cfg, key):
                raise ConfigError(f"{key}: there is nothing to evaluate; set eval.paths (held-out target data) and/or "
                                  "eval.general_paths (general data), or remove it")
    if train.keep_best is not None and not evaluation.paths:
        raise ConfigError(f"train.keep_best: {train.keep_best} needs the eval target loss; set eval.paths (held-out target data)")
    if train.keep_best_max_general_kl is not None and not evaluation.general_paths:
        raise ConfigError("train.keep_best_max_general_kl: bounds the general KL to the base, which needs eval.general_paths")
