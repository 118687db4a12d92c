"""Each known third-party warning is silenced where it comes from, and only there."""

import warnings

import pytest

from anchored_megatron.platform import warnings_filter

# One real message per filter, with the module Python attributes it to.
SEEN = [
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", "megatron.core.optimizer"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", "megatron.core.transformer.transformer_config"),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
     "megatron.core.dist_checkpointing.strategies.torch"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor.", "anchored_megatron.platform.cpu_shim"),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` instead.",
     "torch.distributed.c10d_logger"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead.",
     "torch.distributed.c10d_logger"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad attribute won't be populated",
     "anchored_megatron.platform.cpu_shim"),
]


def _shown(category, message, module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # no filters: Python's own default shows every warning
        warnings_filter.install()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 10, module=module)
    return len(caught)


@pytest.mark.parametrize("category, message, module", SEEN)
def test_known_warning_is_silenced_at_its_source(category, message, module):
    assert _shown(category, message, module) == 0


@pytest.mark.parametrize("category, message, module", SEEN)
def test_the_same_message_from_our_trainer_still_shows(category, message, module):
    assert _shown(category, message, "anchored_megatron.training.trainer") == 1


def test_install_adds_each_filter_once():
    with warnings.catch_warnings():
        warnings_filter.install()
        count = len(warnings.filters)
        warnings_filter.install()
        assert len(warnings.filters) == count
