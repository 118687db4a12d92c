"""Qwen3-MoE and Mixtral: tiny random transformers models (the reference) convert with
``anchored-convert``, ``compare`` passes, the converted logits match transformers' at
TP x EP x PP layouts, and HF -> Megatron -> HF is bit-identical with an identical config.json."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

from anchored_megatron.convert import ConvertError, hf_to_megatron
from anchored_megatron.convert.cli import main as cli_main
from tests.convert.helpers import VOCAB, make_hf_model, rank_logits

FAMILIES = ("qwen3_moe", "mixtral")
# Single-process cases: both families, and Qwen3-MoE without renormalised top-k probabilities
# (transformers' default; Megatron's moe_router_pre_softmax).
CASES = {"qwen3_moe": ("qwen3_moe", {}), "mixtral": ("mixtral", {}),
         "qwen3_moe_unnormalised": ("qwen3_moe", {"norm_topk_prob": False})}
# (tp, pp, vpp, ep) on 4 ranks: the experts split 2 and 2 (EP=2), alone and with TP=2 or PP=2.
LAYOUTS = [(1, 1, None, 1), (1, 1, None, 2), (2, 1, None, 1), (2, 1, None, 2), (1, 2, None, 2)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, (family, overrides) in CASES.items():
        hf_dir = make_hf_model(family, str(root / name / "hf"), num_hidden_layers=2, **overrides)
        mg_dir = str(root / name / "megatron")
        assert cli_main(["hf-to-megatron", "--hf", hf_dir, "--out", mg_dir, "--dtype", "fp32", "--target-ep", "2", "--no-progress"]) == 0
        out[name] = (hf_dir, mg_dir)
    return root, out


def _hf_reference(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.double()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_round_trip_is_bit_identical_with_identical_config(converted, tmp_path, case):
    family = CASES[case][0]
    hf_dir, mg_dir = converted[1][case]
    back = str(tmp_path / "back")
    assert cli_main(["megatron-to-hf", "--ckpt", mg_dir, "--out", back, "--dtype", "fp32", "--no-progress"]) == 0
    original, exported = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    # The per-expert names save_pretrained writes (and transformers' loader reads back).
    expert = "mlp.experts.3.down_proj.weight" if family == "qwen3_moe" else "block_sparse_moe.experts.3.w2.weight"
    assert f"model.layers.1.{expert}" in exported
    assert sorted(original) == sorted(exported)
    for name in original:
        assert original[name].dtype == exported[name].dtype and torch.equal(original[name], exported[name]), name
    with open(os.path.join(hf_dir, "config.json"), "rb") as a, open(os.path.join(back, "config.json"), "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_compare_passes(converted, capsys, case):
    hf_dir, mg_dir = converted[1][case]
    assert cli_main(["compare", "--hf", hf_dir, "--ckpt", mg_dir, "--seq", "16"]) == 0
    diff = float(re.search(r"max \|logit diff\| = (\S+)", capsys.readouterr().out).group(1))
    assert diff <= 1e-4


@pytest.mark.parametrize("case", ["qwen3_moe_unnormalised", "mixtral"])
def test_a_synthesised_config_loads_in_transformers_with_the_same_logits(converted, tmp_path, case):
    """Without the kept HF config, export writes one from model_config.yaml (family by shape)."""
    import shutil

    from anchored_megatron.convert import megatron_to_hf

    hf_dir, mg_dir = converted[1][case]
    bare = str(tmp_path / "bare")
    shutil.copytree(mg_dir, bare)
    os.remove(os.path.join(bare, "hf_config.json"))
    megatron_to_hf(bare, str(tmp_path / "back"), "fp32", show_progress=False)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_hf_reference(str(tmp_path / "back"), tokens), _hf_reference(hf_dir, tokens))


@pytest.mark.distributed
def test_logits_match_hf_at_tp_ep_pp_layouts(converted, ranks):
    dirs = converted[1]
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    results = ranks(rank_logits, 4, [(f, dirs[f][1]) for f in FAMILIES], LAYOUTS, tokens, timeout=600)
    merged = {k: v for r in results for k, v in r.items()}
    worst = {}
    for family in FAMILIES:
        expected = _hf_reference(dirs[family][0], tokens)
        for layout in LAYOUTS:
            got = merged[(family, layout)]
            assert got.shape == expected.shape, (family, layout)
            worst[(family, layout)] = (got.double() - expected).abs().max().item()
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, f"logit differences above 1e-4: {bad}"


@pytest.mark.parametrize("family, overrides, message", [
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1] is not supported (every layer must be MoE)"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported (every layer must be MoE)"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
])
def test_unsupported_moe_configs_are_refused_by_key(tmp_path, family, overrides, message):
    hf_dir = make_hf_model(family, str(tmp_path / "hf"), num_hidden_layers=2, **overrides)
    with pytest.raises(ConvertError, match=re.escape(message)):
        hf_to_megatron(hf_dir, str(tmp_path / "mg"), "fp32", show_progress=False)
    assert not os.path.exists(tmp_path / "mg")


def test_an_expert_parallel_size_that_does_not_divide_the_experts_is_refused(converted, capsys, tmp_path):
    hf_dir = converted[1]["mixtral"][0]
    assert cli_main(["hf-to-megatron", "--hf", hf_dir, "--out", str(tmp_path / "mg"), "--dtype", "fp32", "--target-ep", "3"]) == 2
    assert "cannot run at tp=1, pp=1, ep=3: parallel.ep: 3 does not divide model.num_moe_experts=4" in capsys.readouterr().err
