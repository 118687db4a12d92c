"""Mistral: Llama-shaped; sliding-window attention is not expressed by the Megatron model."""

import warnings

from anchored_megatron.convert.family import Family


def _check(cfg: dict, where: str) -> None:
    window = cfg.get("sliding_window")
    if window is not None:
        # The Megatron model attends over the full causal context. For sequences no
        # longer than the window the two are identical, so convert but say so.
        warnings.warn(
            f"{where}: sliding_window={window} is not applied by the Megatron model; "
            f"results match Hugging Face only for sequences of at most {window} tokens",
            stacklevel=2,
        )


MISTRAL = Family(name="mistral", architecture="MistralForCausalLM", model_type="mistral", check=_check,
                 extra_hf_keys={"sliding_window": None})
