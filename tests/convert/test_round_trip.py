"""HF -> Megatron -> HF gives bit-identical tensors and an identical config."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from anchored_megatron.checkpoint.model_config import load_model_config
from anchored_megatron.convert import hf_to_megatron, megatron_to_hf
from anchored_megatron.convert.cli import main as cli_main
from tests.convert.helpers import VOCAB, make_hf_model


def _all_tensors(model_dir):
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


def _config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("family,overrides", [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               "max_position_embeddings": 16384}),
    ("mistral", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
])
def test_round_trip_is_bit_identical_with_identical_config(tmp_path, family, overrides):
    hf_dir = make_hf_model(family, str(tmp_path / "hf"), num_hidden_layers=2, **overrides)
    model = hf_to_megatron(hf_dir, str(tmp_path / "mg"), "fp32", show_progress=False)
    assert load_model_config(str(tmp_path / "mg")) == model
    assert model.vocab_size == VOCAB and model.num_query_groups == 4
    if family == "llama":
        assert model.rope_scaling["factor"] == 8.0 and model.rotary_base == 500000.0
    # A small shard limit forces several output shards + an index.
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), "fp32", max_shard_bytes=40_000, show_progress=False)
    assert os.path.exists(tmp_path / "back" / "model.safetensors.index.json")
    original, back = _all_tensors(hf_dir), _all_tensors(str(tmp_path / "back"))
    assert sorted(original) == sorted(back)
    for key in original:
        assert original[key].dtype == back[key].dtype and torch.equal(original[key], back[key]), key
    assert _config(hf_dir) == _config(str(tmp_path / "back"))


def test_bf16_round_trip_and_synthesised_config_load_in_transformers(tmp_path):
    """bf16 on both sides is exact; without the kept HF config a synthesised one still loads."""
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_model("qwen2", str(tmp_path / "hf"), num_hidden_layers=2, tie_word_embeddings=True)
    hf_to_megatron(hf_dir, str(tmp_path / "mg"), "bf16", transformer_impl="transformer_engine", show_progress=False)
    assert load_model_config(str(tmp_path / "mg")).transformer_impl == "transformer_engine"
    os.remove(tmp_path / "mg" / "hf_config.json")
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), "bf16", show_progress=False)
    original = {k: v.to(torch.bfloat16) for k, v in _all_tensors(hf_dir).items()}
    back = _all_tensors(str(tmp_path / "back"))
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), attn_implementation="eager").eval()
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and loaded.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference(tokens).logits, loaded(tokens).logits)


def test_cli_converts_both_ways_and_copies_the_tokenizer(tmp_path, capsys):
    hf_dir = make_hf_model("llama", str(tmp_path / "hf"), num_hidden_layers=2)
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": 128}, fh)
    assert cli_main(["hf-to-megatron", "--hf", hf_dir, "--out", str(tmp_path / "mg"), "--dtype", "fp32", "--no-progress"]) == 0
    assert cli_main(["megatron-to-hf", "--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back"), "--dtype", "fp32",
                     "--tokenizer", hf_dir, "--no-progress"]) == 0
    assert os.path.exists(tmp_path / "back" / "tokenizer_config.json")
    assert cli_main(["hf-to-megatron", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--dtype", "fp32"]) == 2
    assert "config.json: not found" in capsys.readouterr().err


def _rank_compare(hf_dir, ckpt):
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = cli_main(["compare", "--hf", hf_dir, "--ckpt", ckpt, "--tp", "2", "--batch", "1", "--seq", "8"])
    return code, buffer.getvalue()


@pytest.mark.distributed
def test_compare_command_reports_a_tiny_difference_and_full_agreement(tmp_path, ranks):
    hf_dir = make_hf_model("mistral", str(tmp_path / "hf"), num_hidden_layers=2)
    hf_to_megatron(hf_dir, str(tmp_path / "mg"), "fp32", show_progress=False)
    results = ranks(_rank_compare, 2, hf_dir, str(tmp_path / "mg"), timeout=300)
    assert [code for code, _ in results] == [0, 0]
    report = results[0][1]
    diff = float(report.split("=")[1].split()[0])
    assert diff < 1e-4 and "top-1 agreement = 100.00%" in report, report


def _tokenizer_dir(path) -> str:
    """A word-level tokenizer.json whose special ids differ from every family default."""
    from tokenizers import Tokenizer, models

    words = ["<unk>", "a", "b", "c", "d", "<pad>", "e", "<s>", "f", "</s>"]
    os.makedirs(path)
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, fh)
    return str(path)


def test_synthesised_config_takes_token_ids_from_the_tokenizer_or_leaves_them_unknown(tmp_path):
    from transformers import AutoConfig

    hf_dir = make_hf_model("llama", str(tmp_path / "hf"), num_hidden_layers=1)
    hf_to_megatron(hf_dir, str(tmp_path / "mg"), "fp32", show_progress=False)
    os.remove(tmp_path / "mg" / "hf_config.json")
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "with_tok"), "fp32", tokenizer_dir=_tokenizer_dir(tmp_path / "tok"), show_progress=False)
    config = _config(str(tmp_path / "with_tok"))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (7, 9, 5)
    assert config["initializer_range"] == 0.02 and config["head_dim"] == 8
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "without"), "fp32", show_progress=False)
    loaded = AutoConfig.from_pretrained(str(tmp_path / "without"))
    # Not transformers' Llama defaults (bos 1, eos 2): unknown ids stay unknown.
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (None, None, None)


def test_a_converted_checkpoint_carries_a_manifest_that_catches_a_flipped_bit(tmp_path):
    import xxhash

    from anchored_megatron.checkpoint.trainer_io import CheckpointError, verify_checkpoint

    hf_dir = make_hf_model("qwen3", str(tmp_path / "hf"), num_hidden_layers=2)
    out = tmp_path / "mg"
    hf_to_megatron(hf_dir, str(out), "fp32", show_progress=False)
    with open(out / "manifest.json") as fh:
        listed = json.load(fh)["files"]
    on_disk = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs if f != "manifest.json")
    assert sorted(listed) == on_disk
    for name, entry in listed.items():
        data = (out / name).read_bytes()
        assert entry["size"] == len(data) and entry["digest"] == xxhash.xxh3_128_hexdigest(data), name
    assert verify_checkpoint(str(out)) is True
    shard = next(name for name in on_disk if name.endswith(".distcp"))
    with open(out / shard, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)[0]
        fh.seek(100)
        fh.write(bytes([byte ^ 1]))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {out}: {shard}: "):
        verify_checkpoint(str(out))
