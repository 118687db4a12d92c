"""The Megatron-Core compatibility layer (platform/mcore_compat) on whichever release is installed."""

import functools
import os
import re
from types import SimpleNamespace

import pytest
import torch

from anchored_megatron import checkpoint
from anchored_megatron.checkpoint import mcore_format
from anchored_megatron.config import ModelConfig, OptimConfig, ParallelConfig
from anchored_megatron.platform import mcore_compat
from anchored_megatron.platform.mcore_compat import specs

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128, seq_length=8)


# ---- layer specs --------------------------------------------------------------------------------
def test_mlp_submodules_are_found_in_a_module_spec_and_in_a_partial():
    inner = SimpleNamespace(linear_fc1="fc1", linear_fc2="fc2")
    as_module_spec = SimpleNamespace(submodules=SimpleNamespace(mlp=SimpleNamespace(submodules=inner)))
    as_partial = SimpleNamespace(submodules=SimpleNamespace(mlp=functools.partial(print, submodules=inner)))
    assert specs.mlp_submodules(as_module_spec) is inner and specs.mlp_submodules(as_partial) is inner
    with pytest.raises(TypeError, match="partial without submodules="):
        specs.submodules(functools.partial(print))


def test_the_installed_local_spec_names_megatrons_linears():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    mlp = specs.mlp_submodules(get_gpt_layer_local_spec(normalization="RMSNorm"))
    assert mlp.linear_fc1 is ColumnParallelLinear and mlp.linear_fc2 is RowParallelLinear


# ---- releases and checkpoint formats ------------------------------------------------------------
def test_a_release_older_than_the_supported_range_is_refused(monkeypatch):
    monkeypatch.setattr(mcore_compat, "version", lambda: (0, 15, 3))
    with pytest.raises(mcore_compat.UnsupportedMegatronError, match=r"megatron-core 0\.15\.3 is installed.*pip install 'megatron-core>=0\.16\.1,<0\.20'"):
        mcore_compat.check_supported()


def test_supported_range_is_the_one_setup_py_declares():
    setup_py = open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py"), encoding="utf-8").read()
    assert f'"megatron-core{mcore_compat.SUPPORTED}"' in setup_py


@pytest.mark.parametrize("release", [(0, 16, 1), (0, 18, 2)])
def test_a_checkpoint_in_the_0_19_format_is_refused_before_0_19(tmp_path, monkeypatch, release):
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    monkeypatch.setattr(mcore_compat, "version", lambda: release)
    expected = (
        rf"^{re.escape(str(tmp_path))}: this checkpoint was written by megatron-core 0\.19 or newer .*no common\.pt.*"
        rf"megatron-core {re.escape('.'.join(map(str, release)))} cannot read\..*pip install 'megatron-core>=0\.19,<0\.20'"
    )
    with pytest.raises(mcore_format.CheckpointFormatError, match=expected):
        mcore_format.check_readable(str(tmp_path))
    # The older format names its common-state backend; without common.pt it is damaged, not new:
    # passed on to the loader (whose error names the missing file).
    (tmp_path / "metadata.json").write_text(
        '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}')
    mcore_format.check_readable(str(tmp_path))


def test_release_0_19_reads_both_formats(tmp_path, monkeypatch):
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    monkeypatch.setattr(mcore_compat, "version", lambda: (0, 19, 2))
    mcore_format.check_readable(str(tmp_path))


# ---- one real run: notices, the workarounds applied, the format written ---------------------------
def compat_rank(ckpt_root):
    """Train one step, save and load a checkpoint with every warning shown, as a user's run would."""
    import logging
    import warnings

    # No filters at all: every warning not silenced by the compat layer is recorded (once per place).
    warnings.resetwarnings()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        from anchored_megatron.platform import initialize

        # First, as in the trainer: Megatron is first imported here.
        initialize(ParallelConfig(), seed=1)
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from anchored_megatron.models.builder import build_model_chunks
        from anchored_megatron.checkpoint.trainer_io import load_checkpoint, save_checkpoint
        from anchored_megatron.training.optim import build_optimizer, wrap_ddp

        wrapped = wrap_ddp(build_model_chunks(MODEL, ParallelConfig()), use_distributed_optimizer=True)
        wrapped[0].config.finalize_model_grads_func = finalize_model_grads
        optimizer, _ = build_optimizer(wrapped, OptimConfig(warmup_fraction=0.0, lr_schedule="constant"), torch.float32, total_steps=2)
        tokens = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_length + 1), generator=torch.Generator().manual_seed(0))

        def forward_step(data, model):
            inputs, labels = next(data)
            output = model(inputs, torch.arange(MODEL.seq_length).expand_as(inputs), None)
            return output, lambda out: (vocab_parallel_cross_entropy(out.float().clone(), labels).mean(), {})

        wrapped[0].zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([(tokens[:, :-1], tokens[:, 1:])]),
                                    model=wrapped[0], num_microbatches=1, seq_length=MODEL.seq_length, micro_batch_size=2)
        optimizer.step()
        path = save_checkpoint(ckpt_root, 1, wrapped, optimizer, {"step": 1})
        load_checkpoint(path, wrapped, optimizer)
    notices = [f"{w.category.__name__}: {w.message}" for w in caught
               if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecat" in str(w.message).lower()]
    notices += [f"log {r.name}: {r.getMessage()}" for r in records if "deprecat" in r.getMessage().lower()]
    from megatron.core.distributed.fsdp import mcore_fsdp_adapter

    te_linear = getattr(mcore_fsdp_adapter, "TELinear", None)  # 0.16 - 0.17 only
    return {
        "notices": notices, "applied": {**mcore_compat.apply(), **checkpoint.install()}, "version": mcore_compat.version(), "files": sorted(os.listdir(path)),
        # What the FSDP adapter asks of every module at TP > 1 (raises where TELinear is a MagicMock subclass).
        "linear_is_te_linear": te_linear is not None and isinstance(torch.nn.Linear(1, 1), te_linear),
    }


@pytest.fixture(scope="module")
def compat_run(ranks, tmp_path_factory):
    return ranks(compat_rank, 1, str(tmp_path_factory.mktemp("ckpt")))[0]


@pytest.mark.distributed
def test_no_megatron_deprecation_notice_reaches_the_user(compat_run):
    assert compat_run["notices"] == [], "\n".join(compat_run["notices"])


@pytest.mark.distributed
def test_each_workaround_is_applied_exactly_on_the_releases_that_need_it(compat_run):
    release = compat_run["version"]
    assert compat_run["applied"] == {
        "optimizer": True,  # torch Adam's shared `step`: every release to 0.19.2
        "async_writer.dies_with_rank": True,  # Linux: every release's writer queue getter is replaced
        "mcore_format.writer_errors": release >= (0, 18),  # the threaded writer drops the errno
        "moe.te_general_gemm": release < (0, 17),
        "moe.cpu_split_sizes": True,
        "fsdp.te_linear_isinstance": release < (0, 18),
        "fsdp.frozen_parameter_hooks": release < (0, 17),
        "fsdp.synchronous_param_gather": True,  # no CUDA here: every release's gathers finish before returning
    }


@pytest.mark.distributed
def test_the_fsdp_adapter_tells_a_torch_linear_from_a_te_linear_without_te(compat_run):
    assert compat_run["linear_is_te_linear"] is False


@pytest.mark.distributed
def test_the_release_writes_the_checkpoint_format_the_refusal_assumes(compat_run):
    assert ("common.pt" in compat_run["files"]) == (compat_run["version"] < mcore_format.EMBEDDED_COMMON_STATE)
