"""The drop-in's single-process pieces: the loss function's Megatron-LM report, batch forms,
role selection by objective and refusals."""

import pytest
import torch

from anchored_megatron.config import AnchorConfig, ConfigError
from anchored_megatron.integrations.megatron_lm import AnchoredLearning, anchored_loss_func, as_batch_dict
from anchored_megatron.training.objectives import iteration_loss
from tests.anchor.reference import reference_loss


def test_loss_func_returns_megatron_lm_sum_count_pairs_matching_float64():
    g = torch.Generator().manual_seed(0)
    b, s, v_padded, vocab = 2, 5, 48, 40
    student, reference, snapshot = (torch.randn(b, s, v_padded, generator=g) for _ in range(3))
    batch = {"labels": torch.randint(0, vocab, (b, s), generator=g), "loss_mask": (torch.rand(b, s, generator=g) < 0.6).float()}
    anchor = AnchorConfig(alpha=0.3, ce_weight=0.1)
    loss_sum, num_tokens, report = anchored_loss_func(batch, [reference, snapshot], iteration_loss(anchor, 0), vocab, student)
    expected, metrics = reference_loss(student, reference, snapshot, alpha=0.3, ce_weight=0.1, labels=batch["labels"], vocab_size=vocab)
    mask = batch["loss_mask"].double()
    assert num_tokens.item() == mask.sum().item()
    assert loss_sum.item() == pytest.approx((expected * mask).sum().item(), rel=1e-5)
    assert set(report) == {"lm loss", "kl_step", "kl_bound", "kl_reference", "entropy"}
    assert report["lm loss"].tolist() == pytest.approx([(expected * mask).sum().item(), mask.sum().item()], rel=1e-5)
    assert report["kl_step"][0].item() == pytest.approx((metrics["kl_step"] * mask).sum().item(), rel=1e-4)


def test_last_stage_without_labels_names_the_missing_fields():
    with pytest.raises(KeyError, match="labels"):
        anchored_loss_func({"loss_mask": torch.ones(1, 2), "labels": None}, [], iteration_loss(AnchorConfig(objective="sft"), 0), 8, torch.zeros(1, 2, 8))


def test_megatron_lm_batch_tuple_becomes_a_dict():
    batch = as_batch_dict(("t", "l", "m", "a", "p"))
    assert batch == {"tokens": "t", "labels": "l", "loss_mask": "m", "attention_mask": "a", "position_ids": "p"}


@pytest.mark.parametrize("objective,source,roles", [
    ("anchored", "snapshot", ("reference", "snapshot")), ("anchored", "live", ("reference",)), ("sft_kl", "snapshot", ("reference",)), ("sft", "snapshot", ()),
])
def test_frozen_roles_follow_the_objective(objective, source, roles):
    assert AnchoredLearning(AnchorConfig(objective=objective, source=source), vocab_size=32).frozen_roles == roles


def test_refuses_a_step_count_without_a_step_source():
    with pytest.raises(ConfigError, match="steps_per_iteration"):
        AnchoredLearning(AnchorConfig(), vocab_size=32, steps_per_iteration=10)
    with pytest.raises(ConfigError, match="anchor.alpha"):
        AnchoredLearning(AnchorConfig(alpha=2.0), vocab_size=32)


def test_the_base_role_and_taid_need_their_sources():
    assert AnchoredLearning(AnchorConfig(base_kl_weight=0.2), vocab_size=32, base="/ckpt/base").frozen_roles == ("reference", "snapshot", "base")
    with pytest.raises(ConfigError, match=r"^base: is required with anchor.base_kl_weight > 0"):
        AnchoredLearning(AnchorConfig(base_kl_weight=0.2), vocab_size=32)
    with pytest.raises(ConfigError, match=r"^base: is used only with anchor.base_kl_weight > 0"):
        AnchoredLearning(AnchorConfig(), vocab_size=32, base="/ckpt/base")
    with pytest.raises(ConfigError, match=r"^current_step: is required with anchor.objective=taid"):
        AnchoredLearning(AnchorConfig(objective="taid"), vocab_size=32)
