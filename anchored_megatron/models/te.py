"""The GPU path: Transformer Engine layer spec, FP8 settings and fused kernels.

Three jobs, each a function the builder calls:

- ``check_environment``: refuse, before anything is built, an option this machine cannot
  run (FP8 without CUDA / an FP8-capable GPU / Transformer Engine; the TE spec without TE),
  naming the option and how to install what is missing.
- ``precision_settings`` / ``fusion_settings``: the ``TransformerConfig`` fields for FP8 and
  for the fused kernels that are installed (all off on CPU, so the CPU path is unchanged).
- ``te_layer_spec``: Megatron-Core's own Transformer Engine GPT layer spec.

Where FP8 applies (Megatron-Core 0.16.1): ``TransformerBlock.forward`` enters
``fp8_utils.get_fp8_context(config)`` around its layers (per layer for ``tensorwise``, which
is how ``first_last_layers_bf16`` skips layers; once around the block for ``delayed``).
The embedding, the final norm's output projection (``GPTModel.output_layer`` is a local
``ColumnParallelLinear``, never a TE linear) and the loss run outside that context, so the
logits are bf16 and the anchored loss reads them in fp32 (``Float16Module`` upcasts them).
Every role is built from the same ``ModelConfig``, so the frozen reference and snapshot run
their forward under FP8 too; nothing outside the model has to enter an autocast.
"""

from __future__ import annotations

import importlib.util

from anchored_megatron.config import ConfigError, ModelConfig, ParallelConfig
from anchored_megatron.platform import accelerators

FUSIONS_OFF = dict(
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
)


def check_environment(model: ModelConfig, parallel: ParallelConfig | None = None) -> None:
    """Raise ConfigError for options this machine cannot run. The config itself was validated
    already (``ModelConfig.validate``): FP8 implies the TE spec and bf16 there."""
    if model.fp8 is not None:
        if not accelerators.has_cuda():
            raise ConfigError(
                f"model.fp8: {model.fp8!r} needs a CUDA GPU with FP8 tensor cores (compute capability "
                f"{'.'.join(map(str, accelerators.FP8_MIN_CAPABILITY))}+: H100/H200, L40, RTX 40xx) and none is "
                "visible; set model.fp8=null to train in bf16"
            )
        if not accelerators.has_transformer_engine():
            raise ConfigError(
                f"model.fp8: {model.fp8!r} needs Transformer Engine, which cannot be imported here "
                f"({accelerators.transformer_engine_import_error()}); {accelerators.INSTALL_TRANSFORMER_ENGINE}; "
                "or set model.fp8=null"
            )
        if not accelerators.supports_fp8():
            capability = ".".join(map(str, accelerators.cuda_capability() or ()))
            raise ConfigError(
                f"model.fp8: {model.fp8!r} needs compute capability "
                f"{'.'.join(map(str, accelerators.FP8_MIN_CAPABILITY))}+ (H100/H200, L40, RTX 40xx); this GPU has "
                f"{capability}; set model.fp8=null"
            )
    if model.transformer_impl == "transformer_engine":
        require_transformer_engine()
    if model.moe_grouped_gemm:
        check_grouped_gemm(model)


def check_grouped_gemm(model: ModelConfig) -> None:
    """Grouped GEMM runs a rank's experts as one CUDA kernel: Transformer Engine's with the TE
    spec, the ``grouped_gemm`` package's with the local one. Neither exists without CUDA."""
    if not accelerators.has_cuda():
        raise ConfigError(
            "model.moe_grouped_gemm: needs a CUDA GPU (its kernels are CUDA only) and none is visible; "
            "set model.moe_grouped_gemm=false (each expert runs as its own GEMM)"
        )
    if model.transformer_impl == "local" and importlib.util.find_spec("grouped_gemm") is None:
        raise ConfigError(
            "model.moe_grouped_gemm: with model.transformer_impl=local it needs the grouped_gemm package, which is not "
            "installed (pip install git+https://github.com/fanshiqing/grouped_gemm@v1.1.4); or use "
            "model.transformer_impl=transformer_engine, or set model.moe_grouped_gemm=false"
        )


def require_transformer_engine() -> None:
    if not accelerators.has_transformer_engine():
        raise ConfigError(
            "model.transformer_impl: 'transformer_engine' needs Transformer Engine, which cannot be imported here "
            f"({accelerators.transformer_engine_import_error()}); {accelerators.INSTALL_TRANSFORMER_ENGINE}; "
            "or set model.transformer_impl=local"
        )


def precision_settings(model: ModelConfig) -> dict:
    """``TransformerConfig`` fields for FP8 (none when ``model.fp8`` is null)."""
    if model.fp8 is None:
        return {}
    edge = model.fp8_bf16_first_last_layers
    return dict(
        fp8=model.fp8,
        fp8_recipe=model.fp8_recipe,
        first_last_layers_bf16=edge > 0,
        num_layers_at_start_in_bf16=edge,
        num_layers_at_end_in_bf16=edge,
        # Megatron-LM's defaults for delayed scaling; tensorwise ignores them.
        fp8_amax_history_len=1024 if model.fp8_recipe == "delayed" else 1,
        fp8_amax_compute_algo="max" if model.fp8_recipe == "delayed" else "most_recent",
    )


def fusion_settings(model: ModelConfig) -> dict:
    """``TransformerConfig`` fusion flags: each on only where its kernel exists here.

    - SwiGLU and bias-dropout-add: Megatron's jit fusers, torch only, so on with any GPU.
    - RoPE: Transformer Engine's fused kernel.
    - Weight-gradient accumulation into the fp32 main grads: apex's
      ``fused_weight_gradient_mlp_cuda``. TE linears fuse it themselves, but the output layer
      is Megatron's own ``ColumnParallelLinear``, which raises without the apex kernel.
    - Masked softmax stays off: with a causal mask type apex's fused kernel is the upper-triangular
      one, which ignores the block-diagonal mask of packed sequences, so packed documents would
      attend to each other (the local spec's unfused softmax honours the mask).
    - ``persist_layer_norm`` stays off: apex's persistent kernel is LayerNorm only, these
      models use RMSNorm (the TE spec fuses RMSNorm into the next linear anyway).
    Fused Adam needs no flag: Megatron-Core picks TE's FusedAdam, else apex's, else torch AdamW.
    """
    if not model.fused_kernels or not accelerators.has_cuda():
        return dict(FUSIONS_OFF)
    return dict(
        FUSIONS_OFF,
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=accelerators.has_transformer_engine(),
        gradient_accumulation_fusion=accelerators.has_apex_extension(accelerators.APEX_EXTENSIONS["gradient_accumulation_fusion"]),
    )


def te_layer_spec(model: ModelConfig):
    """Megatron-Core's Transformer Engine GPT layer: RMSNorm fused into ``linear_qkv`` and
    ``linear_fc1`` (``layer_norm_weight``), TE attention (flash / cuDNN), FP8-capable GEMMs."""
    require_transformer_engine()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=model.num_moe_experts, moe_grouped_gemm=model.moe_grouped_gemm, qk_layernorm=model.qk_layernorm,
    )
