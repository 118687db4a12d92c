"""Which family converts a given HF config, and which one a Megatron config exports to."""

from __future__ import annotations

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family
from anchored_megatron.convert.llama import LLAMA
from anchored_megatron.convert.mistral import MISTRAL
from anchored_megatron.convert.qwen2 import QWEN2
from anchored_megatron.convert.qwen3 import QWEN3

FAMILIES: dict[str, Family] = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3)}
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
    return family
