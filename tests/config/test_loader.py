"""The YAML + override loader: types, spellings, unknown keys, presets and what counts as set."""

import subprocess
import sys

import pytest

from anchored_megatron.config import ConfigError, build, load_run_config, RunConfig


def test_importing_the_config_package_does_not_import_torch():
    code = "import sys, anchored_megatron.config; print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("spelling", ["1e-5", "1E-5", "0.00001", "1.0e-5"])
def test_float_spellings_are_floats_in_yaml_and_on_the_command_line(tmp_path, spelling):
    path = tmp_path / "run.yaml"
    path.write_text(f"optim:\n  lr: {spelling}\n  min_lr: 0\n")
    assert load_run_config(str(path)).optim.lr == 1e-5
    assert load_run_config(None, [f"optim.lr={spelling}"]).optim.lr == 1e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=abc", "seed: expected an integer, got 'abc'"),
        ("anchor.temperature=x", "anchor.temperature: expected a number, got 'x'"),
        ("train.global_batch_size=8.5", "train.global_batch_size: expected an integer, got 8.5"),
        ("train.tensorboard=maybe", "train.tensorboard: expected true or false, got 'maybe'"),
        ("model=5", "model: expected a section (a mapping of options), got 5"),
        ("data.weights=[1, x]", "data.weights[1]: expected a number, got 'x'"),
        ("model.rope_scaling=3", "model.rope_scaling: expected a mapping or null, got 3"),
        ("optim.lr=[1,", "optim.lr: the value '[1,' is not valid YAML"),
        ("optim.lr=nan", "optim.lr: expected a number, got 'nan'"),
        ("optim.lrr=1", "optim.lrr: unknown option; did you mean optim.lr?"),
        ("optim.lr.x=1", "optim.lr: expected a number, got {'x': 1}"),
        ("explicit_keys=[]", "explicit_keys: unknown option"),
    ],
)
def test_a_wrong_type_names_the_key_the_expected_type_and_the_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [override])
    assert str(info.value).startswith(message)


def test_an_override_below_an_option_set_in_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^optim.lr: is an option, not a section"):
        load_run_config(str(path), ["optim.lr.x=1"])


def test_a_section_given_as_a_scalar_in_yaml_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"^optim: expected a section \(a mapping of options\), got 3$"):
        load_run_config(str(path))


def test_one_data_path_on_the_command_line_is_a_list_of_one():
    assert load_run_config(None, ["data.paths=train.jsonl"]).data.paths == ["train.jsonl"]


def test_explicit_keys_are_the_leaves_the_user_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-4\nmodel:\n  preset: tiny\n")
    cfg = load_run_config(str(path), ["anchor.alpha=0.3"])
    assert cfg.explicit_keys == {"optim.lr", "model.preset", "anchor.alpha"}
    assert "explicit_keys" not in cfg.to_dict()


def test_a_field_set_to_its_default_value_still_beats_the_preset():
    # qwen2.5-3b's preset has norm_epsilon 1e-6; 1e-5 is also the dataclass default.
    cfg = load_run_config(None, ["model.preset=qwen2.5-3b", "model.norm_epsilon=1e-5"])
    assert cfg.model.norm_epsilon == 1e-5
    assert cfg.model.num_layers == 36  # the rest from the preset
    assert load_run_config(None, ["model.preset=qwen2.5-3b"]).model.norm_epsilon == 1e-6


def test_build_from_a_dict_records_what_was_set_like_the_loader():
    cfg = build(RunConfig, {"output_dir": "x", "anchor": {"objective": "sft"}})
    assert cfg.explicit_keys == {"output_dir", "anchor.objective"}
