"""One entry point that brings up torch.distributed, Megatron's parallel state and seeds."""

from __future__ import annotations

import datetime
import os
import random
import time
import uuid
from dataclasses import dataclass

import torch

from anchored_megatron.config import ParallelConfig
from anchored_megatron.platform import cpu_shim, cpu_single_rank, mcore_compat, warnings_filter


@dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    cpu_shim_active: bool
    data_parallel_size: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def initialize(
    parallel: ParallelConfig,
    seed: int = 1234,
    timeout_minutes: float = 30.0,
) -> RuntimeInfo:
    """Start torch.distributed, Megatron's parallel state (``parallel``) and the RNGs (``seed``).

    Reads torchrun's RANK, WORLD_SIZE and LOCAL_RANK (defaults 0, 1, 0: one process) and, for
    the rendezvous, MASTER_ADDR and MASTER_PORT, set to 127.0.0.1 and 29500 when absent. A
    process that runs alone (WORLD_SIZE 1, no MASTER_PORT) meets on an in-memory store instead
    and binds no port, so single-process runs never collide on a shared machine. With
    CUDA: NCCL on GPU LOCAL_RANK. Without CUDA: gloo on CPU, after the CPU shim
    (``cpu_shim``) maps Megatron-Core's CUDA placements, streams, events and RNG tracker to
    CPU, and ``cpu_single_rank`` drops the one-rank collectives' and gradient clipping's
    self-copies Megatron makes there every step. Either way the workarounds this Megatron-Core
    release needs are installed (``mcore_compat``: e.g. the distributed optimizer's checkpoint-load
    fixes for torch AdamW, applied only when Megatron runs without apex and Transformer Engine),
    and the known third-party warnings are filtered (``warnings_filter``); the checkpoint package
    installs its restricted unpickling itself (``checkpoint.install``). An existing process group is kept;
    Megatron's parallel state is rebuilt on every call. ``timeout_minutes`` is the timeout for
    collectives, of the default process group and of Megatron's groups alike. Returns this
    process's RuntimeInfo (rank, device, backend, data-parallel size); raises ConfigError when
    ``parallel`` does not fit WORLD_SIZE.
    """
    # Some of Megatron's deprecation notices fire at import: filter before the first import.
    warnings_filter.install()
    from megatron.core import parallel_state

    shim_active = cpu_shim.install()
    if shim_active:
        cpu_single_rank.install()
    mcore_compat.apply()

    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    parallel.validate(world_size)

    if parallel.tp > 1:
        # Megatron's tensor-parallel layers overlap their all-reduce with compute only when the GPU
        # runs kernels in issue order; Megatron-LM's launch scripts set this, and Megatron warns
        # without it. Read when CUDA starts, so set before set_device; a user's value is kept.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if shim_active:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"

    if not torch.distributed.is_initialized():
        store = None
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size == 1 and not os.environ.get("MASTER_PORT"):
            store = torch.distributed.HashStore()
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps the workers' store for the whole job, and torch 2.13 reads it without a
            # prefix (older releases prefixed TORCHELASTIC_RESTART_COUNT): after a restart, keys left by the
            # dead attempt (gloo's peer addresses, NCCL's unique id) read as this attempt's, and
            # init_process_group hangs or fails on either backend. The restart count cannot name an attempt:
            # an agent that restarts healthy workers because another node failed does not count it, so nodes
            # disagree. So this attempt's ranks meet on a prefix that its global rank 0 hands out.
            store = _attempt_store(rank, world_size, timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    if parallel_state.model_parallel_is_initialized():
        _destroy_subgroups()
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if (parallel.vpp or 1) > 1 else None,
        expert_model_parallel_size=parallel.ep,
        distributed_timeout_minutes=timeout_minutes,  # Megatron's groups get their own timeout, 30 min unless told
    )
    seed_everything(seed)
    return RuntimeInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        cpu_shim_active=shim_active,
        data_parallel_size=parallel.data_parallel_size(world_size),
    )


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> torch.distributed.Store:
    """The agent's store seen through a prefix that only this attempt's ranks share. Each rank
    posts a fresh nonce; global rank 0 answers every nonce it finds with a fresh attempt id until
    all ranks have taken one. A nonce left by a dead attempt gets an answer nobody reads, and an
    answer to a fresh nonce can only come from this attempt's rank 0."""
    agent = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                       is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore("anchored_megatron/attempts/", agent)
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"hello/{rank}", nonce)
        attempt = store.get(f"reply/{nonce}").decode()
        store.add(f"{attempt}/joined", 1)
        return torch.distributed.PrefixStore(f"{attempt}/", store)
    attempt, answered = uuid.uuid4().hex, set()
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"{attempt}/joined", 0) < world_size - 1:
        if time.monotonic() > deadline:
            joined = store.add(f"{attempt}/joined", 0)
            raise TimeoutError(f"torch.distributed start-up: {joined + 1} of {world_size} ranks joined within {timeout}")
        for other in range(1, world_size):
            nonce = store.get(f"hello/{other}")
            if nonce not in answered:
                store.set("reply/" + nonce.decode(), attempt)
                answered.add(nonce)
        time.sleep(0.05)
    return torch.distributed.PrefixStore(f"{attempt}/", store)


def _destroy_subgroups() -> None:
    """End every process group but the default one before a new layout's are made.
    Megatron-Core's destroy_model_parallel only forgets its groups; each gloo group keeps its
    threads and sockets, so a process that re-initialises per job (the experiment runner, the
    tests) piled them up: 51 threads per TP=2 layout, over a thousand per rank in a study."""
    from torch.distributed import distributed_c10d

    world = distributed_c10d.GroupMember.WORLD
    for group in list(distributed_c10d._world.pg_map):  # torch has no public listing of the groups
        if group is not world:
            torch.distributed.destroy_process_group(group)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch; each pipeline stage gets its own stream, TP ranks
    share the default stream and get distinct model-parallel streams (Megatron's tracker)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    try:
        import numpy as np

        np.random.seed(stage_seed % (2**32))
    except ImportError:
        pass
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        _destroy_subgroups()
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
