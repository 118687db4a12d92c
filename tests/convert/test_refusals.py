"""Bad input is refused with an error naming the file / tensor / option, before writing."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from anchored_megatron.config import ParallelConfig
from anchored_megatron.convert import ConvertError, hf_to_megatron, megatron_to_hf
from anchored_megatron.convert.family import rope_settings
from tests.convert.helpers import make_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_model("llama", str(tmp_path_factory.mktemp("refuse") / "llama"), num_hidden_layers=2)


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return dst


def test_unsupported_architecture_lists_the_supported_ones(llama_dir, tmp_path):
    src = _copy_with_config(llama_dir, str(tmp_path / "gpt2"), architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConvertError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_heads_not_divisible_by_target_tp_is_refused_before_writing(llama_dir, tmp_path):
    with pytest.raises(ConvertError, match="tp=3.*num_attention_heads"):
        hf_to_megatron(llama_dir, str(tmp_path / "out"), "fp32", target=ParallelConfig(tp=3), show_progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_missing_shard_file_is_named(llama_dir, tmp_path):
    src = str(tmp_path / "sharded")
    os.makedirs(src)
    shutil.copy(os.path.join(llama_dir, "config.json"), src)
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, os.path.join(src, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors") for i, n in enumerate(names)}
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with pytest.raises(ConvertError, match="model-00002-of-00002.safetensors"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)
    # Partial shard: the file exists but lacks tensors the index promises.
    save_file({names[-1]: tensors[names[-1]]}, os.path.join(src, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="partial shard"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_missing_tensor_and_wrong_shape_are_named(llama_dir, tmp_path):
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    src = str(tmp_path / "partial")
    shutil.copytree(llama_dir, src)
    dropped = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(dropped, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="model.norm.weight has shape"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)


def test_pickled_checkpoints_are_refused(llama_dir, tmp_path):
    src = str(tmp_path / "bin")
    os.makedirs(src)
    shutil.copy(os.path.join(llama_dir, "config.json"), src)
    torch.save({}, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ConvertError, match="only safetensors"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)


def test_dtype_must_be_explicit_and_known(llama_dir, tmp_path):
    with pytest.raises(ConvertError, match="--dtype"):
        hf_to_megatron(llama_dir, str(tmp_path / "out"), "float16", show_progress=False)


def test_rope_scaling_only_with_megatrons_fixed_llama3_factors():
    fixed = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    theta, scaling = rope_settings({"rope_parameters": {"rope_theta": 5e5, **fixed}}, "cfg")
    assert theta == 5e5 and scaling["factor"] == 32.0
    with pytest.raises(ConvertError, match="low_freq_factor"):
        rope_settings({"rope_scaling": {**fixed, "low_freq_factor": 2.0}}, "cfg")
    with pytest.raises(ConvertError, match="original_max_position_embeddings"):
        rope_settings({"rope_scaling": {**fixed, "original_max_position_embeddings": 4096}}, "cfg")
    with pytest.raises(ConvertError, match="'yarn'"):
        rope_settings({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "cfg")


def test_explicit_head_dim_becomes_kv_channels(tmp_path):
    from anchored_megatron.checkpoint.model_config import load_model_config

    src = make_hf_model("qwen3", str(tmp_path / "qwen3"), num_hidden_layers=1, head_dim=16)
    hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)
    model = load_model_config(str(tmp_path / "out"))
    assert (model.kv_channels, model.hidden_size // model.num_attention_heads) == (16, 8)


def test_llama_attention_bias_is_refused(llama_dir, tmp_path):
    src = _copy_with_config(llama_dir, str(tmp_path / "bias"), attention_bias=True)
    with pytest.raises(ConvertError, match="attention_bias"):
        hf_to_megatron(src, str(tmp_path / "out"), "fp32", show_progress=False)


def test_non_empty_output_is_not_overwritten(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConvertError, match="not empty"):
        hf_to_megatron(llama_dir, str(out), "fp32", show_progress=False)


def test_export_refuses_a_config_that_does_not_describe_the_checkpoint(llama_dir, tmp_path):
    ckpt = str(tmp_path / "mg")
    hf_to_megatron(llama_dir, ckpt, "fp32", show_progress=False)
    other = make_hf_model("llama", str(tmp_path / "other"), num_hidden_layers=3)
    with pytest.raises(ConvertError, match="num_layers"):
        megatron_to_hf(ckpt, str(tmp_path / "hf"), "fp32", hf_config_source=other, show_progress=False)
    assert not os.path.exists(tmp_path / "hf")


def test_family_that_contradicts_the_kept_config_is_refused(llama_dir, tmp_path):
    ckpt = str(tmp_path / "mg")
    hf_to_megatron(llama_dir, ckpt, "fp32", show_progress=False)
    with pytest.raises(ConvertError, match=r"--family qwen2: .*hf_config.json describes a llama model"):
        megatron_to_hf(ckpt, str(tmp_path / "hf"), "fp32", family_name="qwen2", show_progress=False)
    assert not os.path.exists(tmp_path / "hf")


def test_compare_refuses_random_token_options_with_text(llama_dir, tmp_path, capsys):
    from anchored_megatron.convert.cli import main as cli_main

    ckpt = str(tmp_path / "mg")
    hf_to_megatron(llama_dir, ckpt, "fp32", show_progress=False)
    assert cli_main(["compare", "--hf", llama_dir, "--ckpt", ckpt, "--text", "hello", "--seq", "8"]) == 2
    assert capsys.readouterr().err == "anchored-convert: error: --seq: shape random tokens; not used with --text\n"
