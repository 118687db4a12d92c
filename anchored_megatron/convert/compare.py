"""Run the same tokens through an HF model and the converted Megatron model; report the gap.

``megatron_logits`` works at any TP/PP/VPP layout: it runs Megatron's pipeline schedule in
forward-only mode and returns the full-vocabulary logits (padded columns dropped) on the
last pipeline stage, None elsewhere. Gathering the vocabulary is fine here (a check, not
the training hot path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchored_megatron.config import ModelConfig, ParallelConfig


@dataclass
class Comparison:
    max_abs_diff: float
    top1_agreement: float  # fraction of positions where both argmax tokens agree
    tokens: int

    def summary(self) -> str:
        return f"max |logit diff| = {self.max_abs_diff:.3e}   top-1 agreement = {100 * self.top1_agreement:.2f}%   ({self.tokens} positions)"


def megatron_logits(chunks, tokens: torch.Tensor, model: ModelConfig) -> torch.Tensor | None:
    """[batch, seq, vocab_size] fp32 logits on the last pipeline stage; None on other stages."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def forward_step(data_iterator, chunk):
        ids = next(data_iterator)
        output = chunk(ids, positions, None)

        def collect(output_tensor, non_loss_data=False):
            full = gather_from_tensor_model_parallel_region(output_tensor.float())
            return full[..., : model.vocab_size].detach()

        return output, collect

    for chunk in chunks:
        chunk.eval()
        # Interleaved P2P with batched comms is wrong on gloo (see notes); the plain path is fine.
        chunk.config.batch_p2p_comm = False
    # The interleaved schedule needs at least PP microbatches: repeat the batch, keep the first.
    microbatches = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    iterators = [iter([tokens] * microbatches) for _ in chunks]
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=microbatches,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return results[0]


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: transformers' model with eager attention, weights-only safetensors load."""
    import sys

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # its weight-loading bar would write \r frames into a log
        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager", use_safetensors=True)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> Comparison:
    diff = (reference.double() - candidate.double()).abs().max().item()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).double().mean().item()
    return Comparison(max_abs_diff=diff, top1_agreement=agree, tokens=reference.shape[0] * reference.shape[1])


def run_compare(hf_dir: str, ckpt_dir: str, parallel: ParallelConfig, tokens: torch.Tensor, dtype: str = "fp32") -> Comparison | None:
    """Call on every rank of a torchrun job, or alone; the reporting rank returns the Comparison.

    ``ckpt_dir`` is a checkpoint directory or a trainer output_dir (its newest checkpoint).
    Alone, the one-rank group binds no TCP port (see ``platform.initialize``). A group made
    here is destroyed before returning: a process that exits with a live gloo group can abort
    in its destructors. A caller's group is left alone.
    """
    from anchored_megatron.platform import initialize, shutdown

    if torch.distributed.is_initialized():
        initialize(parallel)
        return _compare(hf_dir, ckpt_dir, parallel, tokens, dtype)
    initialize(parallel)
    try:
        return _compare(hf_dir, ckpt_dir, parallel, tokens, dtype)
    finally:
        shutdown()


def _compare(hf_dir: str, ckpt_dir: str, parallel: ParallelConfig, tokens: torch.Tensor, dtype: str) -> Comparison | None:
    import dataclasses

    from megatron.core import parallel_state

    from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir
    from anchored_megatron.checkpoint.model_config import load_model_config
    from anchored_megatron.checkpoint.weights import load_megatron_weights
    from anchored_megatron.models.builder import build_model_chunks

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir, "--ckpt")
    # A checkpoint trained in FP8 is compared at the requested dtype without FP8.
    model = dataclasses.replace(load_model_config(ckpt_dir), params_dtype=dtype, fp8=None, fp8_bf16_first_last_layers=0)
    model.validate(parallel)
    chunks = build_model_chunks(model, parallel)
    load_megatron_weights(chunks, ckpt_dir)
    logits = megatron_logits(chunks, tokens, model)
    reporting = (logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
                 and parallel_state.get_data_parallel_rank() == 0)
    if not reporting:
        return None
    from anchored_megatron.models.dtypes import DTYPES

    return compare_logits(hf_logits(hf_dir, tokens, DTYPES[dtype]), logits)
