"""HF tensor names <-> Megatron dist-checkpoint entries, and the tensor reshuffles between them.

A Megatron dist-checkpoint entry is (key, layer, fragment):
- ``key`` is the sharded key Megatron-Core 0.16.1 writes. Per-layer tensors are stacked on a
  leading layer axis under one key (``decoder.layers.self_attention.linear_qkv.weight`` has
  global shape [num_layers, rows, hidden]); ``layer`` is the index on that axis. The local
  layer spec maps its norm names onto the Transformer Engine ones in the checkpoint
  (``input_layernorm.weight`` is saved as ``linear_qkv.layer_norm_weight``), so both specs
  share one key set; ``module_param_name`` gives each spec's module parameter name.
- ``fragment`` = (index, count) along the rows axis. ``linear_fc1.weight`` is cat(gate, up)
  and Megatron saves it as two fragments (gate, up) even at TP=1, so it is written as two
  pieces straight from HF's gate_proj / up_proj, with no concatenated copy.

``linear_qkv`` rows are interleaved per query group: [q (heads/groups*head_dim rows), k, v].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from anchored_megatron.config import ModelConfig

LAYER_PREFIX = "decoder.layers."

# Checkpoint key suffix (TE names) -> local-spec module parameter name, where they differ.
_LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# Linear layers whose (empty) ``_extra_state`` Megatron stores as a ShardedObject per layer.
EXTRA_STATE_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Rule:
    """HF tensors ``hf_names`` <-> one Megatron entry; ``merge``/``split`` convert between them."""

    hf_names: tuple[str, ...]
    key: str
    layer: int | None = None
    fragment: tuple[int, int] | None = None
    merge: Callable[[list[torch.Tensor]], torch.Tensor] | None = None  # HF pieces -> Megatron tensor
    split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # Megatron tensor -> HF pieces

    def to_megatron(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return self.merge(pieces) if self.merge else pieces[0]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.split(tensor) if self.split else [tensor]

    @property
    def label(self) -> str:
        where = f"[layer {self.layer}]" if self.layer is not None else ""
        part = f"[fragment {self.fragment[0]}/{self.fragment[1]}]" if self.fragment else ""
        return f"{self.key}{where}{part}"


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v (weights or biases) -> Megatron's per-group [q_g, k_g, v_g] row order."""
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, -1, *tail)
    v = v.reshape(groups, -1, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> list[torch.Tensor]:
    """Inverse of ``interleave_qkv``: [q, k, v], each a fresh contiguous tensor."""
    tail = qkv.shape[1:]
    per_group = heads // groups
    grouped = qkv.reshape(groups, per_group + 2, -1, *tail)  # rows of one head = head_dim
    head_dim = grouped.shape[2]
    q = grouped[:, :per_group].reshape(heads * head_dim, *tail).contiguous()
    k = grouped[:, per_group].reshape(groups * head_dim, *tail).contiguous()
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *tail).contiguous()
    return [q, k, v]


def rules(model: ModelConfig) -> list[Rule]:
    """Every tensor of ``model``, in an order that keeps one layer's tensors together."""
    heads, groups = model.num_attention_heads, model.num_query_groups
    merge_qkv = lambda ts: interleave_qkv(*ts, groups=groups)  # noqa: E731
    split = lambda t: split_qkv(t, heads, groups)  # noqa: E731
    out = [Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight")]
    for i in range(model.num_layers):
        hf = f"model.layers.{i}."
        attn = hf + "self_attn."
        key = LAYER_PREFIX
        out.append(Rule((hf + "input_layernorm.weight",), key + "self_attention.linear_qkv.layer_norm_weight", i))
        out.append(Rule(tuple(attn + p + ".weight" for p in ("q_proj", "k_proj", "v_proj")),
                        key + "self_attention.linear_qkv.weight", i, merge=merge_qkv, split=split))
        if model.qkv_bias:
            out.append(Rule(tuple(attn + p + ".bias" for p in ("q_proj", "k_proj", "v_proj")),
                            key + "self_attention.linear_qkv.bias", i, merge=merge_qkv, split=split))
        if model.qk_layernorm:
            out.append(Rule((attn + "q_norm.weight",), key + "self_attention.q_layernorm.weight", i))
            out.append(Rule((attn + "k_norm.weight",), key + "self_attention.k_layernorm.weight", i))
        out.append(Rule((attn + "o_proj.weight",), key + "self_attention.linear_proj.weight", i))
        out.append(Rule((hf + "post_attention_layernorm.weight",), key + "mlp.linear_fc1.layer_norm_weight", i))
        out.append(Rule((hf + "mlp.gate_proj.weight",), key + "mlp.linear_fc1.weight", i, fragment=(0, 2)))
        out.append(Rule((hf + "mlp.up_proj.weight",), key + "mlp.linear_fc1.weight", i, fragment=(1, 2)))
        out.append(Rule((hf + "mlp.down_proj.weight",), key + "mlp.linear_fc2.weight", i))
    out.append(Rule(("model.norm.weight",), "decoder.final_layernorm.weight"))
    if not model.tie_embeddings:
        out.append(Rule(("lm_head.weight",), "output_layer.weight"))
    return out


def module_param_name(key: str, layer: int | None, transformer_impl: str) -> str:
    """The parameter's name in a TP=1/PP=1 GPTModel built with ``transformer_impl``'s layer spec."""
    if layer is None:
        return key
    suffix = key[len(LAYER_PREFIX):]
    if transformer_impl == "local":
        suffix = _LOCAL_NAMES.get(suffix, suffix)
    return f"{LAYER_PREFIX}{layer}.{suffix}"


def checkpoint_key(module_name: str) -> tuple[str, int | None]:
    """Inverse of ``module_param_name`` (for either spec): (checkpoint key, layer index)."""
    if not module_name.startswith(LAYER_PREFIX):
        return module_name, None
    index, suffix = module_name[len(LAYER_PREFIX):].split(".", 1)
    local_to_te = {v: k for k, v in _LOCAL_NAMES.items()}
    return LAYER_PREFIX + local_to_te.get(suffix, suffix), int(index)


def is_vocab_key(key: str) -> bool:
    """Rows of these tensors are vocabulary entries (padded per TP layout by Megatron)."""
    return key in ("embedding.word_embeddings.weight", "output_layer.weight")


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor ``model`` implies (to validate a checkpoint from headers alone)."""
    hidden, ffn, vocab = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    head_dim = model.head_dim
    q_rows, kv_rows = model.num_attention_heads * head_dim, model.num_query_groups * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
        if model.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
        if model.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
    return shapes


def megatron_shapes(model: ModelConfig, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """Global shape of every dist-checkpoint tensor key (layers stacked on axis 0)."""
    hidden, ffn, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    head_dim = model.head_dim
    qkv_rows = (model.num_attention_heads + 2 * model.num_query_groups) * head_dim
    rows = vocab_rows or model.vocab_size
    shapes = {
        "embedding.word_embeddings.weight": (rows, hidden),
        "decoder.final_layernorm.weight": (hidden,),
        LAYER_PREFIX + "self_attention.linear_qkv.layer_norm_weight": (layers, hidden),
        LAYER_PREFIX + "self_attention.linear_qkv.weight": (layers, qkv_rows, hidden),
        LAYER_PREFIX + "self_attention.linear_proj.weight": (layers, hidden, model.num_attention_heads * head_dim),
        LAYER_PREFIX + "mlp.linear_fc1.layer_norm_weight": (layers, hidden),
        LAYER_PREFIX + "mlp.linear_fc1.weight": (layers, 2 * ffn, hidden),
        LAYER_PREFIX + "mlp.linear_fc2.weight": (layers, hidden, ffn),
    }
    if not model.tie_embeddings:
        shapes["output_layer.weight"] = (rows, hidden)
    if model.qkv_bias:
        shapes[LAYER_PREFIX + "self_attention.linear_qkv.bias"] = (layers, qkv_rows)
    if model.qk_layernorm:
        shapes[LAYER_PREFIX + "self_attention.q_layernorm.weight"] = (layers, head_dim)
        shapes[LAYER_PREFIX + "self_attention.k_layernorm.weight"] = (layers, head_dim)
    return shapes
