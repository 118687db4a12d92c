"""Llama 2 and Llama 3 (including Llama-3 rope scaling with Megatron's fixed factors)."""

from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family


def _check(cfg: dict, where: str) -> None:
    if cfg.get("attention_bias"):
        # attention_bias also puts a bias on o_proj, which the Megatron model does not have.
        raise ConvertError(f"{where}: attention_bias=true is not supported for Llama (o_proj bias has no Megatron counterpart)")


LLAMA = Family(name="llama", architecture="LlamaForCausalLM", model_type="llama", check=_check,
               extra_hf_keys={"mlp_bias": False})
