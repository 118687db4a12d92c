"""Checkpoint metadata is unpickled with a whitelist: real metadata loads, a crafted file does not run."""

import io
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties, TensorStorageMetadata

from anchored_megatron.platform.safe_load import UnsafeCheckpointError, restricted_load


def test_dcp_metadata_round_trips():
    tensor = TensorStorageMetadata(
        properties=TensorProperties(dtype=torch.bfloat16),
        size=torch.Size([4, 8]),
        chunks=[ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 8]))],
    )
    metadata = Metadata(state_dict_metadata={"decoder.weight": tensor})
    loaded = restricted_load(io.BytesIO(pickle.dumps(metadata)))
    assert loaded.state_dict_metadata["decoder.weight"].size == torch.Size([4, 8])
    assert loaded.state_dict_metadata["decoder.weight"].properties.dtype == torch.bfloat16


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_metadata_is_refused_naming_the_global():
    with pytest.raises(UnsafeCheckpointError, match=r"posix.system|os.system"):
        restricted_load(io.BytesIO(pickle.dumps(_Exploit())))
