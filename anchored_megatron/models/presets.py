"""Model sizes by name. ``ModelConfig(preset="llama3-8b")`` fills in the rest."""

from __future__ import annotations

import dataclasses

from anchored_megatron.config import ConfigError, ModelConfig

PRESETS: dict[str, dict] = {
    # Tests and the CPU demo.
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=256, seq_length=64),
    "small": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2, vocab_size=512, seq_length=128),
    "llama3-1b": dict(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, seq_length=8192, rotary_base=500000.0, tie_embeddings=True, norm_epsilon=1e-5,
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "llama3-8b": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, seq_length=8192, rotary_base=500000.0, norm_epsilon=1e-5,
    ),
    "llama3-70b": dict(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
        vocab_size=128256, seq_length=8192, rotary_base=500000.0, norm_epsilon=1e-5,
    ),
    "qwen2.5-3b": dict(
        num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16, num_query_groups=2,
        vocab_size=151936, seq_length=32768, rotary_base=1000000.0, norm_epsilon=1e-6, tie_embeddings=True, qkv_bias=True,
    ),
}


def resolve(config: ModelConfig) -> ModelConfig:
    """Return a copy with the preset's sizes applied; explicitly set fields win over the preset."""
    if config.preset is None:
        return config
    if config.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {config.preset!r} (known: {', '.join(sorted(PRESETS))})")
    defaults = ModelConfig()
    explicit = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(ModelConfig)
        if getattr(config, f.name) != getattr(defaults, f.name)
    }
    return dataclasses.replace(ModelConfig(), **{**PRESETS[config.preset], **explicit})
