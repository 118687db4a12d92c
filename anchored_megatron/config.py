"""Dataclass configs for every option, loaded from YAML with dotted overrides.

Each dataclass validates itself in ``validate()``; errors name the option by its
dotted key (``parallel.tp``) so a user can find it in their YAML.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad option; the message names the dotted key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False

    def validate(self, world_size: int | None = None, prefix: str = "parallel") -> None:
        _require(isinstance(self.tp, int) and self.tp >= 1, f"{prefix}.tp", f"must be an integer >= 1, got {self.tp!r}")
        _require(isinstance(self.pp, int) and self.pp >= 1, f"{prefix}.pp", f"must be an integer >= 1, got {self.pp!r}")
        if self.vpp is not None:
            _require(isinstance(self.vpp, int) and self.vpp >= 1, f"{prefix}.vpp", f"must be an integer >= 1 or null, got {self.vpp!r}")
            _require(self.pp > 1 or self.vpp == 1, f"{prefix}.vpp", f"needs parallel.pp > 1, got pp={self.pp}, vpp={self.vpp}")
        _require(not self.sequence_parallel or self.tp > 1, f"{prefix}.sequence_parallel", "needs parallel.tp > 1")
        if world_size is not None:
            _require(
                world_size % (self.tp * self.pp) == 0,
                f"{prefix}.tp",
                f"tp x pp = {self.tp} x {self.pp} does not divide the world size {world_size}",
            )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass
class ModelConfig:
    """A Llama-shaped decoder. ``preset`` fills the sizes by name (see models/presets.py)."""

    preset: str | None = None
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int | None = None  # per-head dimension; None = hidden_size / num_attention_heads (Qwen3 sets 128)
    vocab_size: int = 256  # true vocabulary; padded to a multiple of make_vocab_size_divisible_by x tp
    make_vocab_size_divisible_by: int = 16
    seq_length: int = 64
    rotary_base: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "local"  # local | transformer_engine
    # FP8 GEMMs in the transformer layers of every role (Transformer Engine, CUDA 8.9+); the
    # embedding, output layer and loss stay in bf16/fp32. null | hybrid | e4m3.
    fp8: str | None = None
    fp8_recipe: str = "delayed"  # delayed | tensorwise (per-tensor current scaling)
    fp8_bf16_first_last_layers: int = 0  # layers at each end kept in bf16 under FP8 (needs fp8_recipe=tensorwise)
    fused_kernels: bool = True  # on GPU, use the fused kernels (jit, Transformer Engine, apex) that are installed

    # How to run the model, not what it is: a checkpoint's shape never dictates these.
    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "params_dtype", "transformer_impl", "fp8", "fp8_recipe", "fp8_bf16_first_last_layers", "fused_kernels",
    )

    def validate(self, parallel: ParallelConfig | None = None, prefix: str = "model") -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size", "seq_length"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{prefix}.{name}", f"must be a positive integer, got {value!r}")
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"{prefix}.hidden_size",
                f"{self.hidden_size} is not divisible by model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
            )
        else:
            _require(isinstance(self.kv_channels, int) and self.kv_channels >= 1, f"{prefix}.kv_channels", f"must be a positive integer or null, got {self.kv_channels!r}")
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"{prefix}.num_query_groups",
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by {self.num_query_groups}",
        )
        _require(self.params_dtype in ("fp32", "bf16", "fp16"), f"{prefix}.params_dtype", f"must be fp32, bf16 or fp16, got {self.params_dtype!r}")
        _require(
            self.transformer_impl in ("local", "transformer_engine"),
            f"{prefix}.transformer_impl",
            f"must be 'local' or 'transformer_engine', got {self.transformer_impl!r}",
        )
        self._validate_precision(parallel, prefix)
        if parallel is not None:
            _require(
                self.num_attention_heads % parallel.tp == 0,
                f"{prefix}.num_attention_heads",
                f"{self.num_attention_heads} is not divisible by parallel.tp={parallel.tp}",
            )
            _require(
                self.num_query_groups % parallel.tp == 0,
                f"{prefix}.num_query_groups",
                f"{self.num_query_groups} is not divisible by parallel.tp={parallel.tp}",
            )
            _require(
                self.ffn_hidden_size % parallel.tp == 0,
                f"{prefix}.ffn_hidden_size",
                f"{self.ffn_hidden_size} is not divisible by parallel.tp={parallel.tp}",
            )
            stages = parallel.pp * (parallel.vpp or 1)
            _require(
                self.num_layers % stages == 0,
                f"{prefix}.num_layers",
                f"{self.num_layers} is not divisible by parallel.pp x parallel.vpp = {stages}",
            )

    def _validate_precision(self, parallel: ParallelConfig | None, prefix: str) -> None:
        """FP8 / fused-kernel options; what the machine offers is checked when the model is built."""
        _require(self.fp8 in (None, "hybrid", "e4m3"), f"{prefix}.fp8", f"must be null, hybrid or e4m3, got {self.fp8!r}")
        _require(self.fp8_recipe in ("delayed", "tensorwise"), f"{prefix}.fp8_recipe", f"must be delayed or tensorwise, got {self.fp8_recipe!r}")
        _require(isinstance(self.fused_kernels, bool), f"{prefix}.fused_kernels", f"must be true or false, got {self.fused_kernels!r}")
        edge = self.fp8_bf16_first_last_layers
        _require(
            isinstance(edge, int) and not isinstance(edge, bool) and edge >= 0,
            f"{prefix}.fp8_bf16_first_last_layers", f"must be an integer >= 0, got {edge!r}",
        )
        if sp := (parallel is not None and parallel.sequence_parallel):
            _require(
                self.transformer_impl == "transformer_engine",
                "parallel.sequence_parallel",
                "needs model.transformer_impl=transformer_engine: the local layer spec's RMSNorm is torch's, which "
                "Megatron-Core refuses under sequence parallelism (apex's fused norm is LayerNorm only)",
            )
        if self.fp8 is None:
            _require(edge == 0, f"{prefix}.fp8_bf16_first_last_layers", f"needs model.fp8 (hybrid or e4m3), got fp8=null and {edge}")
            return
        _require(
            self.transformer_impl == "transformer_engine",
            f"{prefix}.fp8",
            f"needs model.transformer_impl=transformer_engine (the local layer spec has no FP8 GEMMs), got {self.transformer_impl!r}",
        )
        _require(self.params_dtype == "bf16", f"{prefix}.fp8", f"needs model.params_dtype=bf16, got {self.params_dtype!r}")
        _require(
            edge == 0 or self.fp8_recipe == "tensorwise",
            f"{prefix}.fp8_bf16_first_last_layers",
            "needs model.fp8_recipe=tensorwise (delayed scaling cannot leave single layers out of FP8)",
        )
        tp = parallel.tp if parallel is not None else 1
        stages = parallel.pp if parallel is not None else 1
        _require(
            edge <= self.num_layers // stages,
            f"{prefix}.fp8_bf16_first_last_layers",
            f"{edge} exceeds the {self.num_layers // stages} layers of one pipeline stage",
        )
        # Transformer Engine's FP8 GEMMs need every GEMM dimension a multiple of 16 and the
        # token count a multiple of 8 (here: 16, so it holds for any micro-batch size).
        dims = {
            f"{prefix}.hidden_size": self.hidden_size,
            f"{prefix}.ffn_hidden_size / parallel.tp": self.ffn_hidden_size // tp,
            f"{prefix}.num_attention_heads x head_dim / parallel.tp": self.num_attention_heads * self.head_dim // tp,
            f"{prefix}.num_query_groups x head_dim / parallel.tp": self.num_query_groups * self.head_dim // tp,
            f"{prefix}.seq_length" + (" / parallel.tp" if sp else ""): self.seq_length // (tp if sp else 1),
        }
        for name, value in dims.items():
            _require(value % 16 == 0, f"{prefix}.fp8", f"FP8 GEMMs need {name} to be a multiple of 16, got {value}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


def _dataclass_from_dict(cls, data: dict[str, Any], prefix: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in known:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{key}: unknown option (known: {', '.join(sorted(known))})")
        f = known[key]
        sub = _nested_dataclass(f)
        if sub is not None and isinstance(value, dict):
            value = _dataclass_from_dict(sub, value, f"{prefix + '.' if prefix else ''}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _nested_dataclass(f: dataclasses.Field):
    default_factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    if default_factory is not None and dataclasses.is_dataclass(default_factory):
        return default_factory
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (returns a new dict)."""
    import copy

    data = copy.deepcopy(data or {})
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def build(cls, data: dict, prefix: str = ""):
    """Build a (possibly nested) config dataclass from a dict, rejecting unknown keys."""
    return _dataclass_from_dict(cls, data, prefix)


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
        _require(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, optim.lr], got {self.min_lr}")
        _require(self.lr_schedule in ("cosine", "linear", "constant"), f"{prefix}.lr_schedule", f"must be cosine, linear or constant, got {self.lr_schedule!r}")
        _require(0 <= self.warmup_fraction < 1, f"{prefix}.warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, f"{prefix}.adam_beta1", "betas must be in [0, 1)")
        _require(self.clip_grad >= 0, f"{prefix}.clip_grad", f"must be >= 0, got {self.clip_grad}")


OBJECTIVES = ("anchored", "sft", "sft_kl", "distill")


@dataclass
class AnchorConfig:
    """The method. ``anchored`` trains T outer iterations x K epochs toward the moving anchor;
    the baselines (``sft``, ``sft_kl``, ``distill``) run the same T x K epochs, one stage each
    unless T is set."""

    objective: str = "anchored"  # anchored | sft | sft_kl | distill
    alpha: float = 0.5
    alpha_schedule: str = "constant"  # constant | linear (from alpha to alpha_end over the iterations)
    alpha_end: float | None = None
    source: str = "snapshot"  # snapshot: frozen copy refreshed per iteration | live: the student, detached
    interpolation: str = "logit"  # logit | prob
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0  # anchored/distill: loss = (1-w) divergence + w CE
    kl_weight: float = 0.1  # sft_kl: loss = CE + kl_weight * KL(p_base || p_student)
    outer_iterations: int = 5  # T
    epochs_per_iteration: int = 5  # K
    reset_optimizer_per_iteration: bool = False

    def validate(self, prefix: str = "anchor") -> None:
        _require(self.objective in OBJECTIVES, f"{prefix}.objective", f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("alpha", "jsd_beta", "ce_weight"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0,
                f"{prefix}.{name}",
                f"must be in [0, 1], got {value!r}",
            )
        _require(self.alpha_schedule in ("constant", "linear"), f"{prefix}.alpha_schedule", f"must be constant or linear, got {self.alpha_schedule!r}")
        if self.alpha_schedule == "linear":
            _require(
                isinstance(self.alpha_end, (int, float)) and 0.0 <= self.alpha_end <= 1.0,
                f"{prefix}.alpha_end",
                f"must be in [0, 1] with alpha_schedule=linear, got {self.alpha_end!r}",
            )
        _require(self.source in ("snapshot", "live"), f"{prefix}.source", f"must be snapshot or live, got {self.source!r}")
        _require(self.interpolation in ("logit", "prob"), f"{prefix}.interpolation", f"must be logit or prob, got {self.interpolation!r}")
        _require(
            self.divergence in ("forward_kl", "reverse_kl", "jsd"),
            f"{prefix}.divergence",
            f"must be forward_kl, reverse_kl or jsd, got {self.divergence!r}",
        )
        _require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        _require(self.kl_weight >= 0, f"{prefix}.kl_weight", f"must be >= 0, got {self.kl_weight}")
        for name in ("outer_iterations", "epochs_per_iteration"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{prefix}.{name}", f"must be an integer >= 1, got {value!r}")

    @property
    def needs_reference(self) -> bool:
        return self.objective != "sft"

    @property
    def needs_snapshot(self) -> bool:
        return self.objective == "anchored" and self.source == "snapshot"


@dataclass
class CheckpointRef:
    """A model to load: a converted / trainer checkpoint directory (None = random init, tests only)."""

    checkpoint: str | None = None


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

    def validate(self, prefix: str = "train") -> None:
        for name in ("micro_batch_size", "global_batch_size", "log_interval", "keep_checkpoints", "max_nonfinite_in_a_row"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{prefix}.{name}", f"must be an integer >= 1, got {value!r}")
        _require(isinstance(self.save_interval, int) and self.save_interval >= 0, f"{prefix}.save_interval", f"must be an integer >= 0, got {self.save_interval!r}")
        if self.max_steps is not None:
            _require(isinstance(self.max_steps, int) and self.max_steps >= 1, f"{prefix}.max_steps", f"must be an integer >= 1 or null, got {self.max_steps!r}")

    def num_microbatches(self, data_parallel_size: int, prefix: str = "train") -> int:
        per_step = self.micro_batch_size * data_parallel_size
        _require(
            self.global_batch_size % per_step == 0,
            f"{prefix}.global_batch_size",
            f"{self.global_batch_size} is not divisible by train.micro_batch_size x data-parallel size = "
            f"{self.micro_batch_size} x {data_parallel_size}",
        )
        return self.global_batch_size // per_step


from anchored_megatron.data.config import DataConfig  # noqa: E402 - data.config needs ConfigError above


@dataclass
class RunConfig:
    """The whole run: one YAML file (+ dotted overrides) maps onto this tree."""

    output_dir: str = ""
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    student: CheckpointRef = field(default_factory=CheckpointRef)
    reference: CheckpointRef = field(default_factory=CheckpointRef)
    data: DataConfig = field(default_factory=DataConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, world_size: int) -> None:
        """Everything that can be checked before a process group exists."""
        _require(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir", "is required (where metrics and checkpoints go)")
        self.parallel.validate(world_size)
        self.model.validate(self.parallel)
        self.anchor.validate()
        self.optim.validate()
        self.train.validate()
        self.data.validate()
        from anchored_megatron.models.te import check_packing  # lazy: imports torch

        check_packing(self.model, self.data.packing)
        self.train.num_microbatches(self.parallel.data_parallel_size(world_size))
        if self.anchor.needs_reference:
            _require(
                self.reference.checkpoint is not None or self.student.checkpoint is None,
                "reference.checkpoint",
                f"is required for anchor.objective={self.anchor.objective} (the frozen teacher"
                + (", i.e. the base model, for sft_kl)" if self.anchor.objective == "sft_kl" else ")"),
            )
        for key, ref in (("student.checkpoint", self.student), ("reference.checkpoint", self.reference)):
            if ref.checkpoint is not None:
                _require(os.path.isdir(ref.checkpoint), key, f"{ref.checkpoint}: not a directory")
        if self.parallel.pp > 1 and (self.parallel.vpp or 1) > 1 and self.anchor.objective != "sft":
            raise ConfigError(
                "parallel.vpp: the interleaved pipeline schedule cannot carry the frozen roles' hidden states "
                "(Megatron-Core 0.16.1 ignores adjust_tensor_shapes_fn there); use parallel.vpp: null with "
                f"anchor.objective={self.anchor.objective}, or anchor.objective=sft"
            )


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + dotted ``key=value`` overrides -> RunConfig with its preset resolved."""
    data = load_yaml(path) if path else {}
    data = merge_overrides(data, overrides or [])
    config = build(RunConfig, data)
    from anchored_megatron.models.presets import resolve

    config.model = resolve(config.model)
    return config
