"""One data-parallel rank with the distributed optimizer: the CPU shortcuts of
``platform.cpu_single_rank`` (the skipped one-rank collectives, clipping in place) leave training
bit for bit as Megatron's own path trains it."""

import io

import pytest
import torch

from tests.training.conftest import as_bytes, read_metrics, run_config

STEPS = 3


def _train_with_and_without(cases: dict):
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.models.layout import canonical_name
    from anchored_megatron.platform import cpu_single_rank
    from anchored_megatron.training.roles import unwrap
    from anchored_megatron.training.trainer import Trainer

    results = {}
    for name in ("shortcuts", "megatron"):
        if name == "megatron":
            cpu_single_rank.uninstall()
            cpu_single_rank.install = lambda: None  # this process only: initialize() must not put them back
        trainer = Trainer(build(RunConfig, cases[name]))
        trainer.setup()
        trainer.run()
        results[name] = {canonical_name(c, n): p.detach().clone() for c in trainer.student for n, p in unwrap(c).named_parameters()}
    return as_bytes(results)


@pytest.mark.distributed
def test_training_is_bit_identical_with_and_without_the_cpu_shortcuts(tiny_run, tmp_path, ranks):
    # clip_grad 0.05: every step clips (the tiny run's gradient norms are above 1).
    cases = {name: run_config(tiny_run, tmp_path / name, train__max_steps=STEPS, optim__clip_grad=0.05, optim__distributed_optimizer=True)
             for name in ("shortcuts", "megatron")}
    [blob] = ranks(_train_with_and_without, 1, cases)
    weights = torch.load(io.BytesIO(blob))
    losses = {name: [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)] for name in cases}
    assert len(losses["shortcuts"]) == STEPS and losses["shortcuts"] == losses["megatron"]
    assert all(r[1] > 0.05 for r in losses["megatron"])
    assert all(torch.equal(weights["shortcuts"][k], weights["megatron"][k]) for k in weights["megatron"])
