"""What a model family is: how its Hugging Face config maps to ModelConfig and back.

Each family module (llama.py, mistral.py, qwen2.py, qwen3.py, qwen3_moe.py, mixtral.py)
builds one ``Family``. The families differ only in which config keys they accept and which
quirks they carry (qkv bias, q/k norm, how MoE experts are named and configured); the
tensor mapping itself is shared (mapping.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.mapping import ExpertNames

# Megatron-Core 0.16.1's RotaryEmbedding applies Llama-3 scaling with these values
# hard-coded; only ``factor`` can be passed through.
LLAMA3_FIXED_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the HF ``architectures`` entry, e.g. "LlamaForCausalLM"
    model_type: str  # the HF ``model_type``
    qkv_bias: bool = False  # q/k/v projections always carry a bias (Qwen2)
    qk_layernorm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # Extra checks on the HF config dict; raise ConvertError for what Megatron cannot express.
    check: Callable[[dict, str], None] | None = None
    # HF config keys a synthesised config.json gets (used when no source config is stored).
    extra_hf_keys: dict = field(default_factory=dict)
    # MoE families: the experts' HF tensor names, the ModelConfig MoE fields an HF config
    # implies (refusing what Megatron cannot express), and the HF keys back for a synthesised config.
    experts: ExpertNames | None = None
    moe_fields: Callable[[dict, str], dict] | None = None
    moe_hf_keys: Callable[[ModelConfig], dict] | None = None

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


def get_key(cfg: dict, key: str, where: str, default=None, required: bool = True):
    """``cfg[key]``; a missing key is refused (ConvertError) unless a default is given."""
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required and default is None:
        raise ConvertError(f"{where}: missing required key {key!r}")
    return default


def rope_settings(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from either the transformers 4 or 5 layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConvertError(
            f"{where}: rope type {rope_type!r} is not supported by Megatron-Core 0.16.1 "
            "(supported: default, llama3)"
        )
    for key, fixed in LLAMA3_FIXED_ROPE.items():
        value = merged.get(key)
        if value is None or float(value) != fixed:
            raise ConvertError(
                f"{where}: llama3 rope scaling {key}={value!r} is not supported; Megatron-Core 0.16.1 "
                f"hard-codes {key}={fixed:g} (only 'factor' can vary)"
            )
    if "factor" not in merged:
        raise ConvertError(f"{where}: llama3 rope scaling needs 'factor'")
    return float(theta), {"factor": float(merged["factor"]), **LLAMA3_FIXED_ROPE}


def to_model_config(family: Family, cfg: dict, where: str, dtype: str, transformer_impl: str = "local") -> ModelConfig:
    """ModelConfig implied by an HF ``config.json`` dict; refuses what Megatron cannot express."""
    hidden = int(get_key(cfg, "hidden_size", where))
    heads = int(get_key(cfg, "num_attention_heads", where))
    groups = int(get_key(cfg, "num_key_value_heads", where, default=heads))
    head_dim = cfg.get("head_dim")
    if head_dim is None and hidden % heads != 0:
        raise ConvertError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    # An explicit head_dim (Qwen3: 128 whatever the width) becomes kv_channels.
    kv_channels = int(head_dim) if head_dim is not None and int(head_dim) != hidden // heads else None
    if heads % groups != 0:
        raise ConvertError(f"{where}: num_attention_heads={heads} is not divisible by num_key_value_heads={groups}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{where}: hidden_act={act!r} is not supported (Megatron model here uses SwiGLU: silu)")
    if cfg.get("mlp_bias"):
        raise ConvertError(f"{where}: mlp_bias=true is not supported (the Megatron model has no MLP biases)")
    if family.check is not None:
        family.check(cfg, where)
    theta, scaling = rope_settings(cfg, where)
    model = ModelConfig(
        num_layers=int(get_key(cfg, "num_hidden_layers", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(get_key(cfg, "intermediate_size", where)),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=kv_channels,
        vocab_size=int(get_key(cfg, "vocab_size", where)),
        seq_length=int(get_key(cfg, "max_position_embeddings", where, default=4096)),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=float(get_key(cfg, "rms_norm_eps", where, default=1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias or bool(cfg.get("attention_bias", False)),
        qk_layernorm=family.qk_layernorm,
        params_dtype=dtype,
        transformer_impl=transformer_impl,
        **(family.moe_fields(cfg, where) if family.is_moe else {}),
    )
    try:
        model.validate()
    except ValueError as exc:
        raise ConvertError(f"{where}: {exc}") from None
    return model


def to_hf_config(family: Family, model: ModelConfig, dtype: str) -> dict:
    """A transformers-loadable config.json dict for ``model`` (used when no source config is kept)."""
    rope = {"rope_theta": model.rotary_base, "rope_type": "default"}
    if model.rope_scaling:
        rope = {"rope_theta": model.rotary_base, "rope_type": "llama3", **model.rope_scaling}
    cfg = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.seq_length,
        "rms_norm_eps": model.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": model.tie_embeddings,
        "rope_parameters": rope,
        "initializer_range": model.init_method_std,
        "attention_dropout": 0.0,  # the Megatron model is built without dropout
        "dtype": HF_DTYPE_NAMES[dtype],
        **family.extra_hf_keys,
        **(family.moe_hf_keys(model) if family.is_moe else {}),
    }
    if family.model_type == "llama":
        cfg["attention_bias"] = model.qkv_bias
    return cfg
