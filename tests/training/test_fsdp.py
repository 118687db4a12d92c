"""parallel.fsdp end to end against Megatron DDP (an independent code path): the same anchored
run (a snapshot refresh at step 4) at TP=1 x DP=2 and TP=2 x DP=2, the frozen roles' measured
parameter storage, an exact FSDP resume, and checkpoints moving between DDP and FSDP runs and DP sizes."""

import os
import shutil

import pytest
import torch

from anchored_megatron.config import RunConfig, build
from tests.training.conftest import run_config

# 32 packed sequences / 8 per step: 4 steps per outer iteration, so step 5 runs against a refreshed snapshot.
RUN = dict(train__global_batch_size=8, train__save_interval=3, train__keep_checkpoints=3, model__fused_output_loss=False)


def probed_rank(cfg_dict):
    """Train; return the per-step losses, the student's whole weights at the end and (FSDP) the
    frozen roles' resident parameter bytes after a step next to their whole size."""
    from anchored_megatron.models.layout import unwrap
    from anchored_megatron.training import sharding
    from anchored_megatron.training.trainer import Trainer

    seen = {"resident": [], "whole": None}

    class Probed(Trainer):
        def _train_step(self, forward_step):
            record = super()._train_step(forward_step)
            if self.cfg.parallel.fsdp:
                seen["resident"].append([sharding.resident_parameter_bytes(role) for role in (self.reference, self.snapshot)])
                if seen["whole"] is None:
                    with sharding.gathered_weights(self.snapshot):
                        seen["whole"] = sum(p.numel() * p.element_size() for p in unwrap(self.snapshot[0]).parameters())
            return record

    trainer = Probed(build(RunConfig, cfg_dict))
    trainer.setup()
    trainer.run()
    context = sharding.gathered_weights(trainer.wrapped) if trainer.cfg.parallel.fsdp else _nothing()
    with context:
        weights = {n: p.detach().clone() for n, p in unwrap(trainer.wrapped[0]).named_parameters()}
    return {"weights": weights, **seen}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _metrics(output_dir):
    import json

    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _same_losses(a, b, tolerance):
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= tolerance, (x["step"], x["loss"], y["loss"])


def _same_run(a_dir, b_dir, a_ranks, b_ranks, tolerance):
    a, b = _metrics(a_dir), _metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 5
    for x, y in zip(a, b):
        for name in ("loss", "kl_step", "kl_reference"):
            assert abs(x[name] - y[name]) <= tolerance, (x["step"], name, x[name], y[name])
    for x, y in zip(a_ranks, b_ranks):
        assert x["weights"].keys() == y["weights"].keys()
        for name in x["weights"]:
            assert torch.allclose(x["weights"][name], y["weights"][name], rtol=0, atol=tolerance), name


@pytest.fixture(scope="module")
def tp1_runs(tiny_run, tmp_path_factory, ranks):
    dirs = {kind: tmp_path_factory.mktemp(f"tp1_{kind}") for kind in ("ddp", "fsdp")}
    results = {kind: ranks(probed_rank, 2, run_config(tiny_run, dirs[kind], train__max_steps=6, parallel__fsdp=kind == "fsdp", **RUN))
               for kind in dirs}
    return dirs, results


@pytest.mark.distributed
def test_fsdp_tp1_dp2_trains_like_ddp_across_a_snapshot_refresh(tp1_runs):
    dirs, results = tp1_runs
    _same_run(dirs["fsdp"], dirs["ddp"], results["fsdp"], results["ddp"], 1e-5)


@pytest.mark.distributed
def test_fsdp_frozen_roles_hold_half_their_weights_per_rank_at_dp2(tp1_runs):
    _, results = tp1_runs
    for rank in results["fsdp"]:
        whole = rank["whole"]
        for reference, snapshot in rank["resident"]:
            for resident in (reference, snapshot):
                # One flat buffer shard: half of every weight, plus a little bucket padding.
                assert whole / 2 <= resident <= whole / 2 * 1.05, (resident, whole)


def _resume_from_step_3(tiny_run, source, tmp_path, ranks, world, fsdp):
    """A copy of ``source``'s checkpoints resumed at step 3 to step 6; its metrics and ``source``'s steps 4-6."""
    for sub in ("checkpoints", "snapshots"):
        shutil.copytree(source / sub, tmp_path / sub)
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000003\n")
    ranks(probed_rank, world, run_config(tiny_run, tmp_path, train__max_steps=6, parallel__fsdp=fsdp, **RUN))
    resumed = _metrics(tmp_path)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    return resumed, _metrics(source)[3:]


@pytest.mark.distributed
def test_fsdp_resume_reproduces_the_uninterrupted_run_exactly(tiny_run, tp1_runs, tmp_path, ranks):
    dirs, _ = tp1_runs
    resumed, uninterrupted = _resume_from_step_3(tiny_run, dirs["fsdp"], tmp_path, ranks, world=2, fsdp=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]


@pytest.mark.distributed
def test_a_ddp_checkpoint_resumes_under_fsdp_like_the_ddp_run(tiny_run, tp1_runs, tmp_path, ranks):
    dirs, _ = tp1_runs
    resumed, ddp = _resume_from_step_3(tiny_run, dirs["ddp"], tmp_path, ranks, world=2, fsdp=True)
    _same_losses(resumed, ddp, 1e-5)


@pytest.mark.distributed
def test_an_fsdp_checkpoint_resumes_under_ddp_at_another_dp_size(tiny_run, tp1_runs, tmp_path, ranks):
    dirs, _ = tp1_runs
    resumed, fsdp = _resume_from_step_3(tiny_run, dirs["fsdp"], tmp_path, ranks, world=1, fsdp=False)
    _same_losses(resumed, fsdp, 1e-5)


@pytest.mark.distributed
def test_fsdp_from_the_cli_under_torchrun_trains_like_ddp(tiny_run, tp1_runs, tmp_path):
    import subprocess
    import sys

    from tests.training.cli import ROOT, cli_env, write_config

    dirs, _ = tp1_runs
    config = write_config(tmp_path / "run.yaml", run_config(tiny_run, tmp_path / "out", train__max_steps=6, parallel__fsdp=True, **RUN))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "anchored_megatron.train", "--config", config],
                            capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cli, ddp = _metrics(tmp_path / "out"), _metrics(dirs["ddp"])
    assert [r["step"] for r in cli] == [r["step"] for r in ddp] == list(range(1, 7))
    _same_losses(cli, ddp, 1e-4)


@pytest.mark.distributed
def test_fsdp_tp2_dp2_trains_like_ddp_across_a_snapshot_refresh(tiny_run, tmp_path_factory, ranks):
    dirs = {kind: tmp_path_factory.mktemp(f"tp2_{kind}") for kind in ("ddp", "fsdp")}
    results = {
        kind: ranks(probed_rank, 4, run_config(tiny_run, dirs[kind], train__max_steps=5, parallel__tp=2, parallel__fsdp=kind == "fsdp", **RUN))
        for kind in dirs
    }
    _same_run(dirs["fsdp"], dirs["ddp"], results["fsdp"], results["ddp"], 1e-5)
