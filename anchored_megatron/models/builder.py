"""Build Llama-shaped Megatron-Core GPT models for any TP / PP / virtual-PP layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anchored_megatron.config import ModelConfig, ParallelConfig
from anchored_megatron.models import te
from anchored_megatron.models.dtypes import DTYPES
from anchored_megatron.platform import accelerators


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(model, parallel))


def transformer_config_kwargs(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """The ``TransformerConfig`` fields for ``model`` on this machine. Refuses (ConfigError)
    FP8 / the TE spec where CUDA or Transformer Engine is missing (see models/te.py)."""
    te.check_environment(model, parallel)
    dtype = DTYPES[model.params_dtype]
    vpp = parallel.vpp if (parallel.vpp or 1) > 1 else None
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        # Without these two every pipeline stage silently builds all layers.
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=vpp,
        microbatch_group_size_per_vp_stage=parallel.pp if vpp else None,
        # Megatron-Core 0.16.1's interleaved schedule gives silently wrong results for
        # later microbatches with batched P2P (measured: grad error 1.4 at PP=2, VPP=2).
        batch_p2p_comm=vpp is None,
        sequence_parallel=parallel.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        # Each fused kernel only where it is installed (all off on CPU); FP8 only when asked.
        **te.fusion_settings(model),
        **te.precision_settings(model),
        **moe_settings(model, parallel),
        use_cpu_initialization=not accelerators.has_cuda(),
    )


def moe_settings(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """``TransformerConfig`` fields of a MoE model (none for a dense one). The experts keep
    Megatron's default expert tensor-parallel size, which is ``parallel.tp``."""
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=float(model.moe_aux_loss_coeff),
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_grouped_gemm=model.moe_grouped_gemm,
        expert_model_parallel_size=parallel.ep,
    )


def layer_spec(model: ModelConfig):
    if model.transformer_impl == "transformer_engine":
        return te.te_layer_spec(model)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(
        num_experts=model.num_moe_experts, moe_grouped_gemm=model.moe_grouped_gemm,
        qk_layernorm=model.qk_layernorm, normalization="RMSNorm",
    )
    if not accelerators.has_cuda():
        from anchored_megatron.models import cpu_attention

        cpu_attention.use_on_this_machine(spec)
    return spec


def build_model_chunk(
    model: ModelConfig,
    parallel: ParallelConfig,
    vp_stage: int | None = None,
    config=None,
):
    """One GPTModel holding this rank's layers (for ``vp_stage`` when interleaved)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(model, parallel)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    rope = model.rope_scaling or {}
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.seq_length,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=bool(rope),
        rope_scaling_factor=float(rope.get("factor", 8.0)),
        vp_stage=vp_stage,
    )
    if accelerators.has_cuda():
        gpt = gpt.cuda(torch.cuda.current_device())
    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module

        # Casts the first stage's inputs and the last stage's logits; params stay low precision.
        gpt = Float16Module(config, gpt)
    return gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, calculate_per_token_loss: bool = False) -> list:
    """All model chunks this rank owns: one, or ``vpp`` when the schedule is interleaved.
    ``calculate_per_token_loss``: the loss function returns (loss sum, token count), Megatron's
    per-token convention (a MoE router scales its load-balancing loss for it when built)."""
    config = transformer_config(model, parallel)
    config.calculate_per_token_loss = calculate_per_token_loss
    if (parallel.vpp or 1) > 1:
        return [build_model_chunk(model, parallel, vp_stage=i, config=config) for i in range(parallel.vpp)]
    return [build_model_chunk(model, parallel, config=config)]
