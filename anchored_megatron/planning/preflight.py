"""Before a run: complete the config from the checkpoints, check its values, then read the files.

``prepare_run`` is the one entry the trainer and ``--dry-run`` call:

1. ``complete_run`` rewrites what the config leaves to the files and the layout: the model from
   the student checkpoint (field by field: the architecture is the checkpoint's, how to run it
   is the YAML's), and the fused output loss off under FSDP unless the user asked for it;
2. ``config.validate.validate_run`` checks the values (it reads no file);
3. ``check_run_files`` checks what the run reads and writes: the data files, the checkpoints
   (the reference's architecture, and never inside output_dir), the tokenizers against the model
   and each other, and the output directory with room for one checkpoint.

No process group is needed; torch is imported only to load the tokenizers when the files are
checked.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir
from anchored_megatron.checkpoint.model_config import read_model_config
from anchored_megatron.config import PRESETS, ConfigError, ModelConfig, RunConfig
from anchored_megatron.config.errors import require
from anchored_megatron.config.validate import FSDP_REFUSED_OUTPUT_OPTIONS, fsdp_refuses, validate_run
from anchored_megatron.planning.memory import GIB, checkpoint_bytes


def prepare_run(cfg: RunConfig, world_size: int, check_files: bool = True) -> None:
    """Complete ``cfg`` in place and raise ConfigError (naming the option or file) for anything
    this run cannot do. ``check_files=False`` plans before the data and checkpoints are staged:
    missing files are then not errors, but a checkpoint that exists is still read (a plan of a
    real run must show the checkpoint's model). Idempotent."""
    complete_run(cfg, check_files)
    validate_run(cfg, world_size)
    check_run_files(cfg, check_files)


def complete_run(cfg: RunConfig, check_files: bool = True) -> None:
    """Rewrite ``cfg`` with what the files and the layout decide (see the module docstring)."""
    complete_model_from_student(cfg, check_files)
    _fsdp_turns_the_output_fusion_off(cfg)


def check_run_files(cfg: RunConfig, check_files: bool = True) -> None:
    """The files of a completed, validated config; with ``check_files=False`` only the
    checkpoints that exist are read."""
    if check_files:
        from anchored_megatron.data.files import check_data_files  # data/ imports torch; --dry-run without files does not need it

        check_data_files(cfg.data)
        _check_eval_files(cfg)
    _check_checkpoints(cfg, check_files)
    if check_files:
        _check_tokenizers(cfg)
        _check_output_dir(cfg)


def _check_eval_files(cfg: RunConfig) -> None:
    """Present; whether they overlap the training data is read at set-up (``training.evaluation``)."""
    for option in ("paths", "general_paths"):
        for i, path in enumerate(getattr(cfg.eval, option)):
            require(os.path.isfile(path), f"eval.{option}[{i}]", f"{path}: file not found")


# ---- completion ------------------------------------------------------------------------------
def _user_set_model_fields(cfg: RunConfig) -> dict[str, str]:
    """Model fields the user chose -> the option that chose them (``model.x`` or ``model.preset``)."""
    chosen = {k.split(".", 1)[1]: k for k in cfg.explicit_keys if k.startswith("model.")}
    if cfg.model.preset in PRESETS:
        for name in PRESETS[cfg.model.preset]:
            chosen.setdefault(name, "model.preset")
    chosen.pop("preset", None)
    return chosen


def complete_model_from_student(cfg: RunConfig, check_files: bool) -> None:
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


def _fsdp_turns_the_output_fusion_off(cfg: RunConfig) -> None:
    # The fused output loss cannot run under Megatron-FSDP (validate._check_fsdp says why). Its
    # default gives way, so that the resolved config written next to the run shows it off; a
    # user's explicit request is left on for validate_run to refuse by name.
    if cfg.parallel.fsdp is not True or cfg.model.fused_output_loss is not True:
        return
    if not any(fsdp_refuses(cfg, option) for option in FSDP_REFUSED_OUTPUT_OPTIONS):
        cfg.model = dataclasses.replace(cfg.model, fused_output_loss=False)


# ---- checkpoints -----------------------------------------------------------------------------
def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_checkpoints(cfg: RunConfig, check_files: bool) -> None:
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


def _check_reference_architecture(cfg: RunConfig, where: str) -> None:
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


def reference_model(cfg: RunConfig) -> ModelConfig:
    """The ModelConfig the frozen reference is built from: the student's, with the MLP of the
    reference checkpoint (dense or MoE; checked by ``prepare_run``)."""
    if cfg.reference.checkpoint is None:
        return cfg.model
    ref = read_model_config(resolve_checkpoint_dir(cfg.reference.checkpoint, "reference.checkpoint"), "reference.checkpoint")
    return cfg.model if ref is None else cfg.model.with_mlp_of(ref)


# ---- tokenizers and the output directory -------------------------------------------------------
def _check_tokenizers(cfg: RunConfig) -> None:
    """The data's tokenizer must fit the model's vocabulary and be the one any student or
    reference checkpoint ships: the loss compares the roles' distributions token by token."""
    # Imported here: the data package loads torch, which a plan without file checks never needs.
    from anchored_megatron.data.tokenizer import TokenizerError, load_tokenizer

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


def _check_output_dir(cfg: RunConfig) -> None:
    """Refuse before anything heavy: a directory the run cannot write, or a disk without room
    for one checkpoint (the planner's estimate)."""
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
