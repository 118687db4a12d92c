"""The CPU-only shortcuts of ``platform.cpu_single_rank``: an aliased collective over one rank is
skipped (it would copy a buffer onto itself), every other call reaches torch.distributed and gives
its usual result, and Megatron's gradient clipping scales in place to the float64 formula."""

import pytest
import torch


def _collectives():
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from megatron.core.optimizer import clip_grads

    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import cpu_single_rank, initialize

    initialize(ParallelConfig())  # installs the shortcuts (no CUDA here)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    installed = (getattr(buffers.dist_all_gather_func, "skips_identity", False), getattr(buffers.dist_reduce_scatter_func, "skips_identity", False),
                 clip_grads.multi_tensor_scale_impl is cpu_single_rank.scale_in_place)
    calls = []

    def recorded(output, input, group=None, async_op=False, **kwargs):
        calls.append("own shard" if input.data_ptr() == own.data_ptr() else "separate")
        return buffers.dist_all_gather_func.__wrapped__(output, input, group=group, async_op=async_op, **kwargs)

    gather = cpu_single_rank._skipping_identity(recorded)
    buffer = torch.arange(4.0 * world) + 100 * rank
    own = buffer.view(world, 4)[rank]
    kept = buffer.clone()
    handle = gather(buffer, own, group=group, async_op=True)
    handle.wait()
    separate = torch.empty(4 * world)
    gather(separate, (torch.arange(4.0) + 10 * rank), group=group)
    # Megatron's clipping, with the installed scale: max_norm 1 on gradients of norm > 1.
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))]
    generator = torch.Generator().manual_seed(rank)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 3
    before = [p.grad.double().clone() for p in params]
    grad_storage = [p.grad.data_ptr() for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=float(torch.cat([g.flatten() for g in before]).norm()))
    cpu_single_rank.uninstall()
    restored = not getattr(buffers.dist_all_gather_func, "skips_identity", False) and clip_grads.multi_tensor_scale_impl is not cpu_single_rank.scale_in_place
    return dict(rank=rank, world=world, installed=installed, calls=calls, buffer=buffer, kept=kept, separate=separate,
                before=before, after=[p.grad.double().clone() for p in params], in_place=[p.grad.data_ptr() for p in params] == grad_storage,
                restored=restored)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])
def test_one_rank_self_copies_are_skipped_and_everything_else_reaches_gloo(ranks, world):
    for result in ranks(_collectives, world):
        assert result["installed"] == (True, True, True) and result["restored"]
        rank = result["rank"]
        if world == 1:
            # the aliased gather never reached gloo; the buffer is what it was
            assert result["calls"] == ["separate"] and torch.equal(result["buffer"], result["kept"])
        else:
            # every rank's 4 values, rank order: what an all-gather gives
            assert result["calls"] == ["own shard", "separate"]
            expected = torch.cat([torch.arange(4.0) + 100 * r + 4 * r for r in range(world)])
            assert torch.equal(result["buffer"], expected)
        assert torch.equal(result["separate"], torch.cat([torch.arange(4.0) + 10 * r for r in range(world)])), rank
        norm = torch.cat([g.flatten() for g in result["before"]]).norm()
        for before, after in zip(result["before"], result["after"]):
            assert torch.allclose(after, before * (1.0 / (norm + 1e-6)), rtol=1e-6, atol=0)
        assert result["in_place"]
