"""``anchored-sft --dry-run``: validation without process groups, the printed layout, and the
memory arithmetic (distributed-optimizer sharding, frozen roles per objective)."""

import json

import pytest
import torch

from anchored_megatron.cli import train_main
from anchored_megatron.config import ConfigError, load_run_config
from anchored_megatron.planning import dry_run, plan_memory, total_parameters
from tests.conftest import write_word_tokenizer

# Published parameter counts (Hugging Face model cards / safetensors metadata; Qwen3-30B-A3B:
# transformers' Qwen3MoeForCausalLM built on the meta device from the model card's config).
PUBLISHED = {"llama3-1b": 1_235_814_400, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
             "qwen3-30b-a3b": 30_532_122_624}


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    tokenizer = write_word_tokenizer(tmp_path / "tok")
    return [f"output_dir={tmp_path / 'out'}", f"data.paths=[{data}]", f"data.tokenizer={tokenizer}"]


def llama8b(*overrides):
    return load_run_config(None, ["output_dir=/tmp/plan", "model.preset=llama3-8b", "model.params_dtype=bf16", "model.seq_length=4096",
                                  "parallel.tp=4", "parallel.pp=2", "train.global_batch_size=128", *overrides])


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_total_parameters_match_the_published_counts(preset):
    cfg = load_run_config(None, [f"model.preset={preset}"])
    assert total_parameters(cfg.model) == PUBLISHED[preset]


def test_per_rank_parameters_add_up_to_the_model_across_stages_and_tp():
    cfg = llama8b()
    plan = plan_memory(cfg, world_size=16)
    m, tp = cfg.model, cfg.parallel.tp
    replicated_norms = m.num_layers * 2 * m.hidden_size + m.hidden_size  # every TP rank holds the RMSNorm weights whole
    assert sum(stage.parameters for stage in plan.stages) * tp - (tp - 1) * replicated_norms == PUBLISHED["llama3-8b"]


def test_distributed_optimizer_shards_adam_state_over_data_parallel_ranks():
    sharded = plan_memory(llama8b("optim.distributed_optimizer=true"), world_size=32).stages[0]
    replicated = plan_memory(llama8b("optim.distributed_optimizer=false"), world_size=32).stages[0]
    assert replicated.optimizer == sharded.parameters * 12  # fp32 master + two moments
    assert sharded.optimizer == -(-replicated.optimizer // 4)  # DP = 32 / (4 x 2)
    assert sharded.grads == replicated.grads == sharded.parameters * 4  # fp32 main grads, not sharded


def test_expert_optimizer_state_shards_over_expert_data_parallel_ranks():
    from anchored_megatron.planning.parameters import rank_parameters

    cfg = load_run_config(None, ["output_dir=/tmp/plan", "model.preset=qwen3-30b-a3b", "model.params_dtype=bf16",
                                 "parallel.ep=8", "train.global_batch_size=32"])
    stage = plan_memory(cfg, world_size=32).stages[0]
    (chunk,) = rank_parameters(cfg.model, cfg.parallel, 0)
    assert chunk.experts == 48 * 16 * 3 * 768 * 2048  # 16 of the 128 experts of every layer
    assert stage.optimizer == -(-(chunk.total - chunk.experts) * 12 // 32) + -(-chunk.experts * 12 // 4)  # DP 32, EP 8


@pytest.mark.parametrize("overrides,roles", [
    (["anchor.objective=anchored", "anchor.source=snapshot"], 2), (["anchor.objective=anchored", "anchor.source=live"], 1),
    (["anchor.objective=distill"], 1), (["anchor.objective=sft"], 0), (["anchor.objective=dft"], 0), (["anchor.objective=asft"], 1),
    (["anchor.objective=taid"], 1), (["anchor.objective=anchored", "anchor.base_kl_weight=0.1", "student.checkpoint=/tmp/base"], 3),
])
def test_frozen_weights_follow_the_objective(overrides, roles):
    stage = plan_memory(llama8b(*overrides), world_size=8).stages[0]
    assert stage.frozen_weights == roles * stage.weights


def test_first_pipeline_stage_holds_more_in_flight_activations():
    plan = plan_memory(llama8b("parallel.pp=4", "model.transformer_impl=transformer_engine"), world_size=16)
    activations = [stage.activations for stage in plan.stages]
    assert activations[0] > activations[1] > activations[2]


def test_dry_run_validates_and_prints_the_layout(files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_run_config(None, files + ["model.preset=tiny", "parallel.tp=2", "parallel.pp=2", "train.global_batch_size=8"])
    text = dry_run(cfg)
    assert "config: valid" in text
    assert "TP 2 x PP 2 x DP 2" in text
    assert "peak: stage" in text
    assert not torch.distributed.is_initialized()


def test_dry_run_refuses_a_layout_that_does_not_divide_the_world(files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    cfg = load_run_config(None, files + ["model.preset=tiny", "parallel.tp=4"])
    with pytest.raises(ConfigError, match="parallel.tp"):
        dry_run(cfg)


def test_dry_run_checks_files_unless_told_not_to():
    cfg = llama8b()
    with pytest.raises(ConfigError, match="data.paths"):
        dry_run(cfg, world_size=64)
    assert "TP 4 x PP 2 x DP 8" in dry_run(cfg, world_size=64, check_files=False)


def test_cli_dry_run_exit_codes(files, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["--dry-run", *files, "model.preset=tiny", "parallel.tp=2", "train.global_batch_size=4"]) == 0
    assert "TP 2 x PP 1 x DP 1" in capsys.readouterr().out
    assert train_main(["--dry-run", *files, "model.preset=tiny", "anchor.alpha=1.5"]) == 2
    assert "anchor.alpha" in capsys.readouterr().err


@pytest.mark.parametrize("example, world_size", [("llama3_8b_anchored.yaml", 32), ("llama3_70b_anchored.yaml", 128),
                                                 ("qwen3_30b_a3b_anchored.yaml", 32)])
def test_the_example_configs_pass_the_trainers_validation(example, world_size):
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", example)
    cfg = load_run_config(path)
    text = dry_run(cfg, world_size=world_size, check_files=False)
    assert text.startswith("config: valid")


def test_fsdp_divides_every_roles_state_by_dp_and_adds_the_gathered_layers():
    replicated = plan_memory(llama8b("parallel.pp=1", "model.fused_output_loss=false"), world_size=32).stages[0]
    sharded = plan_memory(llama8b("parallel.pp=1", "parallel.fsdp=true"), world_size=32).stages[0]
    dp = 32 // 4
    assert sharded.weights == -(-replicated.weights // dp)
    assert sharded.grads == -(-replicated.grads // dp)
    assert sharded.frozen_weights == 2 * -(-replicated.weights // dp)
    assert sharded.optimizer == replicated.optimizer  # the distributed optimizer already shards Adam over DP
    # Llama-3-8B at TP=4, bf16: one layer, and the embedding + output layer + final norm, per TP rank.
    h, ffn, heads, groups, d, vocab = 4096, 14336, 32, 8, 128, 128256
    layer = (heads + 2 * groups) * d // 4 * h + h * heads * d // 4 + 3 * ffn // 4 * h + 2 * h
    outside = 2 * vocab // 4 * h + h
    assert sharded.gathered == outside * 2 + 2 * layer * 2 + layer * 4
    assert replicated.gathered == 0
