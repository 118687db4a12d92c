"""Stack dataset items into a micro-batch and build the attention inputs."""

from __future__ import annotations

import torch


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``[s]`` tensors into ``[b, s]`` and add ``attention_mask``: bool ``[b, 1, s, s]``,
    True = masked out (Megatron's convention): causal and block-diagonal by ``document_ids``,
    so packed documents never see each other (padding positions only see padding), and
    ``loss_rows``: int64 ``[n]``, the flat ``[b * s]`` indices where ``loss_mask`` is nonzero, made
    here on the host so that the fused output loss can skip the other tokens without a device sync."""
    if not items:
        raise ValueError("collate needs at least one item")
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    document_ids = batch["document_ids"]
    s = document_ids.shape[1]
    same_document = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril_()
    batch["attention_mask"] = (~(same_document & causal)).unsqueeze(1)
    if "loss_mask" in batch:
        batch["loss_rows"] = batch["loss_mask"].reshape(-1).nonzero().squeeze(1)
    return batch
