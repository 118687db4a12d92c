"""Whole (TP=1, canonically named) weights across layouts, for tests that compare a parallel
layout with a single process: shapes, loading, gathering and comparing chunks."""

import torch

from anchored_megatron.models.layout import canonical_name, partition_dim, shard, unshard, unwrap


def full_shape(param: torch.Tensor, tp_size: int) -> torch.Size:
    """The TP=1 shape of a parameter whose local slice is ``param``."""
    dim = partition_dim(param)
    if dim is None:
        return param.shape
    shape = list(param.shape)
    shape[dim] *= tp_size
    return torch.Size(shape)


def gather_full(tensor: torch.Tensor, name: str, param: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """All-gather the TP slices of ``tensor`` into the full tensor (on every rank of ``group``).

    ``tensor`` is the parameter ``param`` itself or laid out like it (its grad, an optimizer
    moment); the split dimension is read from ``param``.
    """
    from megatron.core import parallel_state

    param = tensor if param is None else param
    group = group or parallel_state.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if partition_dim(param) is None or size == 1:
        return tensor.detach().clone()
    pieces = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(pieces, tensor.detach().contiguous(), group=group)
    return unshard(pieces, name, param)


def load_full_state(chunks, full_state: dict[str, torch.Tensor]) -> None:
    """Copy canonical full tensors into this rank's chunks (TP slice + pipeline placement)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for chunk in chunks:
            for local_name, param in unwrap(chunk).named_parameters():
                name = canonical_name(chunk, local_name)
                if name not in full_state:
                    if name == "output_layer.weight" and "embedding.word_embeddings.weight" in full_state:
                        # Tied embeddings: the last pipeline stage's copy of the embedding.
                        name = "embedding.word_embeddings.weight"
                    else:
                        raise KeyError(f"no tensor for parameter {name}")
                param.copy_(shard(full_state[name], name, param, tp_rank, tp_size))


def weights_equal(a_chunks, b_chunks) -> bool:
    """Whether two identically laid-out lists of chunks hold bitwise equal parameters."""
    for a, b in zip(a_chunks, b_chunks, strict=True):
        b_params = dict(unwrap(b).named_parameters())
        for name, param in unwrap(a).named_parameters():
            if not torch.equal(param, b_params[name]):
                return False
    return True
