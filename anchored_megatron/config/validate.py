"""The one validation of a run config, used by the trainer, ``--dry-run`` and the pipeline.

``validate_run`` first completes the model from the student checkpoint (field by field: the
architecture is the checkpoint's, how to run it is the YAML's), then checks every section,
the checks that need two sections or the world size, and (``check_files``) the files the run
reads and the directory it writes. It needs no process group; torch is imported only to load
the tokenizers when the files are checked.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from anchored_megatron.config.errors import ConfigError, require
from anchored_megatron.config.model import ModelConfig
from anchored_megatron.config.presets import PRESETS
from anchored_megatron.config.stored import read_model_config

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


def validate_run(cfg, world_size: int, check_files: bool = True) -> None:
    """Raise ConfigError (naming the option) for anything this run cannot do.

    Completes ``cfg.model`` from the student checkpoint when one exists (also with
    ``check_files=False``: a plan of a real run must show the checkpoint's model). Idempotent.
    """
    require(isinstance(cfg.output_dir, str) and cfg.output_dir != "", "output_dir", "is required (where metrics and checkpoints go)")
    require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), "seed", f"must be an integer, got {cfg.seed!r}")
    complete_model_from_student(cfg, check_files)
    cfg.parallel.validate(world_size)
    cfg.model.validate(cfg.parallel)
    cfg.anchor.validate()
    cfg.optim.validate()
    cfg.train.validate()
    cfg.data.validate(check_files=check_files)
    check_packing(cfg.model, cfg.data.packing)
    gold_microbatches = cfg.train.num_microbatches(cfg.parallel.data_parallel_size(world_size))
    if cfg.data.replay_paths:
        cfg.data.replay_microbatches(gold_microbatches)
    _check_options_the_objective_uses(cfg)
    _check_pipeline_schedule(cfg)
    _check_moe_training(cfg)
    _check_fsdp(cfg)
    _check_frozen_hidden_cache(cfg, cfg.parallel.data_parallel_size(world_size))
    _check_checkpoints(cfg, check_files)
    if check_files:
        _check_tokenizers(cfg)
        _check_output_dir(cfg)


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


# ---- the model from the student checkpoint ---------------------------------------------------
def _user_set_model_fields(cfg) -> dict[str, str]:
    """Model fields the user chose -> the option that chose them (``model.x`` or ``model.preset``)."""
    chosen = {k.split(".", 1)[1]: k for k in cfg.explicit_keys if k.startswith("model.")}
    if cfg.model.preset in PRESETS:
        for name in PRESETS[cfg.model.preset]:
            chosen.setdefault(name, "model.preset")
    chosen.pop("preset", None)
    return chosen


def complete_model_from_student(cfg, check_files: bool) -> None:
    """``cfg.model`` <- the student checkpoint's architecture + the YAML's run-time fields.

    A field the user set that contradicts the checkpoint's architecture is refused by name;
    an unset run-time field takes the checkpoint's value.
    """
    path = cfg.student.checkpoint
    if path is None:
        return
    if not os.path.exists(path):
        require(not check_files, "student.checkpoint", f"{path}: not found")
        return
    from anchored_megatron.training.checkpoint_dirs import resolve_checkpoint_dir

    where = resolve_checkpoint_dir(path, "student.checkpoint")
    stored = read_model_config(where, "student.checkpoint")
    if stored is None:
        return
    chosen = _user_set_model_fields(cfg)
    merged = {}
    for f in dataclasses.fields(ModelConfig):
        name, mine, theirs = f.name, getattr(cfg.model, f.name), getattr(stored, f.name)
        if name == "preset":
            merged[name] = mine
        elif name in ModelConfig.RUNTIME_FIELDS:
            merged[name] = mine if name in chosen else theirs
        else:
            if name in chosen and mine != theirs:
                option = chosen[name]
                what = f"sets {name}={mine!r}" if option == "model.preset" else f"is {mine!r}"
                raise ConfigError(
                    f"{option}: {what}, but the student checkpoint {where} has {name}={theirs!r}; the architecture comes "
                    f"from the checkpoint: remove {option} from the config (or start from another checkpoint)"
                )
            merged[name] = theirs
    cfg.model = ModelConfig(**merged)


# ---- cross-section checks --------------------------------------------------------------------
def _changed(cfg, key: str) -> bool:
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
        if objective not in users and _changed(cfg, f"anchor.{name}"):
            raise ConfigError(f"anchor.{name}: is not used by anchor.objective={objective} (only by {' or '.join(users)}); remove it")
    if _changed(cfg, "anchor.jsd_beta") and cfg.anchor.divergence != "jsd":
        raise ConfigError(f"anchor.jsd_beta: is used only with anchor.divergence=jsd, got divergence={cfg.anchor.divergence}; remove it")
    if _changed(cfg, "anchor.alpha_end") and cfg.anchor.alpha_schedule != "linear" and objective != "taid":
        raise ConfigError("anchor.alpha_end: is used only with anchor.alpha_schedule=linear; remove it or set the schedule")
    if cfg.data.replay_paths and not (cfg.anchor.needs_snapshot or objective == "sft"):
        raise ConfigError(f"data.replay_paths: the replay loss is KL(p_snapshot || p_theta), which needs anchor.objective=anchored "
                          f"with anchor.source=snapshot, or the CE on the replay responses with anchor.objective=sft (rehearsal); "
                          f"got objective={objective}, source={cfg.anchor.source}")
    if _changed(cfg, "reference.checkpoint") and not cfg.anchor.needs_reference:
        raise ConfigError(f"reference.checkpoint: is not used by anchor.objective={objective} (it has no frozen reference); remove it")
    if _changed(cfg, "model.fp8_recipe") and cfg.model.fp8 is None:
        raise ConfigError("model.fp8_recipe: is used only with model.fp8 (hybrid or e4m3); remove it or set model.fp8")
    if _changed(cfg, "model.fused_output_chunk_tokens") and not cfg.model.fused_output_loss:
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
    # (the resolved config written next to the run shows it off); a user's explicit true is refused.
    for option in ("model.fused_output_loss", "model.fused_output_chunk_tokens"):
        if option in cfg.explicit_keys and (option == "model.fused_output_loss" or _changed(cfg, option)):
            raise ConfigError(
                f"{option}: the fused output loss is not available with parallel.fsdp=true (the output weights are sharded outside "
                "the forward); set model.fused_output_loss=false or parallel.fsdp=false"
            )
    cfg.model = dataclasses.replace(cfg.model, fused_output_loss=False)


def _check_frozen_hidden_cache(cfg, data_parallel_size: int) -> None:
    if not cfg.train.frozen_hidden_cache:
        return
    if not cfg.anchor.frozen_roles:
        raise ConfigError(f"train.frozen_hidden_cache: anchor.objective={cfg.anchor.objective} has no frozen role whose outputs "
                          "could be cached; remove it")
    if not cfg.model.fused_output_loss:
        why = " (parallel.fsdp=true turns the fusion off)" if cfg.parallel.fsdp else ""
        raise ConfigError("train.frozen_hidden_cache: caches the final hidden states that the fused output loss consumes; "
                          f"it needs model.fused_output_loss=true{why}")
    if data_parallel_size > 1 and cfg.data.shuffle != "per_rank":
        raise ConfigError(
            f"train.frozen_hidden_cache: with {data_parallel_size} data-parallel ranks and data.shuffle={cfg.data.shuffle} a rank "
            "meets a sequence again only by chance, so the cache would rarely be read; set data.shuffle=per_rank")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_checkpoints(cfg, check_files: bool) -> None:
    from anchored_megatron.training.checkpoint_dirs import resolve_checkpoint_dir

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
    reference = cfg.reference.checkpoint if cfg.anchor.needs_reference else None
    if reference is not None and _inside(reference, cfg.output_dir):
        _refuse_reference_inside_output_dir(reference, cfg.output_dir)
    for key, ref in (("student.checkpoint", cfg.student), ("reference.checkpoint", cfg.reference)):
        if ref.checkpoint is not None and (check_files or os.path.exists(ref.checkpoint)):
            require(os.path.isdir(ref.checkpoint), key, f"{ref.checkpoint}: not a directory")
            resolve_checkpoint_dir(ref.checkpoint, key)
    if reference is not None and os.path.exists(reference):
        resolved = resolve_checkpoint_dir(reference, "reference.checkpoint")
        if _inside(resolved, cfg.output_dir):  # e.g. through a symbolic link
            _refuse_reference_inside_output_dir(reference, cfg.output_dir)
        _check_reference_architecture(cfg, resolved)


def _refuse_reference_inside_output_dir(reference: str, output_dir: str) -> None:
    # The run's own checkpoints move on every save: a reference among them would silently
    # become the student after a resume.
    raise ConfigError(
        f"reference.checkpoint: {reference} lies inside this run's output_dir {output_dir}, whose checkpoints "
        "change as it trains; point it at a checkpoint outside the output directory (e.g. the teacher run's)"
    )


def _check_reference_architecture(cfg, where: str) -> None:
    """The reference is built from ``cfg.model`` with its own MLP (``reference_model``): any other
    difference in shape or vocabulary would load wrongly or not at all."""
    ref = read_model_config(where, "reference.checkpoint")
    if ref is None:
        return
    for name in ModelConfig.architecture_fields():
        if name not in ModelConfig.MLP_FIELDS and getattr(ref, name) != getattr(cfg.model, name):
            raise ConfigError(
                f"reference.checkpoint: {name}={getattr(ref, name)!r} differs from the student's "
                f"{getattr(cfg.model, name)!r}; the reference must share the student's architecture and vocabulary "
                f"(only its MLP may differ: {', '.join(ModelConfig.MLP_FIELDS)})"
            )
    model = cfg.model.with_mlp_of(ref)
    try:
        model.validate(dataclasses.replace(cfg.parallel, ep=cfg.parallel.ep if model.is_moe else 1), prefix="reference")
    except ConfigError as exc:
        raise ConfigError(f"reference.checkpoint: {where}: {exc}") from None


def reference_model(cfg) -> ModelConfig:
    """The ModelConfig the frozen reference is built from: the student's, with the MLP of the
    reference checkpoint (dense or MoE; validated by ``validate_run``)."""
    from anchored_megatron.training.checkpoint_dirs import resolve_checkpoint_dir

    if cfg.reference.checkpoint is None:
        return cfg.model
    ref = read_model_config(resolve_checkpoint_dir(cfg.reference.checkpoint, "reference.checkpoint"), "reference.checkpoint")
    return cfg.model if ref is None else cfg.model.with_mlp_of(ref)


def _check_tokenizers(cfg) -> None:
    """The data's tokenizer must fit the model's vocabulary and be the one any student or
    reference checkpoint ships: the loss compares the roles' distributions token by token."""
    from anchored_megatron.data.tokenizer import TokenizerError, load_tokenizer
    from anchored_megatron.training.checkpoint_dirs import resolve_checkpoint_dir

    def load(key: str, path: str):
        try:
            return load_tokenizer(path)
        except TokenizerError as exc:
            raise ConfigError(f"{key}: {exc}") from None

    data_tokenizer = load("data.tokenizer", cfg.data.tokenizer)
    require(
        data_tokenizer.vocab_size <= cfg.model.vocab_size,
        "data.tokenizer",
        f"{cfg.data.tokenizer} has {data_tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}",
    )
    fingerprints = {"data.tokenizer": data_tokenizer.fingerprint}
    for key, ref in (("student.checkpoint", cfg.student), ("reference.checkpoint", cfg.reference)):
        if ref.checkpoint is None:
            continue
        directory = resolve_checkpoint_dir(ref.checkpoint, key)
        if any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")):
            fingerprints[key] = load(key, directory).fingerprint
    require(
        len(set(fingerprints.values())) == 1,
        "data.tokenizer",
        f"tokenizers differ between {', '.join(fingerprints)}: student and reference must share one tokenizer",
    )


def _check_output_dir(cfg) -> None:
    """Refuse before anything heavy: a directory the run cannot write, or a disk without room
    for one checkpoint (the planner's estimate)."""
    from anchored_megatron.planning.memory import GIB, checkpoint_bytes

    path = os.path.abspath(cfg.output_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    require(os.path.isdir(existing), "output_dir", f"{path}: {existing} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and immutable folders all show here
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"output_dir: {path}: cannot write there ({existing}: {exc.strerror})") from None
    need = checkpoint_bytes(cfg)
    free = shutil.disk_usage(existing).free
    require(
        free >= need,
        "output_dir",
        f"{path}: {free / GIB:.2f} GiB free on its filesystem, one checkpoint of this run needs about {need / GIB:.2f} GiB "
        "(weights + optimizer state); free space or choose another output_dir",
    )
