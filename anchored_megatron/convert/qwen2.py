"""Qwen2 / Qwen2.5: Llama-shaped with a bias on the q, k and v projections."""

from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family


def _check(cfg: dict, where: str) -> None:
    if cfg.get("use_sliding_window"):
        raise ConvertError(f"{where}: use_sliding_window=true is not supported (the Megatron model attends over the full context)")


QWEN2 = Family(name="qwen2", architecture="Qwen2ForCausalLM", model_type="qwen2", qkv_bias=True, check=_check,
               extra_hf_keys={"use_sliding_window": False})
