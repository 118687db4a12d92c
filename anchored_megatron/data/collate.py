"""Stack dataset items into a micro-batch and build the attention inputs."""

from __future__ import annotations

import torch


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``[s]`` tensors into ``[b, s]`` and add:

    - ``attention_mask``: bool ``[b, 1, s, s]``, True = masked out (Megatron's
      convention): causal and block-diagonal by ``document_ids``, so packed documents
      never see each other (padding positions only see padding).
    - ``cu_seqlens``: int32 ``[num_segments + 1]`` over the flattened ``b * s`` tokens
      (every document, and every padding run, is a segment), and ``max_seqlen`` (int32
      scalar): what ``PackedSeqParams`` (Transformer Engine, THD layout) takes.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    document_ids = batch["document_ids"]
    b, s = document_ids.shape
    same_document = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril_()
    batch["attention_mask"] = (~(same_document & causal)).unsqueeze(1)
    flat = document_ids.reshape(-1)
    starts = torch.ones(b * s, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a new row starts a new segment even if ids repeat
    cu_seqlens = torch.cat([starts.nonzero().squeeze(1), torch.tensor([b * s])]).to(torch.int32)
    batch["cu_seqlens"] = cu_seqlens
    batch["max_seqlen"] = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
    return batch
