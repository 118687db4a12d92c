"""A real full disk under output_dir (a small tmpfs): whichever writer fails first (Megatron's shard
writer with ENOSPC, or torch's own writer of common.pt / a rank's state, which reports a short write
with no errno), the run says the disk is full and how much was free, keeps ``latest`` on the last
complete checkpoint, and resumes from it bit-exactly once there is room."""

import json
import os
import re
import subprocess

import pytest

from tests.training.cli import run_train, write_config
from tests.training.conftest import run_config

# One checkpoint of this run is about 3.1 MB: a 5 MB disk holds the first and not the second.
DISK = "5m"
FULL = re.compile(r"anchored-sft: error: saving checkpoint iter_0000002 into .*: the disk is full \(No space left on device; "
                  r"(\d+\.\d) MiB were free there when it failed\)\. 'latest' still names the last complete checkpoint, iter_0000001")


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, DISK)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _config(tiny_run, tmp_path, out):
    cfg = run_config(tiny_run, out, anchor__objective="sft", train__save_interval=1, train__max_steps=3)
    for key in ("reference", "model"):
        cfg.pop(key)
    cfg["anchor"].pop("alpha")
    return write_config(tmp_path / f"{os.path.basename(out)}.yaml", cfg)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}  # a resumed run's last record per step


def test_a_full_disk_is_named_with_its_free_space_and_the_run_resumes_exactly(tiny_run, tmp_path, small_disk):
    """The second save overflows the disk (Megatron's shard writer gets ENOSPC)."""
    reference = tmp_path / "uninterrupted"
    assert run_train(_config(tiny_run, tmp_path, reference)).returncode == 0
    out = small_disk / "run"
    config = _config(tiny_run, tmp_path, out)
    failed = run_train(config)
    assert failed.returncode != 0
    match = FULL.search(failed.stderr)
    assert match, failed.stderr
    assert float(match.group(1)) < 1.0
    assert "Traceback" not in failed.stderr
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000001"
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest"]  # the half-written save is gone

    # Room again: the same command resumes from iter_0000001 and trains as if nothing happened.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_train(config)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _losses(out) == _losses(reference)


def filled_before_rank_state_rank(cfg_dict, disk):
    """Train; right before the second save writes this rank's state (torch's own writer), fill the
    disk, so that write is the one that fails."""
    import torch

    from tests.training.test_checkpoint_integrity import train_error

    original, saves = torch.save, {"rank_state": 0}

    def save(obj, path, *args, **kwargs):
        if "rank_state" in str(path):
            saves["rank_state"] += 1
            if saves["rank_state"] == 2:
                stat = os.statvfs(disk)
                with open(os.path.join(disk, "filler"), "wb") as fh:
                    try:
                        fh.write(b"\0" * (stat.f_bavail * stat.f_frsize))
                    except OSError:
                        pass
        return original(obj, path, *args, **kwargs)

    torch.save = save
    return train_error(cfg_dict)


@pytest.mark.distributed
def test_torch_writer_failing_on_a_full_disk_is_named_too(tiny_run, small_disk, ranks):
    """torch's writer reports a short write as "unexpected pos N vs M", without an errno."""
    cfg = run_config(tiny_run, small_disk / "run", train__save_interval=1, train__max_steps=3)
    error = ranks(filled_before_rank_state_rank, 1, cfg, str(small_disk))[0]
    assert error is not None and error.startswith(
        f"CheckpointError: saving checkpoint iter_0000002 into {small_disk / 'run' / 'checkpoints'}: the disk is full "
        "(No space left on device; 0.0 MiB were free there when it failed)."), error
    assert (small_disk / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000001"


@pytest.mark.parametrize("error, free, full", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 0, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 2**30, False),
    (OSError(28, "No space left on device"), 2**30, True),
    (KeyboardInterrupt(), 0, False),
    (RuntimeError("Timed out waiting 15000ms for recv operation to complete"), 0, False),
])
def test_what_counts_as_a_full_disk(error, free, full):
    """A failed write with (nearly) no space left, or ENOSPC at any free space; never a stop or a
    timed-out collective, however full the disk."""
    from anchored_megatron.checkpoint.trainer_io import _disk_full

    assert _disk_full(error, free) is full
