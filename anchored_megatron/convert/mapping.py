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

MoE layers (SequentialMLP) replace the MLP with ``mlp.router.weight`` (one row per expert)
and the experts, saved under ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` /
``linear_fc2.weight`` with two leading axes, layer and global expert index ([L, E, rows,
cols]), so a checkpoint does not depend on the expert-parallel layout either. An entry's
``expert`` is (index, count) on that second axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError

LAYER_PREFIX = "decoder.layers."

# Checkpoint key suffix (TE names) -> local-spec module parameter name, where they differ.
_LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# Linear layers whose (empty) ``_extra_state`` Megatron stores as a ShardedObject per layer.
ATTENTION_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv")
EXTRA_STATE_LINEARS = (*ATTENTION_LINEARS, "mlp.linear_fc1", "mlp.linear_fc2")
EXPERTS_KEY = LAYER_PREFIX + "mlp.experts.experts."  # + linear_fc1.weight / linear_fc2.weight
EXPERT_LINEARS = ("linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class ExpertNames:
    """A MoE family's HF tensor names inside ``model.layers.{i}.``; ``{e}`` is the expert index."""

    router: str
    gate: str
    up: str
    down: str

    def expert(self, template: str, layer: int, expert: int) -> str:
        return f"model.layers.{layer}." + template.format(e=expert)


@dataclass(frozen=True)
class Rule:
    """HF tensors ``hf_names`` <-> one Megatron entry; ``merge``/``split`` convert between them."""

    hf_names: tuple[str, ...]
    key: str
    layer: int | None = None
    fragment: tuple[int, int] | None = None
    expert: tuple[int, int] | None = None  # (global expert index, number of experts)
    merge: Callable[[list[torch.Tensor]], torch.Tensor] | None = None  # HF pieces -> Megatron tensor
    split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # Megatron tensor -> HF pieces

    def to_megatron(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return self.merge(pieces) if self.merge else pieces[0]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.split(tensor) if self.split else [tensor]

    @property
    def label(self) -> str:
        where = f"[layer {self.layer}]" if self.layer is not None else ""
        where += f"[expert {self.expert[0]}]" if self.expert is not None else ""
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


def _check_expert_names(model: ModelConfig, experts: ExpertNames | None) -> None:
    if model.is_moe and experts is None:
        raise ConvertError("a MoE model's expert tensors are named by its family, and none was given")
    if model.moe_shared_expert_intermediate_size is not None:
        raise ConvertError("model.moe_shared_expert_intermediate_size: shared experts have no Hugging Face mapping here (Qwen3-MoE and Mixtral have none)")


def _mlp_rules(model: ModelConfig, layer: int, experts: ExpertNames | None) -> list[Rule]:
    hf, key = f"model.layers.{layer}.", LAYER_PREFIX
    if not model.is_moe:
        return [
            Rule((hf + "mlp.gate_proj.weight",), key + "mlp.linear_fc1.weight", layer, fragment=(0, 2)),
            Rule((hf + "mlp.up_proj.weight",), key + "mlp.linear_fc1.weight", layer, fragment=(1, 2)),
            Rule((hf + "mlp.down_proj.weight",), key + "mlp.linear_fc2.weight", layer),
        ]
    count = model.num_moe_experts
    out = [Rule((hf + experts.router,), key + "mlp.router.weight", layer)]
    for e in range(count):
        where = dict(layer=layer, expert=(e, count))
        out.append(Rule((experts.expert(experts.gate, layer, e),), EXPERTS_KEY + "linear_fc1.weight", fragment=(0, 2), **where))
        out.append(Rule((experts.expert(experts.up, layer, e),), EXPERTS_KEY + "linear_fc1.weight", fragment=(1, 2), **where))
        out.append(Rule((experts.expert(experts.down, layer, e),), EXPERTS_KEY + "linear_fc2.weight", **where))
    return out


def rules(model: ModelConfig, experts: ExpertNames | None = None) -> list[Rule]:
    """Every tensor of ``model``, in an order that keeps one layer's tensors together.
    ``experts``: the family's expert tensor names (MoE models only)."""
    _check_expert_names(model, experts)
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
        out.extend(_mlp_rules(model, i, experts))
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


def hf_shapes(model: ModelConfig, experts: ExpertNames | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor ``model`` implies (to validate a checkpoint from headers alone)."""
    _check_expert_names(model, experts)
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
        })
        if model.is_moe:
            expert_ffn = model.expert_ffn_hidden_size
            shapes[p + experts.router] = (model.num_moe_experts, hidden)
            for e in range(model.num_moe_experts):
                shapes.update({
                    experts.expert(experts.gate, i, e): (expert_ffn, hidden),
                    experts.expert(experts.up, i, e): (expert_ffn, hidden),
                    experts.expert(experts.down, i, e): (hidden, expert_ffn),
                })
        else:
            shapes.update({p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                           p + "mlp.down_proj.weight": (hidden, ffn)})
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
    }
    if model.is_moe:
        experts, expert_ffn = model.num_moe_experts, model.expert_ffn_hidden_size
        shapes[LAYER_PREFIX + "mlp.router.weight"] = (layers, experts, hidden)
        shapes[EXPERTS_KEY + "linear_fc1.weight"] = (layers, experts, 2 * expert_ffn, hidden)
        shapes[EXPERTS_KEY + "linear_fc2.weight"] = (layers, experts, hidden, expert_ffn)
    else:
        shapes[LAYER_PREFIX + "mlp.linear_fc1.weight"] = (layers, 2 * ffn, hidden)
        shapes[LAYER_PREFIX + "mlp.linear_fc2.weight"] = (layers, hidden, ffn)
    if not model.tie_embeddings:
        shapes["output_layer.weight"] = (rows, hidden)
    if model.qkv_bias:
        shapes[LAYER_PREFIX + "self_attention.linear_qkv.bias"] = (layers, qkv_rows)
    if model.qk_layernorm:
        shapes[LAYER_PREFIX + "self_attention.q_layernorm.weight"] = (layers, head_dim)
        shapes[LAYER_PREFIX + "self_attention.k_layernorm.weight"] = (layers, head_dim)
    return shapes
