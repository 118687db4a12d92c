"""The one validation: the model from the student checkpoint field by field, options the
objective ignores, the run's own directory, and the same verdicts from --dry-run and the trainer."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from anchored_megatron.config import ConfigError, ModelConfig, load_run_config
from anchored_megatron.planning.preflight import prepare_run
from tests.conftest import write_word_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A converted Llama-3-style checkpoint: every value differs from the dataclass defaults.
STORED = dict(num_layers=2, hidden_size=96, ffn_hidden_size=160, num_attention_heads=6, num_query_groups=2, kv_channels=16,
              vocab_size=300, seq_length=2048, rotary_base=500000.0, norm_epsilon=1e-6, tie_embeddings=True,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 1024},
              params_dtype="bf16")


def fake_checkpoint(path, **changes):
    """A directory the config layer takes for a checkpoint: model_config.yaml + metadata.json."""
    os.makedirs(path, exist_ok=True)
    stored = {**STORED, **changes}
    with open(os.path.join(path, "model_config.yaml"), "w") as fh:
        yaml.safe_dump(dataclasses.asdict(ModelConfig(**stored)), fh)
    with open(os.path.join(path, "metadata.json"), "w") as fh:
        json.dump({"sharded_backend": "torch_dist"}, fh)
    return str(path)


@pytest.fixture
def run(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    tokenizer = write_word_tokenizer(tmp_path / "tok")
    student = fake_checkpoint(tmp_path / "base")
    teacher = fake_checkpoint(tmp_path / "teacher")
    base = [f"output_dir={tmp_path / 'out'}", f"data.paths=[{data}]", f"data.tokenizer={tokenizer}",
            f"student.checkpoint={student}", f"reference.checkpoint={teacher}", "train.global_batch_size=2"]
    return {"root": tmp_path, "args": base, "student": student, "teacher": teacher}


def validated(args, world_size=1, check_files=True):
    cfg = load_run_config(None, args)
    prepare_run(cfg, world_size, check_files=check_files)
    return cfg


def test_a_run_time_override_keeps_the_checkpoint_architecture(run):
    model = validated(run["args"] + ["model.seq_length=128"]).model
    expected = dataclasses.replace(ModelConfig(**STORED), seq_length=128)
    assert model == expected  # rotary_base 500000, llama3 rope_scaling, norm_epsilon 1e-6, bf16 all kept


def test_unset_run_time_fields_come_from_the_checkpoint(run):
    assert validated(run["args"]).model == ModelConfig(**STORED)


def test_restating_the_whole_model_is_accepted(run):
    restated = [f"model.{k}={json.dumps(v)}" for k, v in STORED.items()]
    assert validated(run["args"] + restated).model == ModelConfig(**STORED)


@pytest.mark.parametrize("override, field, mine, theirs", [
    ("model.rotary_base=10000", "rotary_base", "10000.0", "500000.0"),
    ("model.rope_scaling=null", "rope_scaling", "None", "{'factor': 8.0"),
    ("model.num_layers=4", "num_layers", "4", "2"),
])
def test_a_conflicting_architecture_field_is_refused_by_name(run, override, field, mine, theirs):
    with pytest.raises(ConfigError) as info:
        validated(run["args"] + [override])
    message = str(info.value)
    assert message.startswith(f"model.{field}: is {mine}, but the student checkpoint {run['student']} has {field}={theirs}")


def test_a_preset_that_contradicts_the_checkpoint_is_refused(run):
    with pytest.raises(ConfigError, match=r"^model.preset: sets num_layers=4, but the student checkpoint .* has num_layers=2"):
        validated(run["args"] + ["model.preset=tiny"])


def test_the_plan_without_file_checks_shows_the_checkpoints_model(run):
    args = [a for a in run["args"] if not a.startswith("data.")]
    assert validated(args + ["model.seq_length=128"], check_files=False).model.num_layers == 2


def test_a_reference_inside_the_output_dir_is_refused(run):
    inside = fake_checkpoint(run["root"] / "out" / "checkpoints" / "iter_0000004")
    with pytest.raises(ConfigError, match=r"^reference.checkpoint: .* lies inside this run's output_dir"):
        validated(run["args"] + [f"reference.checkpoint={inside}"])
    with pytest.raises(ConfigError, match=r"^reference.checkpoint: .* lies inside this run's output_dir"):
        validated(run["args"] + [f"reference.checkpoint={run['root'] / 'out'}"], check_files=False)


def test_a_reference_with_another_rope_is_refused(run):
    other = fake_checkpoint(run["root"] / "other", rotary_base=10000.0)
    with pytest.raises(ConfigError, match=r"^reference.checkpoint: rotary_base=10000.0 differs from the student's 500000.0"):
        validated(run["args"] + [f"reference.checkpoint={other}"])


@pytest.mark.parametrize("overrides, message", [
    (["anchor.objective=sft", "anchor.alpha=0.3"], "anchor.alpha: is not used by anchor.objective=sft (only by anchored or taid); remove it"),
    (["anchor.objective=distill", "anchor.source=live"], "anchor.source: is not used by anchor.objective=distill"),
    (["anchor.kl_weight=0.5"], "anchor.kl_weight: is not used by anchor.objective=anchored (only by sft_kl or asft)"),
    (["anchor.objective=dft", "anchor.kl_weight=0.5"], "anchor.kl_weight: is not used by anchor.objective=dft (only by sft_kl or asft)"),
    (["anchor.objective=taid", "anchor.source=live"], "anchor.source: is not used by anchor.objective=taid (only by anchored)"),
    (["anchor.objective=dft"], "reference.checkpoint: is not used by anchor.objective=dft"),
    (["anchor.objective=distill", "anchor.base_kl_weight=0.2"], "anchor.base_kl_weight: is not used by anchor.objective=distill (only by anchored)"),
    (["anchor.objective=sft_kl", "anchor.temperature=2"], "anchor.temperature: is not used by anchor.objective=sft_kl"),
    (["anchor.jsd_beta=0.3"], "anchor.jsd_beta: is used only with anchor.divergence=jsd"),
    (["anchor.alpha_end=0.9"], "anchor.alpha_end: is used only with anchor.alpha_schedule=linear"),
    (["anchor.objective=sft"], "reference.checkpoint: is not used by anchor.objective=sft"),
    (["model.fp8_recipe=tensorwise"], "model.fp8_recipe: is used only with model.fp8"),
    (["model.fused_output_loss=false", "model.fused_output_chunk_tokens=512"],
     "model.fused_output_chunk_tokens: is used only with model.fused_output_loss=true"),
])
def test_an_option_the_run_would_ignore_is_refused(run, overrides, message):
    with pytest.raises(ConfigError) as info:
        validated(run["args"] + overrides)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("override, message", [
    ("model.fused_output_loss=1", "model.fused_output_loss: expected true or false, got 1"),
    ("model.fused_output_chunk_tokens=0", "model.fused_output_chunk_tokens: must be an integer >= 1 or null, got 0"),
])
def test_bad_fused_output_options_are_refused_by_name(run, override, message):
    with pytest.raises(ConfigError) as info:
        validated(run["args"] + [override])
    assert str(info.value).startswith(message)


def test_fused_output_options_are_run_time_fields(run):
    model = validated(run["args"] + ["model.fused_output_loss=false"]).model
    assert model.fused_output_loss is False and model.fused_output_chunk_tokens is None
    assert validated(run["args"] + ["model.fused_output_chunk_tokens=256"]).model.fused_output_chunk_tokens == 256


def test_defaults_of_options_the_objective_ignores_are_fine(run):
    args = [a for a in run["args"] if not a.startswith("reference.")]
    assert validated(args + ["anchor.objective=sft"]).anchor.alpha == 0.5


def test_a_resolved_config_written_back_as_input_is_accepted(run):
    """Every option restated (as in a run's config.yaml): defaults the objective ignores are fine."""
    args = [a for a in run["args"] if not a.startswith("reference.")]
    first = validated(args + ["anchor.objective=sft"])
    again = load_run_config(None, [f"{section}={json.dumps(value)}" for section, value in first.to_dict().items()])
    prepare_run(again, 1)
    assert again.to_dict() == first.to_dict()


def test_an_output_dir_below_a_file_is_refused(run):
    blocker = run["root"] / "blocker"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^output_dir: .*blocker is a file, not a directory"):
        validated(run["args"] + [f"output_dir={blocker / 'out'}"])


def test_an_output_dir_without_room_for_one_checkpoint_is_refused(run, monkeypatch):
    import shutil

    usage = shutil.disk_usage(run["root"])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(ConfigError, match=r"^output_dir: .*0.00 GiB free on its filesystem, one checkpoint of this run needs about"):
        validated(run["args"])


def _cli(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "anchored_megatron.train", *args], capture_output=True, text=True, env=env, cwd=REPO, **kwargs)


def test_cli_dry_run_plans_the_checkpoints_model_without_file_checks(run):
    args = [a for a in run["args"] if not a.startswith("data.")]
    result = _cli(["--dry-run", "--skip-file-checks", *args, "model.seq_length=128"])
    assert result.returncode == 0, result.stderr
    assert "model: 2 layers, hidden 96" in result.stdout


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4"], "parallel.vpp: the interleaved pipeline schedule cannot carry the frozen roles"),
    (["model.transformer_impl=transformer_engine"], "data.packing: packed documents need the block-diagonal attention mask"),
])
def test_cli_dry_run_refuses_what_the_trainer_refuses(tmp_path, overrides, message):
    base = [f"output_dir={tmp_path / 'out'}", "model.preset=tiny", "train.global_batch_size=2"]
    result = _cli(["--dry-run", "--skip-file-checks", "--world-size", "2", *base, *overrides])
    assert result.returncode == 2
    assert result.stderr.startswith(f"anchored-sft: config error: {message}")


def test_cli_float_spelling_and_type_errors(run, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-5\n")
    ok = _cli(["--dry-run", "--config", str(path), *run["args"]])
    assert ok.returncode == 0, ok.stderr
    bad = _cli(["--dry-run", "--config", str(path), *run["args"], "seed=abc"])
    assert bad.returncode == 2
    assert bad.stderr == "anchored-sft: config error: seed: expected an integer, got 'abc'\n"


def test_cli_refuses_a_read_only_output_dir_before_anything_heavy(run):
    locked = run["root"] / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root writes through permission bits; an immutable folder stops root too.
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        result = _cli(["--dry-run", *run["args"], f"output_dir={locked / 'run'}"])
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"anchored-sft: config error: output_dir: {locked / 'run'}: cannot write there ({locked}: ")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_launch(run):
    big = write_word_tokenizer(run["root"] / "big", words=[f"w{i}" for i in range(400)])
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*big has 402 tokens but model.vocab_size is 300$"):
        validated(run["args"] + [f"data.tokenizer={big}"])


def test_a_checkpoint_shipping_another_tokenizer_is_refused_before_launch(run):
    write_word_tokenizer(run["teacher"], words=["x", "y"])
    with pytest.raises(ConfigError, match=r"^data.tokenizer: tokenizers differ between data.tokenizer, reference.checkpoint"):
        validated(run["args"])


def test_a_kl_term_to_the_base_needs_the_base(run):
    args = [a for a in run["args"] if not a.startswith("student.checkpoint=")]
    with pytest.raises(ConfigError, match=r"^anchor.base_kl_weight: needs student.checkpoint: the base"):
        validated(args + ["anchor.base_kl_weight=0.2"])


def test_replay_data_is_validated_by_name(run):
    replay = run["root"] / "replay.jsonl"
    replay.write_text(json.dumps({"prompt": "c", "response": "d"}) + "\n")
    # global batch 2, micro 1: 2 gold microbatches; 0.5 adds 2 replay ones.
    assert validated(run["args"] + [f"data.replay_paths=[{replay}]", "data.replay_fraction=0.5"]).data.replay_microbatches(2) == 2
    # sft takes replay data too (rehearsal: CE on it); the other objectives do not.
    without_reference = [a for a in run["args"] if not a.startswith("reference.")]
    assert validated(without_reference + ["anchor.objective=sft", f"data.replay_paths=[{replay}]", "data.replay_fraction=0.5"]).data.replay_paths
    cases = [
        (["anchor.objective=distill", f"data.replay_paths=[{replay}]", "data.replay_fraction=0.5"],
         "data.replay_paths: the replay loss is KL(p_snapshot || p_theta)"),
        ([f"data.replay_paths=[{replay}]"], "data.replay_fraction: data.replay_paths and data.replay_fraction > 0 go together"),
        (["data.replay_fraction=0.5"], "data.replay_paths: data.replay_paths and data.replay_fraction > 0 go together"),
        ([f"data.replay_paths=[{run['root'] / 'missing.jsonl'}]", "data.replay_fraction=0.5"], "data.replay_paths[0]: "),
        ([f"data.replay_paths=[{replay}]", "data.replay_fraction=1.0"], "data.replay_fraction: must be a number in [0, 1), got 1.0"),
        ([f"data.replay_paths=[{replay}]", "data.replay_fraction=0.25"],
         "data.replay_fraction: 0.25 of each step's sequences is 0.667 microbatches next to the 2 gold ones per data-parallel rank; "
         "it must be a whole number: e.g. 0.333 (1), 0.5 (2), 0.6 (3)"),
        ([f"data.replay_paths=[{replay}]", "data.replay_fraction=0.5", "anchor.source=live"],
         "data.replay_paths: the replay loss is KL(p_snapshot || p_theta), which needs anchor.objective=anchored with anchor.source=snapshot, "
         "or the CE on the replay responses with anchor.objective=sft (rehearsal); got objective=anchored, source=live"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            validated(run["args"] + overrides)
        assert str(info.value).startswith(message), (overrides, str(info.value))


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.fsdp=true", "parallel.pp=2"], 4, "parallel.fsdp: shards over data-parallel ranks without pipeline stages; got pp=2"),
    (["parallel.fsdp=true", "optim.distributed_optimizer=false"], 2,
     "optim.distributed_optimizer: parallel.fsdp=true always shards the optimizer state"),
    (["parallel.fsdp=true", "model.fused_output_loss=true"], 2,
     "model.fused_output_loss: the fused output loss is not available with parallel.fsdp=true"),
    (["parallel.fsdp=true", "model.fused_output_chunk_tokens=512"], 2,
     "model.fused_output_chunk_tokens: the fused output loss is not available with parallel.fsdp=true"),
])
def test_what_fsdp_cannot_do_is_refused_by_name(run, overrides, world, message):
    with pytest.raises(ConfigError) as info:
        validated(run["args"] + overrides, world_size=world)
    assert str(info.value).startswith(message)


def test_fsdp_refuses_a_moe_model(run):
    args = [a for a in run["args"] if not a.startswith(("student.checkpoint=", "reference.checkpoint="))]
    with pytest.raises(ConfigError, match=r"^parallel.fsdp: a MoE model \(model.num_moe_experts=4\) is not sharded with Megatron-FSDP"):
        validated(args + ["model.preset=tiny", "model.num_moe_experts=4", "parallel.fsdp=true"], world_size=2)


def test_fsdp_turns_the_default_fused_output_loss_off_in_the_resolved_config(run):
    assert validated(run["args"] + ["parallel.fsdp=true"], world_size=2).model.fused_output_loss is False
    assert validated(run["args"], world_size=2).model.fused_output_loss is True


@pytest.mark.parametrize("overrides, world, message", [
    (["anchor.objective=sft", "reference.checkpoint=null"], 1,
     "train.frozen_hidden_cache: anchor.objective=sft has no frozen role whose outputs could be cached; remove it"),
    (["model.fused_output_loss=false"], 1,
     "train.frozen_hidden_cache: caches the final hidden states that the fused output loss consumes; it needs model.fused_output_loss=true"),
    (["parallel.fsdp=true"], 2, "train.frozen_hidden_cache: caches the final hidden states that the fused output loss consumes; it needs "
     "model.fused_output_loss=true (parallel.fsdp=true turns the fusion off)"),
    ([], 2, "train.frozen_hidden_cache: with 2 data-parallel ranks and data.shuffle=global a rank meets a sequence again only by chance"),
    (["data.shuffle=random"], 1, "data.shuffle: must be one of global, per_rank, got 'random'"),
])
def test_what_the_frozen_hidden_cache_cannot_do_is_refused_by_name(run, overrides, world, message):
    args = [a for a in run["args"] if not (a.startswith("reference.checkpoint=") and "reference.checkpoint=null" in overrides)]
    with pytest.raises(ConfigError) as info:
        validated(args + ["train.frozen_hidden_cache=true"] + overrides, world_size=world)
    assert str(info.value).startswith(message), str(info.value)


def test_the_frozen_hidden_cache_with_per_rank_shards_is_accepted(run):
    cfg = validated(run["args"] + ["train.frozen_hidden_cache=true", "data.shuffle=per_rank"], world_size=2)
    assert cfg.train.frozen_hidden_cache and cfg.data.shuffle == "per_rank"


@pytest.mark.parametrize("value, message", [
    ("0", "train.collective_timeout_minutes: must be a number of minutes > 0, got 0.0"),
    ("-1", "train.collective_timeout_minutes: must be a number of minutes > 0, got -1.0"),
    ("inf", "train.collective_timeout_minutes: expected a number, got 'inf'"),
])
def test_a_collective_timeout_that_is_not_a_positive_number_of_minutes_is_refused_by_name(run, value, message):
    with pytest.raises(ConfigError) as info:
        validated(run["args"] + [f"train.collective_timeout_minutes={value}"])
    assert str(info.value).startswith(message)
    assert validated(run["args"] + ["train.collective_timeout_minutes=0.25"]).train.collective_timeout_minutes == 0.25
