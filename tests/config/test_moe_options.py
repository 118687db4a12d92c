"""MoE options: each inconsistent value is refused by the option's name, with Megatron-Core's constraints."""

import re

import pytest

from anchored_megatron.config import ConfigError, ModelConfig, ParallelConfig, load_run_config
from anchored_megatron.planning.preflight import prepare_run

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)


@pytest.mark.parametrize("model, parallel, world, message", [
    (MOE, dict(ep=3), 3, "parallel.ep: 3 does not divide model.num_moe_experts=4"),
    (MOE, dict(tp=2, ep=4), 4, "parallel.ep: 4 does not divide the data-parallel size 2 (world size 4 / (tp x pp = 2 x 1))"),
    ({}, dict(ep=2), 2, "parallel.ep: 2 needs a MoE model (model.num_moe_experts), got a dense one"),
    (dict(moe_ffn_hidden_size=32), {}, 1, "model.moe_ffn_hidden_size: is used only by MoE models"),
    (dict(moe_aux_loss_coeff=0.01), {}, 1, "model.moe_aux_loss_coeff: is used only by MoE models"),
    ({**MOE, "moe_router_topk": 5}, {}, 1, "model.moe_router_topk: 5 exceeds model.num_moe_experts=4"),
    ({**MOE, "num_moe_experts": 0}, {}, 1, "model.num_moe_experts: must be a positive integer, got 0"),
    ({**MOE, "moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 0.01}, {}, 1,
     "model.moe_aux_loss_coeff: 0.01 is not used with model.moe_router_load_balancing_type=none"),
    ({**MOE, "moe_router_load_balancing_type": "sinkhorn"}, {}, 1,
     "model.moe_router_load_balancing_type: must be one of aux_loss, seq_aux_loss, none, got 'sinkhorn'"),
    ({**MOE, "moe_token_dispatcher_type": "flex"}, {}, 1, "model.moe_token_dispatcher_type: must be one of alltoall, allgather, got 'flex'"),
    ({**MOE, "moe_ffn_hidden_size": 30}, dict(tp=4), 4, "model.moe_ffn_hidden_size: 30 is not divisible by parallel.tp=4"),
])
def test_inconsistent_moe_options_are_refused_by_name(model, parallel, world, message):
    parallel = ParallelConfig(**parallel)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parallel.validate(world)
        ModelConfig(**model).validate(parallel)


def test_a_moe_layout_megatron_accepts_validates():
    parallel = ParallelConfig(tp=2, ep=2)
    parallel.validate(8)
    ModelConfig(**MOE).validate(parallel)


def _run(tmp_path, *overrides):
    args = [f"output_dir={tmp_path / 'out'}", "anchor.objective=sft", *[f"model.{k}={v}" for k, v in MOE.items()], *overrides]
    return load_run_config(None, args)


def test_training_a_moe_model_under_tensor_parallelism_needs_sequence_parallelism(tmp_path):
    cfg = _run(tmp_path, "parallel.tp=2", "train.global_batch_size=2")
    with pytest.raises(ConfigError, match=re.escape("parallel.tp: training a MoE model at tp=2 needs parallel.sequence_parallel=true")):
        prepare_run(cfg, 2, check_files=False)


def test_grouped_gemm_is_refused_without_cuda_and_without_its_package(monkeypatch):
    from anchored_megatron.models import te
    from anchored_megatron.platform import accelerators

    model = ModelConfig(**MOE, moe_grouped_gemm=True)
    monkeypatch.setattr(accelerators, "has_cuda", lambda: False)
    with pytest.raises(ConfigError, match=re.escape("model.moe_grouped_gemm: needs a CUDA GPU")):
        te.check_environment(model)
    monkeypatch.setattr(accelerators, "has_cuda", lambda: True)
    monkeypatch.setattr(te.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=re.escape("it needs the grouped_gemm package, which is not installed")):
        te.check_environment(model)
