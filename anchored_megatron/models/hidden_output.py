"""A GPTModel that returns its final hidden states instead of logits, for the fused output loss.

Megatron-Core's ``GPTModel._postprocess`` (0.16 to 0.19) ends in
``logits, _ = self.output_layer(hidden_states, weight=output_weight, ...)`` followed, without
labels, by ``logits.transpose(0, 1).contiguous()``. A pass-through forward on this one
instance's output layer keeps everything before it (final norm) and the [s, b, h] -> [b, s, h]
transpose, and leaves the layer, its weight, the tied-embedding wiring and the checkpoint
layout untouched: the loss applies the weight itself (``output_weight``). 0.19's
``output_processor`` argument would do the same through ``forward``'s signature, which 0.16
lacks; the pass-through works on every version in that range.
"""

from __future__ import annotations

from anchored_megatron.config import ConfigError


def _refuse_what_the_pass_through_would_drop(config) -> None:
    # Each of these needs the output layer to run inside the model: multi-token prediction
    # heads call it for their own logits, deferred embedding wgrad records its input there,
    # MuP scales the logits after it (0.19).
    for option in ("mtp_num_layers", "defer_embedding_wgrad_compute", "use_mup"):
        if getattr(config, option, None):
            raise ConfigError(f"model.fused_output_loss: not available with Megatron-Core's {option}; set model.fused_output_loss=false")


def return_hidden_states(gpt) -> None:
    """From now on ``gpt(...)`` returns [b, s, h] final hidden states (on the last pipeline stage;
    [b, s / tp, h] under sequence parallelism) where it returned [b, s, V / tp] logits."""
    _refuse_what_the_pass_through_would_drop(gpt.config)

    def pass_through(input_, weight=None, runtime_gather_output=None):
        return input_, None

    gpt.output_layer.forward = pass_through


def output_weight(gpt):
    """The weight ``_postprocess`` gives the output layer: the shared word embedding when tied
    (its synced copy on a last stage without the embedding), else the layer's own."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
