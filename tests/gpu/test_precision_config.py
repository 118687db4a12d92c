"""The FP8 / fused-kernel options of ModelConfig are validated up front, naming the key."""

import pytest

from anchored_megatron.config import ConfigError, ModelConfig, ParallelConfig


def fp8_model(**overrides) -> ModelConfig:
    base = dict(transformer_impl="transformer_engine", params_dtype="bf16", fp8="hybrid")
    return ModelConfig(**{**base, **overrides})


def test_a_valid_fp8_config_passes():
    fp8_model().validate(ParallelConfig())
    fp8_model(fp8="e4m3", fp8_recipe="tensorwise", fp8_bf16_first_last_layers=1).validate(ParallelConfig(tp=2, pp=2))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(fp8="fp8"), "model.fp8"),
        (dict(fp8_recipe="mxfp8"), "model.fp8_recipe"),
        (dict(transformer_impl="local"), "model.fp8"),
        (dict(params_dtype="fp32"), "model.fp8"),
        (dict(fp8_bf16_first_last_layers=1), "model.fp8_bf16_first_last_layers"),  # delayed scaling
        (dict(fp8_recipe="tensorwise", fp8_bf16_first_last_layers=5), "model.fp8_bf16_first_last_layers"),
        (dict(fp8_bf16_first_last_layers=-1), "model.fp8_bf16_first_last_layers"),
        (dict(fused_kernels="yes"), "model.fused_kernels"),
    ],
)
def test_bad_precision_options_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        fp8_model(**overrides).validate(ParallelConfig())


def test_bf16_edge_layers_without_fp8_are_refused():
    with pytest.raises(ConfigError, match=r"^model.fp8_bf16_first_last_layers: needs model.fp8"):
        ModelConfig(fp8_bf16_first_last_layers=1).validate()


def test_bf16_edge_layers_are_bounded_by_one_pipeline_stage():
    # 4 layers over pp=2: 2 per stage, Megatron's own bound.
    model = fp8_model(fp8_recipe="tensorwise", fp8_bf16_first_last_layers=2)
    model.validate(ParallelConfig(pp=2))
    with pytest.raises(ConfigError, match="exceeds the 1 layers"):
        model.validate(ParallelConfig(pp=4))


@pytest.mark.parametrize(
    "overrides, what",
    [
        (dict(hidden_size=72, num_attention_heads=4, kv_channels=16), "hidden_size"),
        (dict(ffn_hidden_size=136), "ffn_hidden_size"),
        (dict(seq_length=72), "seq_length"),
        (dict(num_query_groups=1, kv_channels=8, hidden_size=64), "num_query_groups"),
    ],
)
def test_fp8_needs_gemm_dimensions_in_multiples_of_16(overrides, what):
    with pytest.raises(ConfigError, match=rf"^model.fp8: FP8 GEMMs need model.{what}"):
        fp8_model(**overrides).validate(ParallelConfig())


def test_fp8_dimension_check_is_per_tensor_parallel_shard():
    # ffn 160 is a multiple of 16, but each of 2 TP ranks holds 80: fine; of 4 ranks, 40: not.
    fp8_model(ffn_hidden_size=160).validate(ParallelConfig(tp=2))
    with pytest.raises(ConfigError, match=r"ffn_hidden_size / parallel.tp to be a multiple of 16, got 40"):
        fp8_model(ffn_hidden_size=160, num_attention_heads=4, num_query_groups=4).validate(ParallelConfig(tp=4))


def test_sequence_parallel_with_the_local_spec_is_refused():
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel: needs model.transformer_impl=transformer_engine"):
        ModelConfig().validate(ParallelConfig(tp=2, sequence_parallel=True))
    ModelConfig(transformer_impl="transformer_engine").validate(ParallelConfig(tp=2, sequence_parallel=True))


def test_execution_fields_are_fields_and_exclude_the_shape():
    import dataclasses

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ModelConfig.RUNTIME_FIELDS) <= names
    assert not {"num_layers", "hidden_size", "vocab_size"} & set(ModelConfig.RUNTIME_FIELDS)
