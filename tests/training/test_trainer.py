"""The trainer end to end on CPU: layout invariance, exact resume, snapshot/reference roles,
crash-safe checkpoints and config refusals."""

import json
import os

import pytest
import torch

from anchored_megatron.config import ConfigError, RunConfig, build
from tests.training.conftest import run_config


def _losses(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as fh:
        return [dict(json.loads(line), _metrics_path=path) for line in fh]


def train_rank(cfg_dict):
    from anchored_megatron.training.trainer import train

    train(build(RunConfig, cfg_dict))
    return True


def probed_train_rank(cfg_dict):
    from anchored_megatron.training.trainer import Trainer
    from tests.full_weights import weights_equal

    observations = {"boundary_equal": [], "inside_equal": []}

    class ProbedTrainer(Trainer):
        def _load_initial_weights(self):
            progress = super()._load_initial_weights()
            self.reference_before = [{n: p.clone() for n, p in c.named_parameters()} for c in self.reference]
            return progress

        def _begin_iteration(self, iteration, progress):
            super()._begin_iteration(iteration, progress)
            observations["boundary_equal"].append(weights_equal(self.student, self.snapshot))

        def _train_step(self, forward_step):
            record = super()._train_step(forward_step)
            observations["inside_equal"].append(weights_equal(self.student, self.snapshot))
            return record

    trainer = ProbedTrainer(build(RunConfig, cfg_dict))
    trainer.setup()
    trainer.run()
    observations["reference_identical"] = all(
        torch.equal(before[n], p) for before, chunk in zip(trainer.reference_before, trainer.reference) for n, p in chunk.named_parameters()
    )
    observations["reference_frozen"] = all(not p.requires_grad for c in trainer.reference for p in c.parameters())
    observations["steps_per_iteration"] = trainer.steps_per_iteration
    return observations


def crashing_save_rank(cfg_dict, crash_at_step):
    """Train; the save at ``crash_at_step`` dies after writing its files, before publishing them."""
    from anchored_megatron.checkpoint import trainer_io as checkpoint

    original = checkpoint.write_atomically

    def dying_write(path, text):
        if text.strip() == checkpoint.checkpoint_name(crash_at_step):
            os._exit(17)
        original(path, text)

    checkpoint.write_atomically = dying_write
    return train_rank(cfg_dict)


@pytest.fixture(scope="module", autouse=True)
def compiled_loss_kernels():
    """The trainer end to end as users run it: with the loss's compiled kernels (tests/conftest.py
    switches them off elsewhere)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANCHORED_FUSED_LOSS", "1")
        yield


@pytest.fixture(scope="module")
def single_process_run(tiny_run, tmp_path_factory, ranks):
    out = tmp_path_factory.mktemp("tp1")
    ranks(train_rank, 1, run_config(tiny_run, out, train__save_interval=3, train__keep_checkpoints=10))
    return _losses(out)


@pytest.mark.distributed
def test_anchored_snapshot_tp2_pp2_matches_single_process(tiny_run, single_process_run, tmp_path, ranks):
    ranks(train_rank, 4, run_config(tiny_run, tmp_path, parallel__tp=2, parallel__pp=2))
    parallel = _losses(tmp_path)
    assert [r["step"] for r in parallel] == [r["step"] for r in single_process_run]
    assert {r["iteration"] for r in parallel} == {0, 1}
    for a, b in zip(parallel, single_process_run):
        for name in ("loss", "kl_step", "kl_reference"):
            assert abs(a[name] - b[name]) <= 1e-4, (a["step"], name, a[name], b[name])


@pytest.mark.distributed
def test_resume_mid_iteration_reproduces_losses_exactly(tiny_run, single_process_run, tmp_path, ranks):
    steps = len(single_process_run)
    per_iteration = steps // 2
    stop = per_iteration + 2  # inside the second outer iteration: the snapshot must come from disk
    cfg = run_config(tiny_run, tmp_path, train__save_interval=3, train__max_steps=stop)
    ranks(train_rank, 1, cfg)
    cfg["train"]["max_steps"] = None
    ranks(train_rank, 1, cfg)
    records = _losses(tmp_path)
    resumed = {r["step"]: r["loss"] for r in records[stop:]}
    assert sorted(resumed) == list(range(stop + 1, steps + 1))
    for r in single_process_run:
        if r["step"] in resumed:
            assert resumed[r["step"]] == r["loss"], r["step"]


@pytest.mark.distributed
def test_resume_at_another_layout_reshards(tiny_run, single_process_run, tmp_path_factory, tmp_path, ranks):
    import shutil

    source = os.path.dirname(single_process_run[0]["_metrics_path"])
    for sub in ("checkpoints", "snapshots"):
        shutil.copytree(os.path.join(source, sub), tmp_path / sub)
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000003\n")  # inside the first outer iteration
    ranks(train_rank, 2, run_config(tiny_run, tmp_path, parallel__tp=2))
    resumed = _losses(tmp_path)
    assert [r["step"] for r in resumed] == [r["step"] for r in single_process_run[3:]]
    for a, b in zip(resumed, single_process_run[3:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])


@pytest.mark.distributed
def test_snapshot_tracks_boundaries_and_reference_stays_frozen(tiny_run, tmp_path, ranks):
    seen = ranks(probed_train_rank, 2, run_config(tiny_run, tmp_path, parallel__tp=2))[0]
    assert seen["boundary_equal"] == [True, True]
    assert not any(seen["inside_equal"])  # the student moves off the snapshot at every step
    assert len(seen["inside_equal"]) == 2 * seen["steps_per_iteration"]
    assert seen["reference_identical"] and seen["reference_frozen"]


@pytest.mark.distributed
def test_kill_during_save_keeps_previous_checkpoint(tiny_run, single_process_run, tmp_path, ranks):
    from anchored_megatron.platform import RankFailure
    from anchored_megatron.checkpoint.trainer_io import latest_checkpoint

    cfg = run_config(tiny_run, tmp_path, train__save_interval=2)
    with pytest.raises(RankFailure, match="exit code 17"):
        ranks(crashing_save_rank, 1, cfg, 4)
    root = os.path.join(tmp_path, "checkpoints")
    assert latest_checkpoint(root).endswith("iter_0000002")
    ranks(train_rank, 1, cfg)  # resumes from step 2
    records = _losses(tmp_path)
    assert [r["step"] for r in records] == [r["step"] for r in single_process_run]
    assert records[2]["loss"] == single_process_run[2]["loss"]


RANDOM_INIT = {"student__checkpoint": None, "reference__checkpoint": None}  # the model comes from the config alone


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ({"anchor__alpha": 1.5}, 1, "anchor.alpha: must be in [0, 1], got 1.5"),
        ({"parallel__tp": 3}, 3, "model.num_attention_heads: 4 is not divisible by parallel.tp=3"),
        ({"model__num_attention_heads": 8, "model__num_query_groups": 2, "parallel__tp": 4, **RANDOM_INIT}, 4,
         "model.num_query_groups: 2 is not divisible by parallel.tp=4"),
        ({"model__num_layers": 3, "parallel__pp": 2, **RANDOM_INIT}, 2, "model.num_layers: 3 is not divisible by parallel.pp"),
        ({"model__num_layers": 3}, 1, "model.num_layers: is 3, but the student checkpoint"),
        ({"train__global_batch_size": 6, "train__micro_batch_size": 4}, 1, "train.global_batch_size: 6 is not divisible by train.micro_batch_size"),
        ({"train__global_batch_size": 6}, 4, "train.global_batch_size: 6 is not divisible by train.micro_batch_size x data-parallel size = 1 x 4"),
        ({"anchor__objective": "dpo"}, 1, "anchor.objective: must be one of"),
        ({"train__log_interval": 0}, 1, "train.log_interval: must be an integer >= 1, got 0"),
        ({"parallel__pp": 2, "parallel__vpp": 2}, 2, "parallel.vpp: the interleaved pipeline schedule cannot carry the frozen roles"),
    ],
)
def test_config_refusals_name_the_key(tiny_run, tmp_path, monkeypatch, overrides, world, message):
    from anchored_megatron.training.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as info:
        Trainer(build(RunConfig, run_config(tiny_run, tmp_path, **overrides)))
    assert message in str(info.value)


def test_reference_with_another_vocabulary_is_refused(tiny_run, tmp_path, monkeypatch):
    import shutil

    import yaml

    from anchored_megatron.training.trainer import Trainer

    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_run["teacher"], other)
    config = yaml.safe_load((other / "model_config.yaml").read_text())
    config["vocab_size"] = 320
    (other / "model_config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"reference.checkpoint: vocab_size=320 differs from the student's 256"):
        Trainer(build(RunConfig, run_config(tiny_run, tmp_path / "out", reference__checkpoint=str(other))))


def nonfinite_rank(cfg_dict, bad_steps):
    """Poison the loss at ``bad_steps`` (1-based); record what each step did to the weights."""
    from anchored_megatron.training import forward_step
    from anchored_megatron.training.roles import unwrap
    from anchored_megatron.training.trainer import Trainer

    state = {"step": 0}
    original = forward_step.masked_loss

    def poisoned(*args, **kwargs):
        loss_sum, sums = original(*args, **kwargs)
        if state["step"] in bad_steps:
            poisoned_sums = sums.clone()
            poisoned_sums[:-1] = float("nan")  # the token count stays a count
            return loss_sum * float("nan"), poisoned_sums
        return loss_sum, sums

    forward_step.masked_loss = poisoned
    changed = {}

    class Probe(Trainer):
        def _train_step(self, step_fn):
            state["step"] += 1
            before = [p.detach().clone() for c in self.student for p in unwrap(c).parameters()]
            record = super()._train_step(step_fn)
            after = [p for c in self.student for p in unwrap(c).parameters()]
            changed[state["step"]] = any(not torch.equal(a, b) for a, b in zip(before, after))
            return record

    trainer = Probe(build(RunConfig, cfg_dict))
    trainer.setup()
    try:
        trainer.run()
        error = None
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        error = f"{type(exc).__name__}: {exc}"
    return {"changed": changed, "error": error}


@pytest.mark.distributed
def test_nonfinite_loss_skips_update_and_aborts_after_n_in_a_row(tiny_run, tmp_path, ranks):
    skipped = ranks(nonfinite_rank, 1, run_config(tiny_run, tmp_path / "one", train__max_steps=4, train__max_nonfinite_in_a_row=2), {2})[0]
    assert skipped["error"] is None
    assert skipped["changed"] == {1: True, 2: False, 3: True, 4: True}
    records = _losses(tmp_path / "one")
    assert [r["finite"] for r in records] == [True, False, True, True]
    aborted = ranks(nonfinite_rank, 1, run_config(tiny_run, tmp_path / "two", train__max_steps=6, train__max_nonfinite_in_a_row=2), {2, 3})[0]
    assert aborted["error"].startswith("NonFiniteLossError: loss was not finite for 2 steps in a row")
    assert max(aborted["changed"]) == 3


@pytest.mark.distributed
def test_bf16_training_follows_fp32(tiny_run, single_process_run, tmp_path, ranks):
    ranks(train_rank, 2, run_config(tiny_run, tmp_path, parallel__tp=2, model__params_dtype="bf16", train__max_steps=4))
    bf16 = _losses(tmp_path)
    assert len(bf16) == 4
    for a, b in zip(bf16, single_process_run):
        # bf16 weights and activations: the per-token loss agrees with fp32 to bf16 precision.
        assert abs(a["loss"] - b["loss"]) <= 0.05 * abs(b["loss"]) + 2e-3, (a["step"], a["loss"], b["loss"])
