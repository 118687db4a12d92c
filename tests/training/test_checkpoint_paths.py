"""Which checkpoint a path names: the one resolution the trainer and the converters share."""

import os

import pytest

from anchored_megatron.config import ConfigError
from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir


@pytest.fixture
def output_dir(tmp_path):
    """A trainer output_dir with checkpoints at steps 2 and 4; ``latest`` names step 4."""
    root = tmp_path / "run" / "checkpoints"
    for name in ("iter_0000002", "iter_0000004", "iter_0000006.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / "metadata.json").write_text("{}")
    (root / "latest").write_text("iter_0000004\n")
    return tmp_path / "run"


def test_a_checkpoint_directory_is_itself(output_dir):
    path = str(output_dir / "checkpoints" / "iter_0000002")
    assert resolve_checkpoint_dir(path, "--ckpt") == path


def test_output_dir_and_checkpoint_root_give_the_newest_or_the_chosen_iteration(output_dir):
    root = str(output_dir / "checkpoints")
    for path in (str(output_dir), root):
        assert resolve_checkpoint_dir(path, "--ckpt") == os.path.join(root, "iter_0000004")
        assert resolve_checkpoint_dir(path, "--ckpt", iteration=2) == os.path.join(root, "iter_0000002")


def test_unknown_iteration_lists_the_complete_ones(output_dir):
    with pytest.raises(ConfigError) as info:
        resolve_checkpoint_dir(str(output_dir), "--ckpt", iteration=6)
    assert str(info.value) == f"--ckpt: {output_dir / 'checkpoints'} holds no checkpoint of iteration 6 (available iterations: 2, 4)"


def test_iteration_of_a_single_checkpoint_is_refused(output_dir):
    path = output_dir / "checkpoints" / "iter_0000002"
    with pytest.raises(ConfigError, match=r"^--ckpt: .*iter_0000002 is a single checkpoint; iteration 2 can only be chosen in a trainer output_dir$"):
        resolve_checkpoint_dir(str(path), "--ckpt", iteration=2)


def test_a_directory_that_is_no_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_checkpoint_dir(str(tmp_path), "student.checkpoint")
    assert str(info.value) == (
        f"student.checkpoint: {tmp_path}: not a checkpoint (expected a checkpoint directory with metadata.json, "
        "or a trainer output_dir whose checkpoints/latest names one)"
    )
    with pytest.raises(ConfigError, match=r"^student.checkpoint: .*nowhere: no such directory$"):
        resolve_checkpoint_dir(str(tmp_path / "nowhere"), "student.checkpoint")


def test_a_dangling_latest_pointer_is_named(output_dir):
    (output_dir / "checkpoints" / "latest").write_text("iter_0000008\n")
    with pytest.raises(ConfigError, match=r"^--ckpt: .*latest: points at 'iter_0000008', which does not exist$"):
        resolve_checkpoint_dir(str(output_dir), "--ckpt")
