"""GPU-path selection on CPU: refusals, FP8 settings, fused kernels and the layer spec, with the
machine's availability faked through anchored_megatron.platform.accelerators."""

import pytest
import torch

from anchored_megatron.config import ConfigError, ModelConfig, ParallelConfig
from anchored_megatron.config.validate import check_packing
from anchored_megatron.models import builder, te
from anchored_megatron.platform import accelerators
from anchored_megatron.platform.mcore_compat import specs


def fp8_model(**overrides) -> ModelConfig:
    base = dict(transformer_impl="transformer_engine", params_dtype="bf16", fp8="hybrid")
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def machine(monkeypatch):
    """Fake what the machine offers: machine(cuda=True, te=True, apex=True, capability=(9, 0))."""

    def fake(cuda=False, te=False, apex=False, capability=(9, 0)):
        monkeypatch.setattr(accelerators, "has_cuda", lambda: cuda)
        monkeypatch.setattr(accelerators, "cuda_capability", lambda: capability if cuda else None)
        monkeypatch.setattr(accelerators, "transformer_engine_version", lambda: "2.8.0" if te else None)
        monkeypatch.setattr(accelerators, "transformer_engine_import_error", lambda: None if te else "ModuleNotFoundError: faked")
        monkeypatch.setattr(accelerators, "has_apex", lambda: apex)
        monkeypatch.setattr(accelerators, "has_apex_extension", lambda name: cuda and apex)

    return fake


# ---- a machine without CUDA, TE or apex (faked, so these hold on a GPU machine too) -----------------
def test_machine_without_cuda_reports_no_cuda_no_te_no_apex(machine):
    machine(cuda=False, te=False, apex=False)
    summary = accelerators.summary()
    assert summary["device"] == "cpu" and summary["cuda"] is None and summary["fp8_capable"] is False
    assert summary["transformer_engine"] is None and summary["apex"] is False
    assert not any(summary["apex_extensions"].values())
    assert "faked" in accelerators.transformer_engine_import_error()


def test_fp8_without_cuda_is_refused_naming_the_option(machine):
    machine(cuda=False)
    with pytest.raises(ConfigError, match=r"^model.fp8: 'hybrid' needs a CUDA GPU.*model.fp8=null"):
        builder.transformer_config(fp8_model(), ParallelConfig())


def test_te_spec_without_transformer_engine_is_refused_with_install_hint(machine):
    machine(cuda=True, te=False)
    model = ModelConfig(transformer_impl="transformer_engine")
    for build in (lambda: builder.layer_spec(model), lambda: builder.transformer_config(model, ParallelConfig())):
        with pytest.raises(ConfigError, match=r"^model.transformer_impl: .*pip install .*transformer_engine\[pytorch\].*transformer_impl=local"):
            build()


def test_cpu_config_keeps_every_fusion_off_and_no_fp8(machine):
    machine(cuda=False)
    config = builder.transformer_config(ModelConfig(), ParallelConfig())
    assert config.fp8 is None and config.use_cpu_initialization
    assert not any(getattr(config, name) for name in te.FUSIONS_OFF)


# ---- faked machines ---------------------------------------------------------------------------------
def test_fp8_with_cuda_but_without_te_is_refused_with_install_hint(machine):
    machine(cuda=True, te=False)
    with pytest.raises(ConfigError, match=r"^model.fp8: 'hybrid' needs Transformer Engine.*faked.*pip install"):
        te.check_environment(fp8_model())


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_refused(machine):
    machine(cuda=True, te=True, capability=(8, 0))
    with pytest.raises(ConfigError, match=r"^model.fp8: .*compute capability 8.9\+.*this GPU has 8.0"):
        te.check_environment(fp8_model())
    machine(cuda=True, te=True, capability=(9, 0))
    te.check_environment(fp8_model())  # H100/H200: accepted


def test_fusions_follow_what_is_installed(machine):
    machine(cuda=True)
    bare_gpu = te.fusion_settings(ModelConfig())
    assert bare_gpu["bias_activation_fusion"] and bare_gpu["bias_dropout_fusion"]  # torch jit only
    assert not bare_gpu["apply_rope_fusion"] and not bare_gpu["gradient_accumulation_fusion"]
    assert not bare_gpu["masked_softmax_fusion"] and not bare_gpu["persist_layer_norm"]

    machine(cuda=True, te=True, apex=True)
    local = te.fusion_settings(ModelConfig())
    te_spec = te.fusion_settings(ModelConfig(transformer_impl="transformer_engine"))
    assert local["apply_rope_fusion"] and local["gradient_accumulation_fusion"]
    # apex's causal fused softmax ignores the packed block-diagonal mask: never on.
    assert not local["masked_softmax_fusion"] and not te_spec["masked_softmax_fusion"]
    assert not local["persist_layer_norm"]  # apex's kernel is LayerNorm only; these models use RMSNorm

    assert te.fusion_settings(ModelConfig(fused_kernels=False)) == te.FUSIONS_OFF


def test_fp8_settings_map_onto_megatron_fields():
    assert te.precision_settings(ModelConfig()) == {}
    delayed = te.precision_settings(fp8_model(fp8="e4m3"))
    assert delayed["fp8"] == "e4m3" and delayed["fp8_recipe"] == "delayed" and not delayed["first_last_layers_bf16"]
    edge = te.precision_settings(fp8_model(fp8_recipe="tensorwise", fp8_bf16_first_last_layers=1))
    assert edge["first_last_layers_bf16"] and edge["num_layers_at_start_in_bf16"] == edge["num_layers_at_end_in_bf16"] == 1


def test_megatron_accepts_the_gpu_config_and_keeps_only_the_edge_layers_in_bf16(machine, monkeypatch):
    """The real TransformerConfig takes every field we set (a misspelt field would raise), and
    Megatron's own per-layer FP8 decision keeps exactly the first and last layer in bf16."""
    from megatron.core.fp8_utils import is_first_last_bf16_layer
    from megatron.core.models.common.embeddings import rope_utils

    machine(cuda=True, te=True, apex=True)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)  # TE's kernel, faked
    model = fp8_model(num_layers=6, fp8_recipe="tensorwise", fp8_bf16_first_last_layers=1)
    config = builder.transformer_config(model, ParallelConfig())
    assert config.fp8 == "hybrid" and config.apply_rope_fusion and config.gradient_accumulation_fusion
    assert not config.use_cpu_initialization
    assert [is_first_last_bf16_layer(config, i) for i in range(6)] == [True, False, False, False, False, True]

    delayed = fp8_model(num_layers=6)
    assert not any(is_first_last_bf16_layer(builder.transformer_config(delayed, ParallelConfig()), i) for i in range(6))


class _StandIn:
    """Stand-ins for Transformer Engine's module classes (TE cannot be imported here)."""

    class LayerNormColumnLinear: ...
    class ColumnLinear: ...
    class RowLinear: ...
    class Norm: ...
    class Attention: ...


class _StandInTEProvider:
    def column_parallel_linear(self):
        return _StandIn.ColumnLinear

    def row_parallel_linear(self):
        return _StandIn.RowLinear

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return _StandIn.LayerNormColumnLinear

    def layer_norm(self, rms_norm=False, for_qk=False, has_residual=False):
        return _StandIn.Norm

    def core_attention(self):
        return _StandIn.Attention

    def activation_func(self):
        return None


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_te_spec_is_megatrons_te_layer_with_norms_fused_into_the_linears(machine, monkeypatch, qk_layernorm):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.identity_op import IdentityOp

    machine(cuda=True, te=True)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", _StandInTEProvider, raising=False)
    spec = builder.layer_spec(ModelConfig(transformer_impl="transformer_engine", qk_layernorm=qk_layernorm))
    attention, mlp = spec.submodules.self_attention.submodules, specs.mlp_submodules(spec)
    assert attention.linear_qkv is _StandIn.LayerNormColumnLinear and mlp.linear_fc1 is _StandIn.LayerNormColumnLinear
    assert attention.linear_proj is _StandIn.RowLinear and mlp.linear_fc2 is _StandIn.RowLinear
    assert attention.core_attention is _StandIn.Attention
    # The RMSNorms live inside linear_qkv / linear_fc1 (layer_norm_weight): no separate norm modules.
    assert spec.submodules.input_layernorm is IdentityOp and spec.submodules.pre_mlp_layernorm is IdentityOp
    assert (attention.q_layernorm is _StandIn.Norm) == qk_layernorm


def test_local_spec_is_megatrons_own_with_cuda_and_takes_sdpa_attention_only_without(machine):
    """A CPU-only choice never reaches a GPU machine: with CUDA (faked) the local spec is exactly
    the one Megatron-Core builds, class by class; without it only the core attention differs."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from anchored_megatron.models.cpu_attention import SdpaDotProductAttention

    for model in (ModelConfig(), ModelConfig(qk_layernorm=True), ModelConfig(num_moe_experts=4, moe_ffn_hidden_size=48)):
        megatrons = get_gpt_layer_local_spec(num_experts=model.num_moe_experts, moe_grouped_gemm=model.moe_grouped_gemm,
                                             qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
        machine(cuda=True, te=True, apex=True)
        assert repr(builder.layer_spec(model)) == repr(megatrons)
        machine(cuda=False)
        spec = builder.layer_spec(model)
        attention = spec.submodules.self_attention.submodules
        assert attention.linear_qkv is ColumnParallelLinear and attention.core_attention is SdpaDotProductAttention
        assert issubclass(SdpaDotProductAttention, DotProductAttention)
        attention.core_attention = DotProductAttention
        assert repr(spec) == repr(megatrons)


def test_te_names_are_what_the_converters_write():
    """The TE spec names the fused norms linear_qkv/linear_fc1.layer_norm_weight: the converters'
    checkpoint keys map onto exactly those module names for transformer_engine."""
    from anchored_megatron.convert.mapping import module_param_name

    te_names = {
        module_param_name(f"decoder.layers.{suffix}", 3, "transformer_engine")
        for suffix in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
    }
    assert te_names == {"decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"}


def test_packed_documents_with_the_te_spec_are_refused():
    check_packing(ModelConfig(), packing=True)
    check_packing(ModelConfig(transformer_impl="transformer_engine"), packing=False)
    with pytest.raises(ConfigError, match=r"^data.packing: .*data.packing=false"):
        check_packing(ModelConfig(transformer_impl="transformer_engine"), packing=True)


def test_fakes_do_not_leak_into_torch():
    assert accelerators.has_cuda() is torch.cuda.is_available()
