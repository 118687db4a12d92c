"""Silence the third-party warnings that say nothing a user of this project can act on.

Each entry matches one warning by category, message and the module it is attributed to; any
other warning, these messages from other modules included, still shows. Installed at start-up
by the entry points (``anchored-sft``, the demo, every rank of ``testing.run_on_ranks``), never
on import: a program that imports the library keeps its own warning settings. The filters are
appended, so ``-W`` / ``PYTHONWARNINGS`` choices of the user still take precedence.

Without CUDA, a warning raised inside a torch op is attributed to the frame that called the op,
which is the CPU shim's dispatch (``platform/cpu_shim.py``) for every op Megatron-Core calls:
two entries therefore also accept that module.
"""

from __future__ import annotations

import warnings

_SHIM = r"anchored_megatron\.platform\.cpu_shim\Z"

# (category, message regex, module regex, why it is silenced)
KNOWN = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back", r"megatron\.core\.",
     "Megatron-Core without TE/apex, once per module at import: the local implementations are what runs "
     "(models/te.py chooses each fused kernel where it exists)"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.",
     "the same notice for the norm layers"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope", r"megatron\.core\.transformer\.transformer_config\Z",
     "raised by TransformerConfig's own default (cuda_graph_scope='full'); CUDA graphs are not used"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed", r"megatron\.core\.dist_checkpointing\.",
     "dist_checkpointing's torch_dist loader calls torch.distributed.checkpoint's old name"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", rf"(torch|megatron)\.|{_SHIM}",
     "dist_checkpointing builds ShardedTensors for the checkpoint layout"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     r"torch\.distributed\.c10d_logger\Z",
     "Megatron's DDP and distributed optimizer call the old collective names"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     rf"megatron\.core\.optimizer\.|{_SHIM}",
     "the distributed optimizer's zero_grad reads .grad of its fp32 shard views (Megatron notes it in the code)"),
)


def install() -> None:
    """Add the filters (idempotent: an entry already in the list is not appended again)."""
    for category, message, module, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module, append=True)
