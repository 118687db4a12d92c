"""Parameter counts per rank, from the model sizes alone (no model is built).

Mirrors what ``models.builder.build_model_chunk`` allocates for a Llama-shaped GPTModel
(local or Transformer Engine spec: the TE spec fuses the norms into the linear layers,
which changes names but not counts):

- per layer: two RMSNorm weights [h] (replicated), linear_qkv [(a + 2g) d / t, h] (+ bias),
  optional q/k layernorms [d] each (replicated), linear_proj [h, a d / t],
  gated linear_fc1 [2 F / t, h], linear_fc2 [h, F / t];
- a MoE layer instead of that MLP: the router [E, h] (replicated) and E / ep experts, each a
  gated MLP of F_e rows split over t (the experts keep the tensor-parallel size), plus an
  optional shared expert of S rows split over t;
- first stage: word embeddings [V_padded / t, h];
- last stage: final RMSNorm [h] and the output layer [V_padded / t, h]. With tied
  embeddings the output layer reuses the embedding on a single stage, but with PP > 1 the
  last stage holds its own copy (kept equal by Megatron's embedding-group all-reduce).

RoPE has no parameters (its inverse frequencies are a buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from anchored_megatron.config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class ChunkParameters:
    """Parameter counts of one model chunk (one virtual stage of one pipeline rank) on one TP rank."""

    layers: int  # transformer layers in this chunk
    decoder: int  # parameters of those layers
    experts: int  # of which MoE experts (their optimizer state shards over the expert-data-parallel ranks)
    embedding: int  # word embeddings (first stage only)
    output_layer: int  # output projection (last stage; 0 when tied on a single stage)
    final_norm: int

    @property
    def total(self) -> int:
        return self.decoder + self.embedding + self.output_layer + self.final_norm


def _gated_mlp(rows: int, hidden: int, tp: int) -> int:
    return (2 * rows // tp) * hidden + hidden * (rows // tp)


def layer_expert_parameters(model: ModelConfig, tp: int, ep: int = 1) -> int:
    """Parameters of one layer's experts on one rank (0 for a dense model)."""
    if not model.is_moe:
        return 0
    return model.num_moe_experts // ep * _gated_mlp(model.expert_ffn_hidden_size, model.hidden_size, tp)


def layer_parameters(model: ModelConfig, tp: int, ep: int = 1) -> int:
    """Parameters of one transformer layer on one TP (and EP) rank."""
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    qkv_rows = (model.num_attention_heads + 2 * model.num_query_groups) * d // tp
    attention = qkv_rows * h + h * (model.num_attention_heads * d // tp)
    if model.qkv_bias:
        attention += qkv_rows
    if model.qk_layernorm:
        attention += 2 * d
    if model.is_moe:
        mlp = model.num_moe_experts * h + layer_expert_parameters(model, tp, ep)
        if model.moe_shared_expert_intermediate_size is not None:
            mlp += _gated_mlp(model.moe_shared_expert_intermediate_size, h, tp)
    else:
        mlp = _gated_mlp(f, h, tp)
    norms = 2 * h
    return attention + mlp + norms


def chunk_parameters(model: ModelConfig, parallel: ParallelConfig, pp_rank: int, vp_stage: int = 0) -> ChunkParameters:
    vpp = parallel.vpp or 1
    layers = model.num_layers // (parallel.pp * vpp)
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == parallel.pp - 1 and vp_stage == vpp - 1
    vocab_rows = model.padded_vocab_size(parallel.tp) // parallel.tp
    embedding = vocab_rows * model.hidden_size if first else 0
    shares_embedding = model.tie_embeddings and first
    output_layer = vocab_rows * model.hidden_size if last and not shares_embedding else 0
    return ChunkParameters(
        layers=layers,
        decoder=layers * layer_parameters(model, parallel.tp, parallel.ep),
        experts=layers * layer_expert_parameters(model, parallel.tp, parallel.ep),
        embedding=embedding,
        output_layer=output_layer,
        final_norm=model.hidden_size if last else 0,
    )


def rank_parameters(model: ModelConfig, parallel: ParallelConfig, pp_rank: int) -> list[ChunkParameters]:
    """Every chunk a rank of pipeline stage ``pp_rank`` owns (``vpp`` of them when interleaved).
    Every TP and DP rank of a stage holds the same counts."""
    return [chunk_parameters(model, parallel, pp_rank, vp) for vp in range(parallel.vpp or 1)]


def total_parameters(model: ModelConfig) -> int:
    """Unsharded parameter count of the model (TP = PP = 1), padded vocabulary included."""
    return chunk_parameters(model, ParallelConfig(), 0).total
