"""Which family converts a given HF config, and which one a Megatron config exports to."""

from __future__ import annotations

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family
from anchored_megatron.convert.llama import LLAMA
from anchored_megatron.convert.mistral import MISTRAL
from anchored_megatron.convert.mixtral import MIXTRAL
from anchored_megatron.convert.qwen2 import QWEN2
from anchored_megatron.convert.qwen3 import QWEN3
from anchored_megatron.convert.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL)}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_for_hf_config(cfg: dict, where: str) -> Family:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConvertError(f"{where}: no 'architectures' entry (supported: {', '.join(supported_architectures())})")
    if len(archs) != 1 or archs[0] not in FAMILIES:
        raise ConvertError(
            f"{where}: unsupported architectures {archs}; supported: {', '.join(supported_architectures())}"
        )
    return FAMILIES[archs[0]]


def family_for_model_config(model: ModelConfig, name: str | None = None) -> Family:
    """The export family: by name when given, else the simplest family that expresses ``model``."""
    if name is not None:
        if name not in BY_NAME:
            raise ConvertError(f"--family: unknown family {name!r} (known: {', '.join(sorted(BY_NAME))})")
        family = BY_NAME[name]
    elif model.is_moe:
        family = QWEN3_MOE if model.qk_layernorm else MIXTRAL
    elif model.qk_layernorm:
        family = QWEN3
    elif model.qkv_bias:
        family = QWEN2
    else:
        family = LLAMA
    if model.qk_layernorm != family.qk_layernorm or (model.qkv_bias and not family.qkv_bias) or (family.qkv_bias and not model.qkv_bias):
        raise ConvertError(
            f"--family {family.name}: cannot express a model with qkv_bias={model.qkv_bias}, qk_layernorm={model.qk_layernorm}"
        )
    if model.is_moe != family.is_moe:
        kind = "a MoE" if model.is_moe else "a dense"
        raise ConvertError(f"--family {family.name}: cannot express {kind} model (num_moe_experts={model.num_moe_experts})")
    if model.moe_shared_expert_intermediate_size is not None:
        raise ConvertError(
            f"--family {family.name}: cannot express shared experts (model.moe_shared_expert_intermediate_size="
            f"{model.moe_shared_expert_intermediate_size}); no supported MoE family has them"
        )
    return family
