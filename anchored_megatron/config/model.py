"""The ``model:`` section: what network every role is, and how it runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from anchored_megatron.config.errors import require
from anchored_megatron.config.sections import ParallelConfig


@dataclass
class ModelConfig:
    """A Llama-shaped decoder. ``preset`` fills the sizes by name (see presets.py).

    Two kinds of field. The architecture (sizes, vocabulary, RoPE, norms, biases) is what a
    checkpoint *is*: a run that starts from a checkpoint takes it from there, and a conflicting
    value in the YAML is refused. ``RUNTIME_FIELDS`` say how to run it (sequence length, dtype,
    layer spec, FP8, init): the YAML decides them, and the checkpoint's value is the default.
    """

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
    # Fuse the output layer into the loss: the roles return final hidden states and the loss makes
    # each role's vocab-sharded logits one token chunk at a time (none is ever held whole).
    fused_output_loss: bool = True
    fused_output_chunk_tokens: int | None = None  # tokens per chunk; null = from a fixed memory budget
    # Mixture of experts: every layer's MLP becomes num_moe_experts experts behind a router
    # (null = a dense model; the other moe_* fields then keep their defaults).
    num_moe_experts: int | None = None
    moe_router_topk: int = 2  # experts each token is sent to
    moe_ffn_hidden_size: int | None = None  # one expert's hidden size; null = ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None  # hidden size of the always-on shared expert; null = none
    # Softmax over all experts, then the top k (probabilities not renormalised: Qwen3-MoE's
    # norm_topk_prob=false); false = top k logits, then softmax over them (Mixtral, norm_topk_prob=true).
    moe_router_pre_softmax: bool = False
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none (applies to the student only)
    moe_aux_loss_coeff: float = 0.0  # weight of the load-balancing loss; 0 = not applied
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    moe_grouped_gemm: bool = False  # one grouped GEMM for a rank's experts (CUDA and the grouped_gemm package or TE)

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
        "seq_length", "make_vocab_size_divisible_by", "init_method_std", "params_dtype", "transformer_impl",
        "fp8", "fp8_recipe", "fp8_bf16_first_last_layers", "fused_kernels", "fused_output_loss", "fused_output_chunk_tokens",
        "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_token_dispatcher_type", "moe_grouped_gemm",
    )
    MOE_FIELDS: ClassVar[tuple[str, ...]] = (
        "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_pre_softmax",
        "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_token_dispatcher_type", "moe_grouped_gemm",
    )
    # What a frozen reference may have of its own: the loss compares the roles' distributions over
    # one vocabulary, token by token, and their hidden states share the pipeline's P2P tensor, so
    # everything else must match the student. A dense teacher for a MoE student (or the reverse,
    # or another expert count) differs here only.
    MLP_FIELDS: ClassVar[tuple[str, ...]] = (
        "ffn_hidden_size", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size", "moe_router_pre_softmax",
    )
    LOAD_BALANCING_TYPES: ClassVar[tuple[str, ...]] = ("aux_loss", "seq_aux_loss", "none")
    TOKEN_DISPATCHERS: ClassVar[tuple[str, ...]] = ("alltoall", "allgather")

    @classmethod
    def architecture_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "preset" and f.name not in cls.RUNTIME_FIELDS)

    def validate(self, parallel: ParallelConfig | None = None, prefix: str = "model") -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size", "seq_length"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{prefix}.{name}", f"must be a positive integer, got {value!r}")
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"{prefix}.hidden_size",
                f"{self.hidden_size} is not divisible by model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
            )
        else:
            require(isinstance(self.kv_channels, int) and self.kv_channels >= 1, f"{prefix}.kv_channels", f"must be a positive integer or null, got {self.kv_channels!r}")
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"{prefix}.num_query_groups",
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by {self.num_query_groups}",
        )
        require(self.params_dtype in ("fp32", "bf16", "fp16"), f"{prefix}.params_dtype", f"must be fp32, bf16 or fp16, got {self.params_dtype!r}")
        require(
            self.transformer_impl in ("local", "transformer_engine"),
            f"{prefix}.transformer_impl",
            f"must be 'local' or 'transformer_engine', got {self.transformer_impl!r}",
        )
        self._validate_precision(parallel, prefix)
        self._validate_moe(parallel, prefix)
        require(isinstance(self.fused_output_loss, bool), f"{prefix}.fused_output_loss", f"must be true or false, got {self.fused_output_loss!r}")
        chunk = self.fused_output_chunk_tokens
        require(
            chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1),
            f"{prefix}.fused_output_chunk_tokens", f"must be an integer >= 1 or null, got {chunk!r}",
        )
        if parallel is not None:
            require(
                self.num_attention_heads % parallel.tp == 0,
                f"{prefix}.num_attention_heads",
                f"{self.num_attention_heads} is not divisible by parallel.tp={parallel.tp}",
            )
            require(
                self.num_query_groups % parallel.tp == 0,
                f"{prefix}.num_query_groups",
                f"{self.num_query_groups} is not divisible by parallel.tp={parallel.tp}",
            )
            require(
                self.ffn_hidden_size % parallel.tp == 0,
                f"{prefix}.ffn_hidden_size",
                f"{self.ffn_hidden_size} is not divisible by parallel.tp={parallel.tp}",
            )
            stages = parallel.pp * (parallel.vpp or 1)
            require(
                self.num_layers % stages == 0,
                f"{prefix}.num_layers",
                f"{self.num_layers} is not divisible by parallel.pp x parallel.vpp = {stages}",
            )

    def _validate_moe(self, parallel: ParallelConfig | None, prefix: str) -> None:
        experts = self.num_moe_experts
        ep = parallel.ep if parallel is not None else 1
        if experts is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in self.MOE_FIELDS:
                require(getattr(self, name) == defaults[name], f"{prefix}.{name}", "is used only by MoE models: set model.num_moe_experts, or remove it")
            require(ep == 1, "parallel.ep", f"{ep} needs a MoE model (model.num_moe_experts), got a dense one")
            return

        def positive(name: str, value, nullable: bool = False) -> None:
            ok = (nullable and value is None) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            require(ok, f"{prefix}.{name}", f"must be a positive integer{' or null' if nullable else ''}, got {value!r}")

        positive("num_moe_experts", experts)
        positive("moe_router_topk", self.moe_router_topk)
        positive("moe_ffn_hidden_size", self.moe_ffn_hidden_size, nullable=True)
        positive("moe_shared_expert_intermediate_size", self.moe_shared_expert_intermediate_size, nullable=True)
        require(self.moe_router_topk <= experts, f"{prefix}.moe_router_topk", f"{self.moe_router_topk} exceeds model.num_moe_experts={experts}")
        require(isinstance(self.moe_router_pre_softmax, bool), f"{prefix}.moe_router_pre_softmax", f"must be true or false, got {self.moe_router_pre_softmax!r}")
        require(isinstance(self.moe_grouped_gemm, bool), f"{prefix}.moe_grouped_gemm", f"must be true or false, got {self.moe_grouped_gemm!r}")
        require(
            self.moe_router_load_balancing_type in self.LOAD_BALANCING_TYPES,
            f"{prefix}.moe_router_load_balancing_type",
            f"must be one of {', '.join(self.LOAD_BALANCING_TYPES)}, got {self.moe_router_load_balancing_type!r}",
        )
        coeff = self.moe_aux_loss_coeff
        require(
            isinstance(coeff, (int, float)) and not isinstance(coeff, bool) and coeff >= 0,
            f"{prefix}.moe_aux_loss_coeff", f"must be a number >= 0, got {coeff!r}",
        )
        require(
            coeff == 0 or self.moe_router_load_balancing_type != "none",
            f"{prefix}.moe_aux_loss_coeff",
            f"{coeff} is not used with model.moe_router_load_balancing_type=none; set a load-balancing type or remove it",
        )
        require(
            self.moe_token_dispatcher_type in self.TOKEN_DISPATCHERS,
            f"{prefix}.moe_token_dispatcher_type",
            f"must be one of {', '.join(self.TOKEN_DISPATCHERS)}, got {self.moe_token_dispatcher_type!r} "
            "(flex needs DeepEP, which this project does not set up)",
        )
        if parallel is None:
            return
        require(experts % ep == 0, "parallel.ep", f"{ep} does not divide model.num_moe_experts={experts}")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None:
                require(value % parallel.tp == 0, f"{prefix}.{name}", f"{value} is not divisible by parallel.tp={parallel.tp}")

    def with_mlp_of(self, other: ModelConfig) -> ModelConfig:
        """This model (how it runs included) with ``other``'s MLP: how a frozen reference of
        another MLP is built next to this student. Training-only MoE options of a student are
        dropped for a reference that is dense (a frozen role applies no load-balancing loss)."""
        changes = {name: getattr(other, name) for name in self.MLP_FIELDS}
        if not other.is_moe:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changes.update({name: defaults[name] for name in self.MOE_FIELDS if name not in changes})
        return dataclasses.replace(self, **changes)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        """One expert's hidden size (``moe_ffn_hidden_size``, else ``ffn_hidden_size``)."""
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.ffn_hidden_size

    def _validate_precision(self, parallel: ParallelConfig | None, prefix: str) -> None:
        """FP8 / fused-kernel options; what the machine offers is checked when the model is built."""
        require(self.fp8 in (None, "hybrid", "e4m3"), f"{prefix}.fp8", f"must be null, hybrid or e4m3, got {self.fp8!r}")
        require(self.fp8_recipe in ("delayed", "tensorwise"), f"{prefix}.fp8_recipe", f"must be delayed or tensorwise, got {self.fp8_recipe!r}")
        require(isinstance(self.fused_kernels, bool), f"{prefix}.fused_kernels", f"must be true or false, got {self.fused_kernels!r}")
        edge = self.fp8_bf16_first_last_layers
        require(
            isinstance(edge, int) and not isinstance(edge, bool) and edge >= 0,
            f"{prefix}.fp8_bf16_first_last_layers", f"must be an integer >= 0, got {edge!r}",
        )
        if sp := (parallel is not None and parallel.sequence_parallel):
            require(
                self.transformer_impl == "transformer_engine",
                "parallel.sequence_parallel",
                "needs model.transformer_impl=transformer_engine: the local layer spec's RMSNorm is torch's, which "
                "Megatron-Core refuses under sequence parallelism (apex's fused norm is LayerNorm only)",
            )
        if self.fp8 is None:
            require(edge == 0, f"{prefix}.fp8_bf16_first_last_layers", f"needs model.fp8 (hybrid or e4m3), got fp8=null and {edge}")
            return
        require(
            self.transformer_impl == "transformer_engine",
            f"{prefix}.fp8",
            f"needs model.transformer_impl=transformer_engine (the local layer spec has no FP8 GEMMs), got {self.transformer_impl!r}",
        )
        require(self.params_dtype == "bf16", f"{prefix}.fp8", f"needs model.params_dtype=bf16, got {self.params_dtype!r}")
        require(
            edge == 0 or self.fp8_recipe == "tensorwise",
            f"{prefix}.fp8_bf16_first_last_layers",
            "needs model.fp8_recipe=tensorwise (delayed scaling cannot leave single layers out of FP8)",
        )
        tp = parallel.tp if parallel is not None else 1
        stages = parallel.pp if parallel is not None else 1
        require(
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
            require(value % 16 == 0, f"{prefix}.fp8", f"FP8 GEMMs need {name} to be a multiple of 16, got {value}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple
