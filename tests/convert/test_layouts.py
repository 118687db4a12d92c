"""HF logits vs the converted Megatron model at TP in {1, 2} x PP in {1, 2} (+ virtual PP),
and export of checkpoints the trainer writes (padded vocab, extra non-model keys)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from anchored_megatron.convert import hf_to_megatron, megatron_to_hf
from tests.convert.helpers import VOCAB, make_hf_model, rank_logits

# (name, family, overrides): GQA with 4 groups of 2 heads everywhere (2 groups per rank at TP=2).
CASES = [
    ("llama_untied", "llama", {}),
    ("mistral", "mistral", {}),
    ("qwen2_tied_bias", "qwen2", {"tie_word_embeddings": True}),
    ("qwen3_qknorm", "qwen3", {}),
]
LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)]
TRAINER_SAVE = ("qwen2_tied_bias", (2, 2, None))  # tied embeddings saved from PP=2 at a padded vocab
TRAINER_SAVE_UNTIED = ("llama_untied", (2, 1, None))


def _hf_reference(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.double()


def _tensors(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, family, overrides in CASES:
        hf_dir = make_hf_model(family, str(root / name / "hf"), **overrides)
        hf_to_megatron(hf_dir, str(root / name / "megatron"), "fp32", show_progress=False)
        out[name] = (hf_dir, str(root / name / "megatron"))
    return root, out


@pytest.mark.distributed
def test_logits_match_hf_at_every_layout_and_trainer_checkpoints_export(converted, ranks):
    root, dirs = converted
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    save_dirs = {}
    for name, layout in (TRAINER_SAVE, TRAINER_SAVE_UNTIED):
        save_dirs[(name, layout)] = {"plain": str(root / name / "trainer_plain"), "with_optimizer": str(root / name / "trainer_opt")}
    results = ranks(rank_logits, 4, [(n, dirs[n][1]) for n, _, _ in CASES], LAYOUTS, tokens, save_dirs, timeout=600)
    merged = {k: v for r in results for k, v in r.items()}

    worst = {}
    for name, _, _ in CASES:
        expected = _hf_reference(dirs[name][0], tokens)
        for layout in LAYOUTS:
            got = merged[(name, layout)]
            assert got.shape == expected.shape, (name, layout, got.shape)
            worst[(name, layout)] = (got.double() - expected).abs().max().item()
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, f"logit differences above 1e-4: {bad}"

    # Trainer checkpoints (padded vocab at TP=2, tied output from PP=2, optimizer keys) export
    # to tensors bit-identical to the original HF model, with the original config.
    for name, _ in (TRAINER_SAVE, TRAINER_SAVE_UNTIED):
        hf_dir = dirs[name][0]
        for kind, trainer_dir in save_dirs[(name, _)].items():
            out_dir = str(root / name / f"export_{kind}")
            megatron_to_hf(trainer_dir, out_dir, "fp32", hf_config_source=hf_dir, show_progress=False)
            original, exported = _tensors(hf_dir), _tensors(out_dir)
            assert sorted(original) == sorted(exported), (name, kind)
            for key in original:
                assert torch.equal(original[key], exported[key]), (name, kind, key)
            with open(os.path.join(hf_dir, "config.json")) as a, open(os.path.join(out_dir, "config.json")) as b:
                assert json.load(a) == json.load(b)


@pytest.mark.distributed
def test_written_checkpoint_has_the_keys_and_shapes_megatron_saves(converted, tmp_path):
    """The converter's hand-built checkpoint vs one a real TP=1/PP=1 GPTModel saves."""
    from megatron.core import dist_checkpointing

    from anchored_megatron.checkpoint.weights import single_process_group

    _, dirs = converted
    trainer_dir = os.path.dirname(dirs["qwen2_tied_bias"][1])
    real = os.path.join(trainer_dir, "trainer_plain")
    if not os.path.exists(real):
        pytest.fail("run together with test_logits_match_hf_at_every_layout_and_trainer_checkpoints_export")
    with single_process_group():
        mine = dist_checkpointing.load_tensors_metadata(dirs["qwen2_tied_bias"][1])
        theirs = dist_checkpointing.load_tensors_metadata(real)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        expected = tuple(theirs[key].global_shape)
        if key == "embedding.word_embeddings.weight":
            expected = (VOCAB, expected[1])  # the trainer's copy is padded to its TP; ours is not
        assert tuple(mine[key].global_shape) == expected, key
