"""Tiny random HF models of each family, and the per-rank work of the distributed tests."""

from __future__ import annotations

import os

import torch

VOCAB = 100  # not a multiple of 16: needs padding at every TP


def make_hf_model(family: str, out_dir: str, seed: int = 0, **overrides) -> str:
    """Build a small random model offline, save it as safetensors, return its directory."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family in ("qwen3", "qwen3_moe"):
        kwargs["head_dim"] = 16  # like real Qwen3: not hidden_size / num_attention_heads (8)
    if family in ("mistral", "mixtral"):
        kwargs["sliding_window"] = None
    if family == "qwen3_moe":  # expert size apart from the dense intermediate_size, like real Qwen3-MoE
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    if family == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float()
    with torch.no_grad():
        # Random init leaves norms at 1 and biases at 0; perturb them so a mix-up shows.
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return out_dir


def rank_logits(cases: list[tuple[str, str]], layouts: list[tuple], tokens: torch.Tensor,
                save_dirs: dict | None = None) -> dict:
    """On every rank: load each converted checkpoint at each layout (tp, pp, vpp[, ep]) and run ``tokens``.

    Returns {(case, layout): logits} from the reporting rank of each layout (last stage,
    TP rank 0, DP rank 0). ``save_dirs`` {(case, layout): dir} also saves that model back
    as the trainer would (padded vocab) with an extra non-model key, for the export tests.
    """
    from megatron.core import parallel_state

    from anchored_megatron.checkpoint.model_config import load_model_config
    from anchored_megatron.checkpoint.weights import load_megatron_weights, save_megatron_weights
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.convert.compare import megatron_logits
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    out = {}
    for layout in layouts:
        tp, pp, vpp, ep = (*layout, 1)[:4]
        parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep)
        initialize(parallel)
        for name, ckpt in cases:
            model = load_model_config(ckpt)
            chunks = build_model_chunks(model, parallel)
            load_megatron_weights(chunks, ckpt)
            logits = megatron_logits(chunks, tokens, model)
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
                out[(name, layout)] = logits
            target = (save_dirs or {}).get((name, layout))
            if target is not None:
                save_megatron_weights(chunks, target["plain"], model)
                _save_with_optimizer_key(chunks, target["with_optimizer"], model)
    return out


def _save_with_optimizer_key(chunks, ckpt_dir: str, model) -> None:
    """A trainer-like checkpoint: the model under "model" plus a fake optimizer tensor."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from anchored_megatron.checkpoint.model_config import write_model_config

    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    fake = ShardedTensor.from_rank_offsets("optimizer.state.fake", torch.full((3,), float(rank)), (0, rank, world), replica_id=0)
    state = {"model": chunks[0].sharded_state_dict(), "optimizer": {"fake": fake}}
    dist_checkpointing.save(state, ckpt_dir)
    if torch.distributed.get_rank() == 0:
        write_model_config(ckpt_dir, model)
    torch.distributed.barrier()
