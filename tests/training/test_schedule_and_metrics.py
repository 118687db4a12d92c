"""The learning rate every update uses, against the schedule written out plainly; metrics.jsonl
after a run that died between checkpoints and was resumed; the metrics each objective records."""

import json
import math
import os

import pytest

from anchored_megatron.config import RunConfig, build
from tests.training.conftest import run_config

STEPS_PER_EPOCH = 8  # 64 records packed into 32 sequences, 4 per step


def expected_lr(update, steps, lr, warmup_fraction, style):
    """LR of update ``update`` (1-based) of ``steps``: linear warm-up from 0 over W updates, then
    the decay from lr that would reach 0 at update steps + 1 (so the last update still moves)."""
    warmup = round(warmup_fraction * steps)
    if update <= warmup:
        return lr * update / warmup
    progress = (update - warmup) / (steps + 1 - warmup)
    return lr * (0.5 * (1.0 + math.cos(math.pi * progress)) if style == "cosine" else 1.0 - progress)


def logged_rank(cfg_dict, attempt, die_after_step=None):
    """Train; tag each record with ``attempt`` and note the LR the optimizer holds when each update
    runs; with ``die_after_step`` the process dies right after that step's record is written."""
    from anchored_megatron.training import metrics_log
    from anchored_megatron.training.trainer import Trainer

    original_log = metrics_log.MetricsLog.log

    def log(self, record, line):
        original_log(self, dict(record, attempt=attempt), line)
        if record["step"] == die_after_step:
            os._exit(17)

    metrics_log.MetricsLog.log = log
    used = []

    class Probe(Trainer):
        def _build_roles(self):
            super()._build_roles()
            step = self.optimizer.step

            def recording_step():
                used.append(self.optimizer.param_groups[0]["lr"])
                return step()

            self.optimizer.step = recording_step

    trainer = Probe(build(RunConfig, cfg_dict))
    trainer.setup()
    trainer.run()
    return used


def _records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _tensorboard_steps(output_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(output_dir, "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else None


@pytest.fixture(scope="module")
def resumed_anchored_run(tiny_run, tmp_path_factory, ranks):
    """Cosine to min_lr 0 over 16 steps; checkpoints every 3 steps; the first attempt dies after
    logging step 5 (two steps past its checkpoint), the second resumes from step 3."""
    out = tmp_path_factory.mktemp("resumed")
    cfg = run_config(tiny_run, out, optim__lr_schedule="cosine", optim__min_lr=0.0, optim__warmup_fraction=0.25,
                     train__save_interval=3, train__tensorboard=True)
    from anchored_megatron.platform import RankFailure

    with pytest.raises(RankFailure, match="exit code 17"):
        ranks(logged_rank, 1, cfg, 1, 5)
    first = _records(out)
    used = ranks(logged_rank, 1, cfg, 2)[0]
    return {"out": out, "first_attempt": first, "records": _records(out), "used": used}


@pytest.fixture(scope="module")
def reset_sft_run(tiny_run, tmp_path_factory, ranks):
    """sft, linear decay, a fresh optimizer and schedule at each of the 2 outer iterations."""
    out = tmp_path_factory.mktemp("reset")
    cfg = run_config(tiny_run, out, anchor__objective="sft", anchor__reset_optimizer_per_iteration=True,
                     optim__lr_schedule="linear", optim__min_lr=0.0, optim__warmup_fraction=0.25, train__tensorboard=True)
    del cfg["anchor"]["alpha"], cfg["reference"]  # sft has neither
    used = ranks(logged_rank, 1, cfg, 1)[0]
    return {"out": out, "records": _records(out), "used": used}


@pytest.mark.distributed
def test_every_update_uses_the_scheduled_lr_through_a_resume(resumed_anchored_run):
    records = resumed_anchored_run["records"]
    steps = 2 * STEPS_PER_EPOCH
    expected = [expected_lr(k, steps, 3e-3, 0.25, "cosine") for k in range(1, steps + 1)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)
    assert records[-1]["lr"] > 0
    # The LR recorded is the one the optimizer held when the resumed run's updates (steps 4-16) ran.
    assert resumed_anchored_run["used"] == [r["lr"] for r in records[3:]]


@pytest.mark.distributed
def test_reset_per_iteration_restarts_the_schedule_each_iteration(reset_sft_run):
    records = reset_sft_run["records"]
    per_stage = [expected_lr(k, STEPS_PER_EPOCH, 3e-3, 0.25, "linear") for k in range(1, STEPS_PER_EPOCH + 1)]
    assert [r["lr"] for r in records] == pytest.approx(per_stage * 2, rel=1e-12, abs=0)
    assert reset_sft_run["used"] == [r["lr"] for r in records]
    assert min(r["lr"] for r in records) > 0


@pytest.mark.distributed
def test_resumed_run_keeps_one_record_per_step(resumed_anchored_run):
    first, records = resumed_anchored_run["first_attempt"], resumed_anchored_run["records"]
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records] == list(range(1, 17))
    # Up to the checkpoint the first attempt's records stay as they were; after it, the resumed run's.
    assert records[:3] == first[:3]
    assert [r["attempt"] for r in records] == [1] * 3 + [2] * 13
    assert _tensorboard_steps(resumed_anchored_run["out"], "loss") == list(range(1, 17))


COMMON = {"step", "iteration", "loss", "response_tokens", "grad_norm", "finite", "lr", "step_time_s", "tokens_per_s", "attempt"}


@pytest.mark.distributed
def test_each_objective_records_only_the_metrics_it_has(resumed_anchored_run, reset_sft_run):
    anchored = COMMON | {"alpha", "kl_step", "kl_bound", "kl_reference", "entropy"}
    assert all(set(r) == anchored for r in resumed_anchored_run["records"])
    assert all(set(r) == COMMON for r in reset_sft_run["records"])
    assert all(r["loss"] is not None for r in reset_sft_run["records"])
    for tag in ("alpha", "kl_step", "kl_reference"):
        assert _tensorboard_steps(reset_sft_run["out"], tag) is None
    assert _tensorboard_steps(reset_sft_run["out"], "loss") == list(range(1, 17))


def changed_lr_rank(cfg_dict):
    from anchored_megatron.config import ConfigError

    try:
        logged_rank(cfg_dict, 3)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.distributed
def test_a_resume_with_another_lr_is_refused_not_ignored(resumed_anchored_run, tiny_run, tmp_path, ranks):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(resumed_anchored_run["out"], run)
    cfg = run_config(tiny_run, run, optim__lr=1e-3, optim__lr_schedule="cosine", optim__min_lr=0.0, optim__warmup_fraction=0.25,
                     train__save_interval=3, train__tensorboard=True)
    message = ranks(changed_lr_rank, 1, cfg)[0]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert message == (
        f"optim.lr: gives 0.001, but {run / 'checkpoints' / latest} was trained with 0.003; a resumed run keeps the schedule it "
        "started with: set optim.lr back, or start a new run (another output_dir) from this checkpoint as student.checkpoint"
    )


@pytest.fixture(scope="module")
def resumed_taid_run(tiny_run, tmp_path_factory, ranks):
    """taid from t = 0.2 to 0.8 over 16 steps; the first attempt dies two steps past its step-5
    checkpoint, the second resumes there."""
    out = tmp_path_factory.mktemp("taid")
    cfg = run_config(tiny_run, out, anchor__objective="taid", anchor__alpha=0.2, anchor__alpha_end=0.8, train__save_interval=5)
    from anchored_megatron.platform import RankFailure

    with pytest.raises(RankFailure, match="exit code 17"):
        ranks(logged_rank, 1, cfg, 1, 7)
    ranks(logged_rank, 1, cfg, 2)
    return _records(out)


@pytest.mark.distributed
def test_taid_t_rises_linearly_with_the_step_through_a_resume(resumed_taid_run):
    # Update n (1-based) of 16 uses t = 0.2 + 0.6 (n - 1) / 15; the resumed attempt redoes 6 and 7.
    records = {r["step"]: r for r in resumed_taid_run}
    assert sorted(records) == list(range(1, 17))
    for step, record in records.items():
        assert record["alpha"] == pytest.approx(0.2 + 0.6 * (step - 1) / 15, abs=1e-12), step
    assert set(records[16]) == COMMON | {"alpha", "kl_step", "kl_bound", "kl_reference", "entropy"}


def objective_records_rank(cfg_dict):
    from anchored_megatron.training.trainer import Trainer

    trainer = Trainer(build(RunConfig, cfg_dict))
    trainer.setup()
    trainer.run()
    return _records(cfg_dict["output_dir"])


@pytest.mark.distributed
def test_dft_asft_and_the_base_kl_term_train_and_record_their_metrics(tiny_run, tmp_path, ranks):
    short = dict(anchor__outer_iterations=1, train__max_steps=3)
    dft = run_config(tiny_run, tmp_path / "dft", anchor__objective="dft", **short)
    del dft["anchor"]["alpha"], dft["reference"]  # dft has neither
    asft = run_config(tiny_run, tmp_path / "asft", anchor__objective="asft", anchor__kl_weight=0.3, reference__checkpoint=tiny_run["base"], **short)
    del asft["anchor"]["alpha"]
    anchored = run_config(tiny_run, tmp_path / "anchored", **short)
    base_kl = run_config(tiny_run, tmp_path / "base_kl", anchor__base_kl_weight=0.5, **short)
    records = {name: ranks(objective_records_rank, 1, cfg)[0] for name, cfg in
               (("dft", dft), ("asft", asft), ("anchored", anchored), ("base_kl", base_kl))}
    common, kl = COMMON - {"attempt"}, {"kl_step", "kl_bound", "kl_reference", "entropy"}
    assert [set(r) for r in records["dft"]] == [common] * 3
    assert [set(r) for r in records["asft"]] == [common | kl] * 3
    assert [set(r) for r in records["base_kl"]] == [common | kl | {"alpha"}] * 3
    # The same first batch from the base: KL to the base is 0 before the first update, so asft's
    # loss is dft's and the base-KL run's is the anchored run's.
    assert records["asft"][0]["kl_reference"] == pytest.approx(0.0, abs=1e-6)
    assert records["asft"][0]["loss"] == pytest.approx(records["dft"][0]["loss"], rel=1e-6)
    assert records["base_kl"][0]["loss"] == pytest.approx(records["anchored"][0]["loss"], rel=1e-6)
    assert all(math.isfinite(r["loss"]) for rs in records.values() for r in rs)


@pytest.fixture(scope="module")
def replay_runs(tiny_run, tmp_path_factory, ranks):
    """anchored with replay data at 0.5 of every step (4 gold + 4 replay microbatches), 2
    iterations of 8 steps stopped after step 10; once straight through, once dying after step 5
    and resuming at step 4."""
    import json as json_module
    import random

    root = tmp_path_factory.mktemp("replay")
    rng = random.Random(1)
    words = "red blue green one two three plus minus".split()
    replay = root / "replay.jsonl"
    replay.write_text("".join(json_module.dumps({"prompt": " ".join(rng.choices(words, k=3)), "response": " ".join(rng.choices(words, k=4))}) + "\n"
                              for _ in range(40)))
    runs = {}
    for name in ("straight", "resumed"):
        cfg = run_config(tiny_run, root / name, data__replay_paths=[str(replay)], data__replay_fraction=0.5, train__save_interval=4,
                         train__max_steps=10)
        if name == "resumed":
            from anchored_megatron.platform import RankFailure

            with pytest.raises(RankFailure, match="exit code 17"):
                ranks(logged_rank, 1, cfg, 1, 5)
        ranks(logged_rank, 1, cfg, 2)
        runs[name] = {r["step"]: r for r in _records(root / name)}
    return runs


@pytest.mark.distributed
def test_replay_trust_region_is_logged_and_resumes_exactly(replay_runs):
    straight, resumed = replay_runs["straight"], replay_runs["resumed"]
    assert sorted(straight) == sorted(resumed) == list(range(1, 11))
    # Step 1 of each iteration: the snapshot is the student, so KL(p_snapshot || p_theta) = 0.
    for step in (1, 9):
        assert straight[step]["replay_loss"] == pytest.approx(0.0, abs=1e-6)
    assert all(straight[s]["replay_loss"] > 1e-6 for s in (2, 3, 8, 10))
    assert all(r["replay_tokens"] > 0 for r in straight.values())
    # The resumed run saw the same gold and replay microbatches: bit-identical losses.
    for step in range(1, 11):
        assert (resumed[step]["loss"], resumed[step]["replay_loss"]) == (straight[step]["loss"], straight[step]["replay_loss"]), step
