"""``anchored-merge`` (WiSE-FT) against the interpolation written plainly on the Hugging Face
tensors: two tiny random Llamas, converted; the fine-tuned one re-saved by a TP=2 model (padded
vocabulary rows, a trainer's layout); merged; exported; every tensor compared with
(1 - r) A + r B computed here in float64 from the source safetensors files."""

import os

import pytest
import torch
from safetensors.torch import load_file

from anchored_megatron.convert import hf_to_megatron, megatron_to_hf
from anchored_megatron.convert.merge import main as merge_main
from tests.convert.helpers import make_hf_model, rank_logits

RATIO = 0.25


def _hf_tensors(directory) -> dict:
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory, ranks):
    root = tmp_path_factory.mktemp("merge")
    hf_a = make_hf_model("llama", str(root / "hf_a"), seed=0, num_hidden_layers=2)
    hf_b = make_hf_model("llama", str(root / "hf_b"), seed=1, num_hidden_layers=2)
    hf_to_megatron(hf_a, str(root / "a"), "fp32", show_progress=False)
    hf_to_megatron(hf_b, str(root / "b"), "fp32", show_progress=False)
    layout = (2, 1, None)
    saves = {("b", layout): {"plain": str(root / "b_tp2"), "with_optimizer": str(root / "b_tp2_optimizer")}}
    ranks(rank_logits, 2, [("b", str(root / "b"))], [layout], torch.zeros(1, 4, dtype=torch.long), saves)
    return {"root": root, "hf_a": hf_a, "hf_b": hf_b, "a": str(root / "a"), "b_tp2": str(root / "b_tp2")}


def test_merge_is_the_interpolation_of_the_hf_tensors(pair, capsys):
    out = pair["root"] / "merged"
    assert merge_main(["--base", pair["a"], "--finetuned", pair["b_tp2"], "--ratio", str(RATIO), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 2 layers")
    megatron_to_hf(str(out), str(pair["root"] / "merged_hf"), "fp32", show_progress=False)
    a, b, merged = _hf_tensors(pair["hf_a"]), _hf_tensors(pair["hf_b"]), _hf_tensors(pair["root"] / "merged_hf")
    assert set(merged) == set(a) == set(b)
    for name, tensor in merged.items():
        expected = (1 - RATIO) * a[name].double() + RATIO * b[name].double()
        assert tensor.shape == expected.shape, name
        assert torch.allclose(tensor.double(), expected, rtol=1e-6, atol=1e-7), name


def test_ratio_zero_and_one_give_the_inputs_exactly(pair):
    for ratio, source in ((0.0, "hf_a"), (1.0, "hf_b")):
        out = pair["root"] / f"merged_{ratio:g}"
        assert merge_main(["--base", pair["a"], "--finetuned", pair["b_tp2"], "--ratio", str(ratio), "--out", str(out), "--no-progress"]) == 0
        megatron_to_hf(str(out), str(out) + "_hf", "fp32", show_progress=False)
        expected, merged = _hf_tensors(pair[source]), _hf_tensors(str(out) + "_hf")
        assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_refusals_name_the_option(pair, tmp_path, capsys):
    other = make_hf_model("llama", str(tmp_path / "hf_other"), num_hidden_layers=3)
    hf_to_megatron(other, str(tmp_path / "other"), "fp32", show_progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    capsys.readouterr()  # transformers' own save progress
    cases = [
        (["--ratio", "1.5", "--out", str(tmp_path / "x")], "anchored-merge: --ratio: must be a number in [0, 1] (0 = base, 1 = finetuned), got 1.5"),
        (["--ratio", "0.5", "--out", str(tmp_path / "full")], f"anchored-merge: --out {tmp_path / 'full'}: directory exists and is not empty"),
    ]
    for extra, message in cases:
        assert merge_main(["--base", pair["a"], "--finetuned", pair["b_tp2"], *extra]) == 1
        assert capsys.readouterr().err.startswith(message)
    assert merge_main(["--base", pair["a"], "--finetuned", str(tmp_path / "other"), "--ratio", "0.5", "--out", str(tmp_path / "y")]) == 1
    assert capsys.readouterr().err.startswith(f"anchored-merge: --finetuned {tmp_path / 'other'}: not the architecture of --base {pair['a']}: num_layers: 2 vs 3")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "y").exists()
