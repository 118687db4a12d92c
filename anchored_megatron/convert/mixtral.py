"""Mixtral: Mistral's attention with every MLP a top-k routed MoE.

HF names: ``block_sparse_moe.gate`` is the router, ``block_sparse_moe.experts.{e}.w1`` (gate),
``w3`` (up) and ``w2`` (down) the experts, as the safetensors files hold them (transformers
merges the experts in memory only). The router renormalises the top-k probabilities, which
is Megatron's default (``moe_router_pre_softmax=false``); each expert's size is
``intermediate_size``.
"""

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family, get_key
from anchored_megatron.convert.mapping import ExpertNames
from anchored_megatron.convert.mistral import MISTRAL
from anchored_megatron.convert.qwen3_moe import num_experts


def _check(cfg: dict, where: str) -> None:
    MISTRAL.check(cfg, where)
    if float(cfg.get("router_jitter_noise") or 0.0) != 0.0:
        raise ConvertError(
            f"{where}: router_jitter_noise={cfg['router_jitter_noise']} is not supported (Megatron-Core's router "
            "has no multiplicative jitter); set it to 0.0"
        )


def _moe_fields(cfg: dict, where: str) -> dict:
    return dict(
        num_moe_experts=num_experts(cfg, where, "num_local_experts", "num_experts"),
        moe_router_topk=int(get_key(cfg, "num_experts_per_tok", where)),
        moe_ffn_hidden_size=int(get_key(cfg, "intermediate_size", where)),
    )


def _moe_hf_keys(model: ModelConfig) -> dict:
    if model.moe_router_pre_softmax:
        raise ConvertError("--family mixtral: Mixtral always renormalises the top-k router probabilities; "
                           "this model has moe_router_pre_softmax=true (export it as qwen3_moe)")
    if model.expert_ffn_hidden_size != model.ffn_hidden_size:
        raise ConvertError(f"--family mixtral: Mixtral's experts have ffn_hidden_size={model.ffn_hidden_size} rows; "
                           f"this model's have {model.expert_ffn_hidden_size}")
    return dict(num_local_experts=model.num_moe_experts, num_experts_per_tok=model.moe_router_topk,
                router_jitter_noise=0.0)


MIXTRAL = Family(
    name="mixtral", architecture="MixtralForCausalLM", model_type="mixtral", check=_check,
    extra_hf_keys={"sliding_window": None},
    experts=ExpertNames(router="block_sparse_moe.gate.weight", gate="block_sparse_moe.experts.{e}.w1.weight",
                        up="block_sparse_moe.experts.{e}.w3.weight", down="block_sparse_moe.experts.{e}.w2.weight"),
    moe_fields=_moe_fields, moe_hf_keys=_moe_hf_keys,
)
