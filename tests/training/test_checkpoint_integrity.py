"""Checkpoint integrity end to end: a damaged or incomplete checkpoint is refused with its name,
the file and the one command that points ``latest`` back; that command works; the reference a
run was trained against is recorded, and another one is refused unless asked for."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import run_config
from tests.training.test_trainer import _losses, train_rank

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory, ranks):
    """One 4-step run with checkpoints at steps 2 and 4 (both inside the first outer iteration)."""
    out = tmp_path_factory.mktemp("integrity")
    ranks(train_rank, 1, run_config(tiny_run, out, train__max_steps=4, train__save_interval=2))
    return out


def _copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _checkpoint(run, step):
    return run / "checkpoints" / f"iter_{step:07d}"


def _optimizer_item(path):
    """(file, offset, length) of an optimizer tensor's bytes inside the .distcp shards."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(path)).read_metadata().storage_data
    index = next(i for i in storage if i.fqn.startswith("optimizer.state.exp_avg_sq."))
    return storage[index].relative_path, storage[index].offset, storage[index].length


def _flip_bit(file, offset):
    with open(file, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x10]))


def _common_state_file(checkpoint) -> str:
    """The file the non-tensor state is read from: common.pt up to megatron-core 0.18; from 0.19
    it is stored in the torch_dist files, through their .metadata."""
    return "common.pt" if (checkpoint / "common.pt").exists() else ".metadata"


def _last_shard(checkpoint) -> str:
    """The last .distcp file (0.16 - 0.17 write two per rank, 0.18+ one)."""
    return sorted(p.name for p in checkpoint.glob("__0_*.distcp"))[-1]


def _common_state(checkpoint) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(checkpoint))


def _truncate(file):
    with open(file, "r+b") as fh:
        fh.truncate(os.path.getsize(file) // 2)


def _repoint_command(run, step):
    return f"anchored-checkpoint use {run / 'checkpoints'} {step}"


@pytest.mark.distributed
def test_bit_flip_in_optimizer_shard_refuses_resume(tiny_run, trained, tmp_path, ranks):
    from anchored_megatron.platform import RankFailure

    run = _copy_run(trained, tmp_path)
    shard, offset, length = _optimizer_item(_checkpoint(run, 4))
    _flip_bit(_checkpoint(run, 4) / shard, offset + length // 2)
    with pytest.raises(RankFailure) as info:
        ranks(train_rank, 1, run_config(tiny_run, run, train__max_steps=6, train__save_interval=2))
    report = str(info.value)
    assert f"checkpoint {_checkpoint(run, 4)}: {shard}: content differs from its xxh3_128 checksum in manifest.json" in report
    assert _repoint_command(run, 2) in report


@pytest.mark.distributed
def test_deleted_rank_state_refuses_resume(tiny_run, trained, tmp_path, ranks):
    from anchored_megatron.platform import RankFailure

    run = _copy_run(trained, tmp_path)
    os.remove(_checkpoint(run, 4) / "rank_state" / "rank_00000.pt")
    with pytest.raises(RankFailure) as info:
        ranks(train_rank, 1, run_config(tiny_run, run, train__max_steps=6, train__save_interval=2))
    report = str(info.value)
    assert f"checkpoint {_checkpoint(run, 4)}: rank_state/rank_00000.pt: missing" in report
    assert _repoint_command(run, 2) in report


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: _truncate(c / _last_shard(c)), r"__0_\d.distcp: \d+ bytes, manifest.json says \d+"),
        (lambda c: os.remove(c / _common_state_file(c)), r"(common.pt|\.metadata): missing"),
        (lambda c: _truncate(c / "rank_state" / "rank_00000.pt"), r"rank_state/rank_00000.pt: \d+ bytes, manifest.json says \d+"),
        (lambda c: (c / "notes.txt").write_text("x"), r"notes.txt: not in manifest.json \(a file the save did not write\)"),
        (lambda c: (c / "manifest.json").write_text("{"), r"manifest.json: unreadable \(JSONDecodeError"),
        (lambda c: os.remove(c / "manifest.json"), r"manifest.json: missing \(the save wrote one\)"),
    ],
    ids=["truncated-distcp", "deleted-common", "truncated-rank-state", "extra-file", "broken-manifest", "deleted-manifest"],
)
def test_damaged_checkpoint_is_named_with_the_repoint_command(trained, tmp_path, damage, problem):
    import re

    from anchored_megatron.checkpoint.trainer_io import CheckpointError, verify_checkpoint

    run = _copy_run(trained, tmp_path)
    damage(_checkpoint(run, 4))
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(_checkpoint(run, 4)))
    first, advice = str(info.value).splitlines()
    assert re.fullmatch(f"checkpoint {re.escape(str(_checkpoint(run, 4)))}: {problem}.*", first), first
    assert advice == f"To resume from the previous checkpoint, point 'latest' at it: {_repoint_command(run, 2)}"


@pytest.fixture
def before_manifests_format(trained):
    from anchored_megatron.checkpoint.mcore_format import reads_embedded_common_state

    if not (_checkpoint(trained, 4) / "common.pt").exists():
        assert reads_embedded_common_state()
        pytest.skip("checkpoints from before manifests have the common.pt layout of megatron-core <= 0.18: "
                    "this project wrote none in the 0.19 format")


def _as_written_before_manifests(checkpoint):
    """What an older version saved: no manifest.json, and no marker in common.pt saying there was one."""
    os.remove(checkpoint / "manifest.json")
    common = torch.load(checkpoint / "common.pt", weights_only=True)
    del common["manifest_format"]
    torch.save(common, checkpoint / "common.pt")


def load_without_manifest_rank(cfg_dict, cases):
    """Load each checkpoint directory of ``cases`` (manifest removed) into a built trainer."""
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.checkpoint import trainer_io as ckpt
    from anchored_megatron.training.trainer import Trainer

    trainer = Trainer(build(RunConfig, cfg_dict))
    trainer.setup()
    outcomes = {}
    for name, path in cases.items():
        lines = []
        try:
            ckpt.load_checkpoint(path, trainer.wrapped, trainer.optimizer, rank_state_loader=lambda state, common: None, message=lines.append)
            outcomes[name] = {"error": None, "lines": lines}
        except ckpt.CheckpointError as exc:
            outcomes[name] = {"error": str(exc), "lines": lines}
    return outcomes


@pytest.mark.distributed
def test_checkpoint_without_manifest_loads_with_one_line_and_read_failures_are_named(tiny_run, trained, tmp_path, ranks, before_manifests_format):
    """Checkpoints written before manifests: loaded unverified (one line says so); a damaged file
    still fails with the checkpoint, the file and the repoint command, not a bare EOFError."""
    cases = {}
    for name, damage in [
        ("intact", lambda c: None),
        ("truncated-distcp", lambda c: _truncate(c / "__0_0.distcp")),
        ("deleted-common", lambda c: os.remove(c / "common.pt")),
        ("truncated-rank-state", lambda c: _truncate(c / "rank_state" / "rank_00000.pt")),
    ]:
        run = _copy_run(trained, tmp_path / name)
        _as_written_before_manifests(_checkpoint(run, 4))
        damage(_checkpoint(run, 4))
        cases[name] = (run, str(_checkpoint(run, 4)))
    outcomes = ranks(load_without_manifest_rank, 1, run_config(tiny_run, tmp_path / "loader"), {k: v[1] for k, v in cases.items()})[0]
    for name, (run, path) in cases.items():
        assert outcomes[name]["lines"] == [f"{path}: no manifest.json (written before manifests): its files cannot be verified"], name
    assert outcomes["intact"]["error"] is None
    expected = {
        "truncated-distcp": "tensor shards (*.distcp, .metadata): cannot be read",
        "deleted-common": "common.pt: cannot be read",
        "truncated-rank-state": "rank_state/rank_00000.pt: cannot be read",
    }
    for name, what in expected.items():
        run, path = cases[name]
        first, advice = outcomes[name]["error"].splitlines()
        assert first.startswith(f"checkpoint {path}: {what} ("), (name, first)
        assert advice.endswith(_repoint_command(run, 2)), (name, advice)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "anchored_megatron.checkpoint.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.distributed
def test_cli_repoints_latest_and_the_run_resumes_from_there(tiny_run, trained, tmp_path, ranks):
    run = _copy_run(trained, tmp_path)
    original = _losses(run)
    _truncate(_checkpoint(run, 4) / "__0_0.distcp")
    listing = _cli("list", run)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1:] == [
        "  iter_0000002            verified",
        f"  iter_0000004  (latest)  DAMAGED: __0_0.distcp: {os.path.getsize(_checkpoint(run, 4) / '__0_0.distcp')} bytes, "
        f"manifest.json says {os.path.getsize(_checkpoint(trained, 4) / '__0_0.distcp')}",
    ]
    refused = _cli("use", run, 4)
    assert refused.returncode == 1 and "__0_0.distcp" in refused.stderr
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000004\n"
    used = _cli("use", run, 2)
    assert used.returncode == 0, used.stderr
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000002\n"
    ranks(train_rank, 1, run_config(tiny_run, run, train__max_steps=4, train__save_interval=2))
    # metrics.jsonl drops the records after the resumed step, so it holds steps 1-4 once each; the
    # uninterrupted run is the reference: steps 3 and 4 again, bit for bit (weights, optimizer,
    # data position and RNG streams all came back from iter_0000002).
    assert [(r["step"], r["loss"]) for r in _losses(run)] == [(r["step"], r["loss"]) for r in original]


@pytest.mark.distributed
def test_resume_with_another_reference_is_refused_unless_allowed(tiny_run, trained, tmp_path, ranks):
    from anchored_megatron.platform import RankFailure

    run = _copy_run(trained, tmp_path)
    teacher, base = os.path.realpath(tiny_run["teacher"]), os.path.realpath(tiny_run["base"])
    cfg = run_config(tiny_run, run, train__max_steps=5, train__save_interval=5, reference__checkpoint=tiny_run["base"])
    with pytest.raises(RankFailure) as info:
        ranks(train_rank, 1, cfg)
    report = str(info.value)
    assert "reference.checkpoint: the run in" in report and "cannot resume with another reference" in report
    assert f"it was trained against {teacher} (metadata digest " in report and f"the config now gives {base} (metadata digest " in report
    assert "train.allow_reference_change=true" in report

    cfg["train"]["allow_reference_change"] = True
    ranks(train_rank, 1, cfg)
    assert [r["step"] for r in _losses(run)][-1] == 5
    common = _common_state(_checkpoint(run, 5))
    assert common["trainer"]["reference"]["path"] == base


def test_manifest_lists_every_file_with_its_size_and_checksum(trained):
    """Against an independent scan: xxhash over each file's bytes, read whole."""
    import xxhash

    checkpoint = _checkpoint(trained, 4)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    on_disk = {
        os.path.relpath(os.path.join(parent, f), checkpoint): os.path.join(parent, f)
        for parent, _, files in os.walk(checkpoint) for f in files if f != "manifest.json"
    }
    assert set(manifest["files"]) == set(on_disk) >= {_common_state_file(checkpoint), "metadata.json", ".metadata", "model_config.yaml", "rank_state/rank_00000.pt"}
    for name, path in on_disk.items():
        data = open(path, "rb").read()
        assert manifest["files"][name] == {"size": len(data), "digest": xxhash.xxh3_128_hexdigest(data)}, name


def disk_full_rank(cfg_dict, full_at_step):
    """Train; every write of the save at ``full_at_step`` fails with ENOSPC, as on a full disk."""
    import errno
    import functools

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from anchored_megatron.training import trainer as trainer_module

    # Megatron's torch_dist writer holds its own reference to torch's per-item writer.
    original = filesystem_async._write_item
    progress = {"step": None}

    @functools.wraps(original)  # Megatron's async writer reads the signature to call it
    def full_disk(*args, **kwargs):
        if progress["step"] == full_at_step:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    filesystem_async._write_item = full_disk
    save = trainer_module.Trainer._save

    def tracking_save(self, p, *rest):
        progress["step"] = p.step
        return save(self, p, *rest)

    trainer_module.Trainer._save = tracking_save
    return train_error(cfg_dict)


def train_error(cfg_dict) -> str | None:
    """``train_rank``'s failure as "Type: message" (None when it trains to the end)."""
    try:
        train_rank(cfg_dict)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.distributed
def test_a_full_disk_during_a_save_says_so_and_keeps_latest(tiny_run, tmp_path, ranks):
    out = tmp_path / "run"
    error = ranks(disk_full_rank, 1, run_config(tiny_run, out, train__max_steps=4, train__save_interval=2), 4)[0]
    root = out / "checkpoints"
    assert re.fullmatch(
        re.escape(f"CheckpointError: saving checkpoint iter_0000004 into {root}: the disk is full (No space left on device; ")
        + r"\d+\.\d MiB were free there when it failed\)\. "
        + re.escape("'latest' still names the last complete checkpoint, iter_0000002: free space on that filesystem and relaunch "
                    "the same command to resume."),
        error,
    ), error
    assert (root / "latest").read_text().strip() == "iter_0000002"
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest"]  # the half-written save is gone
