"""Checkpoint metadata is unpickled with a whitelist: real metadata loads, a crafted file does not run."""

import io
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties, TensorStorageMetadata

from anchored_megatron.checkpoint.safe_load import UnsafeCheckpointError, restricted_load


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


class _CreatesFile:
    """Unpickling this object creates ``path``: a stand-in for code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_common_checkpoint(directory, marker):
    import json

    directory.mkdir()
    (directory / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
    ))
    torch.save({"trainer": _CreatesFile(marker)}, directory / "common.pt")
    return str(directory)


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_crafted_common_state_is_refused_and_never_runs(tmp_path, monkeypatch, force_unsafe):
    from megatron.core import dist_checkpointing

    from anchored_megatron.checkpoint import safe_load
    from anchored_megatron.checkpoint.trainer_io import CheckpointError, load_checkpoint

    marker = tmp_path / "created-by-unpickling"
    path = _crafted_common_checkpoint(tmp_path / "ckpt", marker)
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        with pytest.raises(safe_load.UnsafeLoadSettingError, match=f"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: .* {path} .* Unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            load_checkpoint(path, [])
    else:
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: common.pt: cannot be read \\(UnpicklingError: Weights only load failed"):
            load_checkpoint(path, [], message=lambda line: None)
    assert not marker.exists()
    # Megatron's own entry point, as a Megatron-LM loop calls it: weights-only whatever the variable says.
    safe_load.install()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        dist_checkpointing.load_common_state_dict(path)
    assert not marker.exists()


def crafted_sharded_object_rank(directory, marker):
    """Save a ShardedObject whose unpickling creates ``marker``; load it back through Megatron."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    from anchored_megatron import checkpoint
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=0)
    checkpoint.install()  # as a Megatron-LM loop does before Megatron's own loads
    os.makedirs(directory)
    dist_checkpointing.save({"extra": ShardedObject("extra", _CreatesFile(marker), (1,), (0,), replica_id=0)}, directory)
    try:
        dist_checkpointing.load({"extra": ShardedObject("extra", None, (1,), (0,), replica_id=0)}, directory)
    except BaseException as exc:  # noqa: BLE001 - torch.distributed.checkpoint raises a BaseException
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.distributed
def test_crafted_sharded_object_in_a_shard_is_refused_and_never_runs(tmp_path, ranks):
    marker = tmp_path / "created-by-unpickling"
    error = ranks(crafted_sharded_object_rank, 1, str(tmp_path / "ckpt"), str(marker))[0]
    assert not marker.exists()
    assert error is not None and "Weights only load failed" in error and "GLOBAL io.open was not an allowed global" in error
