"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm) with every MLP a top-k routed MoE.

HF names: ``mlp.gate`` is the router, ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` the
experts (the safetensors layout; transformers merges the experts into 3-D tensors in memory
only). ``norm_topk_prob`` decides whether the top-k probabilities are renormalised, which is
Megatron's ``moe_router_pre_softmax`` negated. ``intermediate_size`` is the dense MLP size
of ``mlp_only_layers``; with none it is unused but kept, so export gives it back.
"""

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family, get_key
from anchored_megatron.convert.mapping import ExpertNames
from anchored_megatron.convert.qwen3 import QWEN3


def num_experts(cfg: dict, where: str, *keys: str) -> int:
    """The expert count under whichever of ``keys`` the config uses (transformers renamed it)."""
    found = {key: cfg[key] for key in keys if cfg.get(key) is not None}
    if not found:
        raise ConvertError(f"{where}: missing required key {keys[0]!r}")
    if len(set(found.values())) > 1:
        raise ConvertError(f"{where}: {' and '.join(f'{k}={v}' for k, v in found.items())} disagree")
    return int(next(iter(found.values())))


def _check(cfg: dict, where: str) -> None:
    QWEN3.check(cfg, where)
    if cfg.get("mlp_only_layers"):
        raise ConvertError(f"{where}: mlp_only_layers={cfg['mlp_only_layers']} is not supported (every layer must be MoE)")
    if int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ConvertError(f"{where}: decoder_sparse_step={cfg['decoder_sparse_step']} is not supported (every layer must be MoE)")
    if cfg.get("shared_expert_intermediate_size"):
        raise ConvertError(f"{where}: shared_expert_intermediate_size is not supported for Qwen3-MoE (it has no shared experts)")


def _moe_fields(cfg: dict, where: str) -> dict:
    return dict(
        num_moe_experts=num_experts(cfg, where, "num_experts", "num_local_experts"),
        moe_router_topk=int(get_key(cfg, "num_experts_per_tok", where)),
        moe_ffn_hidden_size=int(get_key(cfg, "moe_intermediate_size", where)),
        moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
    )


def _moe_hf_keys(model: ModelConfig) -> dict:
    return dict(
        num_experts=model.num_moe_experts, num_experts_per_tok=model.moe_router_topk,
        moe_intermediate_size=model.expert_ffn_hidden_size, norm_topk_prob=not model.moe_router_pre_softmax,
        decoder_sparse_step=1, mlp_only_layers=[],
    )


QWEN3_MOE = Family(
    name="qwen3_moe", architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", qk_layernorm=True, check=_check,
    extra_hf_keys={"use_sliding_window": False, "attention_bias": False},
    experts=ExpertNames(router="mlp.gate.weight", gate="mlp.experts.{e}.gate_proj.weight",
                        up="mlp.experts.{e}.up_proj.weight", down="mlp.experts.{e}.down_proj.weight"),
    moe_fields=_moe_fields, moe_hf_keys=_moe_hf_keys,
)
