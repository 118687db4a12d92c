"""The Anchored Learning trainer on Megatron-Core.

Read ``Trainer.run`` top to bottom: T outer iterations x K epochs of steps; at each
iteration boundary the snapshot is refreshed (and optionally the optimizer reset); every
step runs Megatron's pipeline schedule over the microbatches, reduces the metrics once,
and steps the optimizer unless the loss was not finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time

import torch

from anchored_megatron.anchor import fused_passes
from anchored_megatron.config import ConfigError, RunConfig
from anchored_megatron.config.validate import reference_model
from anchored_megatron.training import checkpoint as ckpt
from anchored_megatron.training import moe_metrics, sharding
from anchored_megatron.training.checkpoint_dirs import resolve_checkpoint_dir
from anchored_megatron.training.forward_step import REPLAY_KEY, REPLAY_SUM_NAMES, SUM_NAMES, make_forward_step
from anchored_megatron.training.frozen_cache import PLAN_KEY
from anchored_megatron.training.metrics_log import MetricsLog
from anchored_megatron.training.objectives import iteration_loss
from anchored_megatron.training.optim import check_resumed_schedule, load_scheduler_state
from anchored_megatron.training.roles import RoleStack, adjust_tensor_shapes_for, copy_weights, freeze, output_fusion
from anchored_megatron.training.run_files import TrainLog, write_run_config


class NonFiniteLossError(RuntimeError):
    pass


def _number(value, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


@dataclasses.dataclass
class Progress:
    """Everything (besides weights and optimizer) a resumed run needs; plain values only."""

    step: int = 0
    nonfinite_in_a_row: int = 0
    sampler: dict | None = None
    replay_sampler: dict | None = None
    scheduler: dict | None = None
    optimizer_iteration: int = 0  # the iteration the optimizer/scheduler state belongs to


class Trainer:
    def __init__(self, cfg: RunConfig):
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size)  # before any process group exists; completes the model from the student checkpoint
        self.cfg = cfg
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.snapshot_root = os.path.join(cfg.output_dir, "snapshots")

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        from anchored_megatron.platform import initialize
        from anchored_megatron.platform.run_lock import hold_output_dir

        cfg = self.cfg
        self.runtime = initialize(cfg.parallel, seed=cfg.seed)
        self.is_logging_rank = self.runtime.rank == 0  # metrics are all-reduced, so every rank holds them
        # Before anything heavy: a second launch into a directory in use stops here, on every rank.
        self.output_lock = hold_output_dir(cfg.output_dir)
        self.train_log = TrainLog(cfg.output_dir) if self.is_logging_rank else None
        try:
            with self._printing():
                self._setup_run()
        except BaseException:
            self._close()
            raise

    def _setup_run(self) -> None:
        from megatron.core import parallel_state

        from anchored_megatron.data import EpochSampler, build_sft_dataset, load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)  # validate() checked it against the model and checkpoints
        self.dataset = build_sft_dataset(
            cfg.data, self.tokenizer, cfg.model.seq_length, seed=cfg.seed,
            rank=self.runtime.rank, world_size=self.runtime.world_size, barrier=torch.distributed.barrier,
        )
        gold_microbatches = cfg.train.num_microbatches(self.runtime.data_parallel_size)
        placement = dict(dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.runtime.data_parallel_size,
                         micro_batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle)
        self.sampler = EpochSampler(len(self.dataset), seed=cfg.seed, num_microbatches=gold_microbatches, **placement)
        self.replay_dataset = self.replay_sampler = None
        replay_microbatches = 0
        if cfg.data.replay_paths:
            replay_data = dataclasses.replace(cfg.data, paths=list(cfg.data.replay_paths), weights=None, replay_paths=[], replay_fraction=0.0)
            self.replay_dataset = build_sft_dataset(
                replay_data, self.tokenizer, cfg.model.seq_length, seed=cfg.seed,
                rank=self.runtime.rank, world_size=self.runtime.world_size, barrier=torch.distributed.barrier,
            )
            replay_microbatches = cfg.data.replay_microbatches(gold_microbatches)
            # Its own order (seed + 1) and epochs: the replay data cycles independently of the gold epochs.
            self.replay_sampler = EpochSampler(len(self.replay_dataset), seed=cfg.seed + 1, num_microbatches=replay_microbatches, **placement)
        self.num_microbatches = gold_microbatches + replay_microbatches
        anchor = cfg.anchor
        self.steps_per_iteration = self.sampler.steps_per_epoch * anchor.epochs_per_iteration
        self.total_steps = self.steps_per_iteration * anchor.outer_iterations
        # max_steps stops the run early without changing the schedule (LR, outer iterations) it follows.
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self._build_roles()

    def _printing(self):
        """What the logging rank prints also goes to output_dir/train.log."""
        return self.train_log.copying() if self.train_log is not None else contextlib.nullcontext()

    def _close(self) -> None:
        fused_passes.report_compiles_to(None)
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.train_log is not None:
            self.train_log.close()
        if self.output_lock is not None:
            self.output_lock.release()

    def _build_roles(self) -> None:
        from megatron.core.distributed import finalize_model_grads

        from anchored_megatron.models.builder import build_model_chunks
        from anchored_megatron.training.optim import build_optimizer, wrap_ddp

        cfg = self.cfg
        fsdp = cfg.parallel.fsdp
        # loss_func returns (sum, tokens): a true per-token mean. Set at construction: MoE routers
        # read it there to scale their load-balancing loss to that convention.
        self.student = build_model_chunks(cfg.model, cfg.parallel, calculate_per_token_loss=True)
        config = self.student[0].config
        self.wrapped = sharding.wrap_fsdp(self.student) if fsdp else wrap_ddp(self.student, cfg.optim.distributed_optimizer)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [m.no_sync for m in self.wrapped] if len(self.wrapped) > 1 else self.wrapped[0].no_sync
        roles = {}
        for name in cfg.anchor.frozen_roles:
            # The reference may have an MLP of its own (a dense teacher for a MoE student, or the reverse).
            roles[name] = self._frozen_role(build_model_chunks(reference_model(cfg) if name == "reference" else cfg.model, cfg.parallel))
        self.reference, self.snapshot, self.base = (roles.get(name) for name in ("reference", "snapshot", "base"))
        frozen = list(roles.values())
        self.frozen_names = list(roles)
        self.frozen_cache = self._build_frozen_cache(len(frozen)) if cfg.train.frozen_hidden_cache else None
        self.stacks = [RoleStack(self.wrapped[i], [roles[i] for roles in frozen], output_fusion(cfg.model), self.frozen_cache)
                       for i in range(len(self.wrapped))]
        self.num_roles = 1 + len(frozen)
        steps = self.steps_per_iteration if cfg.anchor.reset_optimizer_per_iteration else self.total_steps
        self.optimizer, self.scheduler = build_optimizer(self.wrapped, cfg.optim, config.params_dtype, steps)
        if self.optimizer.config.fp16:
            config.grad_scale_func = self.optimizer.scale_loss

    def _build_frozen_cache(self, num_roles: int):
        """The cache, after checking that what it will hold fits in this host's memory."""
        from megatron.core import parallel_state

        from anchored_megatron.training import frozen_cache

        cfg = self.cfg
        dp = self.runtime.data_parallel_size
        sequences = -(-len(self.dataset) // dp) + (0 if self.replay_dataset is None else -(-len(self.replay_dataset) // dp))
        held = frozen_cache.estimated_bytes(sequences, cfg.model.seq_length, cfg.model.hidden_size, num_roles,
                                            cfg.parallel.tp, cfg.parallel.sequence_parallel)
        size = frozen_cache.check_host_memory(sequences, held, frozen_cache.last_stage_ranks_per_host(cfg.parallel.pp),
                                              frozen_cache.available_host_bytes())
        self.frozen_cache_note = f"train.frozen_hidden_cache: keeping {', '.join(self.frozen_names)}'s final hidden states in host memory, {size}"
        return frozen_cache.FrozenHiddenCache(num_roles, stores_tensors=parallel_state.is_pipeline_last_stage())

    def _frozen_role(self, chunks) -> list:
        freeze(chunks)
        return sharding.shard_frozen(chunks) if self.cfg.parallel.fsdp else chunks

    def _copy_student_to(self, role) -> None:
        """role <- the student's current weights: under FSDP shard by shard, else tensor by tensor."""
        if self.cfg.parallel.fsdp:
            sharding.copy_shards(self.wrapped, role)
        else:
            copy_weights(self.student, role)

    def _checkpointed_optimizer(self):
        """The optimizer as checkpoints see it: under FSDP its shards in the DDP format."""
        if self.cfg.parallel.fsdp:
            from anchored_megatron.training.fsdp_checkpoint import FsdpOptimizerState

            return FsdpOptimizerState(self.optimizer, self.wrapped)
        return self.optimizer

    def _whole_weights(self, chunks, write: bool = False):
        """Whole tensors for checkpoint I/O: under FSDP ``chunks`` are gathered for the block."""
        return sharding.gathered_weights(chunks, write) if self.cfg.parallel.fsdp else contextlib.nullcontext()

    # ---- checkpoints ----------------------------------------------------------------------
    def _load_initial_weights(self) -> Progress:
        """Resume from our own latest checkpoint, else start from the base; the reference is
        always re-loaded from its own checkpoint (and must be the one the run was trained with)."""
        from anchored_megatron.convert import load_megatron_weights

        cfg = self.cfg
        checksums = cfg.train.verify_checkpoint_checksums
        self.reference_identity = self._reference_identity()
        if self.reference is not None and not cfg.reference.checkpoint:
            self._copy_student_to(self.reference)  # random-init runs (tests): reference = the initial student
        latest = ckpt.latest_checkpoint(self.ckpt_root) if os.path.isdir(self.ckpt_root) else None
        progress = self._resume(latest) if latest is not None else None
        if self.reference is not None and cfg.reference.checkpoint:
            with self._whole_weights(self.reference, write=True):
                load_megatron_weights(self.reference, resolve_checkpoint_dir(cfg.reference.checkpoint, "reference.checkpoint"), checksums)
        if self.base is not None:  # the KL term's base: the student's starting point, resume or not
            with self._whole_weights(self.base, write=True):
                load_megatron_weights(self.base, resolve_checkpoint_dir(cfg.student.checkpoint, "student.checkpoint"), checksums)
        if progress is not None:
            return progress
        if cfg.student.checkpoint:
            with self._whole_weights(self.wrapped, write=True):
                load_megatron_weights(self.wrapped, resolve_checkpoint_dir(cfg.student.checkpoint, "student.checkpoint"), checksums)
            # The DDP/optimizer main params were copied at construction: refresh them. Under FSDP the
            # gathered weights were written into the main-weight shards already (and Megatron-FSDP
            # has no model-to-main copy: a no-op up to 0.18, NotImplementedError from 0.19).
            if not cfg.parallel.fsdp:
                self.optimizer.reload_model_params()
        return Progress()

    def _resume(self, latest: str) -> Progress:
        checksums = self.cfg.train.verify_checkpoint_checksums
        optimizer = self._checkpointed_optimizer()
        with self._whole_weights(self.wrapped, write=True):
            state = ckpt.load_checkpoint(
                latest, self.wrapped, optimizer, rank_state_loader=self._restore_rank_state,
                checksums=checksums, check_common=lambda common: self._check_resume(common, latest), message=self.log.message,
            )
        if hasattr(optimizer, "finish_load"):
            optimizer.finish_load()
        stored = dict(state["progress"])
        if "optimizer_stage" in stored:  # the field's name in checkpoints written before 2026-11-30
            stored["optimizer_iteration"] = stored.pop("optimizer_stage")
        progress = Progress(**stored)
        self.sampler.load_state_dict(progress.sampler)
        if (self.replay_sampler is None) != (progress.replay_sampler is None):
            saved_by = "a run without" if progress.replay_sampler is None else "a run with"
            raise ConfigError(f"data.replay_paths: {latest} was saved by {saved_by} replay data; resume it as it was "
                              "started, or start a new output_dir")
        if self.replay_sampler is not None:
            self.replay_sampler.load_state_dict(progress.replay_sampler)
        load_scheduler_state(self.scheduler, progress.scheduler)
        if self.snapshot is not None and progress.step % self.steps_per_iteration != 0:
            iteration = progress.step // self.steps_per_iteration
            with self._whole_weights(self.snapshot, write=True):
                ckpt.load_checkpoint(
                    os.path.join(self.snapshot_root, ckpt.checkpoint_name(iteration)), self.snapshot, checksums=checksums,
                    advice=f"The snapshot of outer iteration {iteration} is needed to resume at step {progress.step}: resume from a "
                    f"checkpoint saved before that iteration (anchored-checkpoint list {self.ckpt_root}, then anchored-checkpoint use).",
                    message=self.log.message,
                )
        self.log.message(f"resumed from {latest} at step {progress.step}")
        return progress

    def _reference_identity(self) -> dict | None:
        """The reference as a resumed run must find it again: resolved path + metadata digest
        (computed on rank 0: the metadata of a large checkpoint is tens of MB)."""
        from anchored_megatron.training.manifest import metadata_digest

        cfg = self.cfg
        if self.reference is None or not cfg.reference.checkpoint:
            return None
        identity = None
        if self.runtime.rank == 0:
            directory = os.path.realpath(resolve_checkpoint_dir(cfg.reference.checkpoint, "reference.checkpoint"))
            identity = {"path": directory, "digest": metadata_digest(directory)}
        box = [identity]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _check_resume(self, common: dict, checkpoint: str) -> None:
        """Before any tensor is read: the resumed run must train as the saved one did."""
        check_resumed_schedule(self.scheduler, common["progress"]["scheduler"], checkpoint)
        self._check_reference(common)

    def _check_reference(self, common: dict) -> None:
        if "reference" not in common:  # written before references were recorded
            return
        saved, current = common["reference"], self.reference_identity
        if saved == current:
            return
        change = f"it was trained against {_describe_reference(saved)}, the config now gives {_describe_reference(current)}"
        if not self.cfg.train.allow_reference_change:
            raise ConfigError(
                f"reference.checkpoint: the run in {self.cfg.output_dir} cannot resume with another reference: {change}. "
                "Point reference.checkpoint back at the original, or set train.allow_reference_change=true to continue with this one."
            )
        self.log.message(f"train.allow_reference_change: resuming with another reference: {change}")

    def _save(self, progress: Progress) -> str:
        from anchored_megatron.convert.megatron_io import write_trainer_model_config

        progress.sampler = self.sampler.state_dict()
        progress.replay_sampler = None if self.replay_sampler is None else self.replay_sampler.state_dict()
        progress.scheduler = self.scheduler.state_dict()
        common = {"progress": dataclasses.asdict(progress), "layout": self._layout(), "reference": self.reference_identity}
        with self._whole_weights(self.wrapped):
            path = ckpt.save_checkpoint(
                self.ckpt_root, progress.step, self.wrapped, self._checkpointed_optimizer(), common, rank_state=self._rank_state(),
                add_files=lambda directory: write_trainer_model_config(directory, self.cfg.model, self.cfg.student.checkpoint),
            )
        if self.runtime.rank == 0:
            ckpt.prune(self.ckpt_root, keep=self.cfg.train.keep_checkpoints)
            if self.snapshot is not None:
                # A snapshot is needed while any kept checkpoint lies inside its iteration.
                oldest = min(ckpt.iterations(self.ckpt_root))
                ckpt.prune_below(self.snapshot_root, oldest // self.steps_per_iteration)
        torch.distributed.barrier()
        self.log.message(f"saved checkpoint {os.path.basename(path)} -> {path}")
        return path

    @property
    def metric_names(self) -> tuple[str, ...]:
        # Without a reference (sft) there is no divergence: its metrics would be undefined.
        return SUM_NAMES[:-1] if self.cfg.anchor.needs_reference else ("loss",)

    def _layout(self) -> list[int]:
        return [self.cfg.parallel.tp, self.cfg.parallel.pp, self.runtime.data_parallel_size]

    def _rank_state(self) -> dict:
        return {
            "layout": self._layout(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if not self.runtime.cpu_shim_active else None,
            "python": list(random.getstate()[1]),
        }

    def _restore_rank_state(self, state: dict, common: dict) -> None:
        # RNG streams belong to one rank of one layout; after resharding they are re-seeded.
        if state is None or state.get("layout") != self._layout():
            return
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"])
        random.setstate((3, tuple(state["python"]), None))

    # ---- outer iterations -------------------------------------------------------------------
    def _begin_iteration(self, iteration: int, progress: Progress) -> None:
        """At a boundary: snapshot <- student (kept on disk for mid-iteration resumes), and
        a fresh optimizer + schedule when configured."""
        anchor = self.cfg.anchor
        events = [f"alpha {iteration_loss(anchor, iteration).alpha:g}"] if anchor.objective == "anchored" else []
        if self.snapshot is not None:
            self._copy_student_to(self.snapshot)
            if self.frozen_cache is not None:
                self.frozen_cache.clear(self.frozen_names.index("snapshot"))
            with self._whole_weights(self.snapshot):
                ckpt.save_checkpoint(self.snapshot_root, iteration, self.snapshot)
            events.append("snapshot refreshed from the student")
        if anchor.reset_optimizer_per_iteration and iteration != progress.optimizer_iteration:
            from anchored_megatron.training.optim import build_scheduler, reset_optimizer_state

            reset_optimizer_state(self.optimizer)
            self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.steps_per_iteration)
            progress.optimizer_iteration = iteration
            events.append("optimizer state and LR schedule reset")
        self.log.message(f"outer iteration {iteration + 1}/{anchor.outer_iterations} from step {progress.step}"
                         + (": " + ", ".join(events) if events else ""))

    # ---- one step ---------------------------------------------------------------------------
    def _microbatches(self) -> list[dict]:
        from anchored_megatron.data import collate

        device = self.runtime.device
        batches = []
        sources = [(self.dataset, self.sampler, False)]
        if self.replay_sampler is not None:
            sources.append((self.replay_dataset, self.replay_sampler, True))
        keys = []  # per microbatch, its sequences' cache keys: (source, index)
        for dataset, sampler, replay in sources:
            for indices in sampler.next_step():
                batch = {k: v.to(device, non_blocking=True) for k, v in collate([dataset[i] for i in indices]).items()}
                if replay:
                    batch[REPLAY_KEY] = True
                batches.append(batch)
                keys.append(tuple((replay, i) for i in indices))
        if self.frozen_cache is not None:
            for batch, plan in zip(batches, self.frozen_cache.plan_step(keys, device)):
                batch[PLAN_KEY] = plan
        return batches

    def _train_step(self, forward_step) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        microbatches = self._microbatches()
        for model in self.wrapped:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(microbatches) for _ in self.stacks]
        pipelined = cfg.parallel.pp > 1
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.stacks if len(self.stacks) > 1 else self.stacks[0],
            num_microbatches=self.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            adjust_tensor_shapes_fn=adjust_tensor_shapes_for(self.num_roles) if pipelined and self.num_roles > 1 else None,
        )
        sums, replay_sums, aux_loss = self._reduce_sums(outputs)
        finite = bool(torch.isfinite(sums[0]).item()) and bool(torch.isfinite(replay_sums[0]).item())
        grad_norm = float("nan")
        lr = self.optimizer.param_groups[0]["lr"]  # what this update uses; the scheduler then moves on
        if finite:
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        tokens = max(sums[-1].item(), 1.0)
        record = {name: (sums[SUM_NAMES.index(name)] / tokens).item() for name in self.metric_names}
        if aux_loss is not None:
            record[moe_metrics.METRIC] = moe_metrics.step_mean(aux_loss, cfg.model, self.runtime.data_parallel_size, self.num_microbatches)
        record.update(response_tokens=int(sums[-1].item()), grad_norm=float(grad_norm) if grad_norm is not None else None,
                      finite=finite, lr=lr)
        if self.frozen_cache is not None:
            # The share of this step's frozen-role forwards served from the cache.
            plans = [batch[PLAN_KEY].cached for batch in microbatches]
            record["frozen_cached"] = sum(map(sum, plans)) / (len(plans) * len(plans[0]))
        if self.replay_sampler is not None:
            record.update(replay_loss=(replay_sums[0] / max(replay_sums[1].item(), 1.0)).item(), replay_tokens=int(replay_sums[1].item()))
        return record

    def _reduce_sums(self, outputs) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """One all-reduce per step: (the SUM_NAMES sums, the REPLAY_SUM_NAMES sums, the MoE
        load-balancing loss sum or None). The last stage's TP-rank-0 of each DP replica
        contributes the sums; every stage its layers' load-balancing losses."""
        from megatron.core import parallel_state

        aux_name = moe_metrics.tracked_name(self.cfg.model)
        packed = len(SUM_NAMES) + len(REPLAY_SUM_NAMES)
        sums = torch.zeros(packed + (aux_name is not None), dtype=torch.float64, device=self.runtime.device)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if outputs and tp_rank == 0:
            for out in outputs:
                sums[:packed] += torch.cat([out["sums"], out["replay_sums"]]).to(sums)
        if aux_name is not None:
            # Under sequence parallelism each TP rank holds the loss of its own tokens; without, copies.
            sums[-1] = moe_metrics.take_local_sum(aux_name, tp_rank == 0 or self.cfg.parallel.sequence_parallel).to(sums)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        return sums[: len(SUM_NAMES)], sums[len(SUM_NAMES):packed], None if aux_name is None else sums[-1].item()

    # ---- the main loop -----------------------------------------------------------------------
    def run(self) -> dict:
        try:
            with self._printing():
                return self._train()
        finally:
            self._close()

    def _train(self) -> dict:
        cfg = self.cfg
        self.log = MetricsLog(cfg.output_dir, enabled=self.is_logging_rank, tensorboard=cfg.train.tensorboard,
                              progress_bar=cfg.train.progress_bar)
        fused_passes.report_compiles_to(self.log.message)
        if self.is_logging_rank:
            note = write_run_config(cfg.output_dir, cfg.to_dict())
            if note is not None:
                self.log.message(note)
        if self.frozen_cache is not None:
            self.log.message(self.frozen_cache_note)
        progress = self._load_initial_weights()
        self.log.start(progress.step, self.stop_step)
        first_step, loop_started, saved = progress.step, time.perf_counter(), None
        current = {"loss": iteration_loss(cfg.anchor, progress.step // self.steps_per_iteration, progress.step, self.total_steps)}
        forward_step = make_forward_step(lambda: current["loss"], cfg.model.vocab_size)
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        last = {}
        while progress.step < self.stop_step:
            iteration, step_in_iteration = divmod(progress.step, self.steps_per_iteration)
            if step_in_iteration == 0:
                self._begin_iteration(iteration, progress)
            current["loss"] = iteration_loss(cfg.anchor, iteration, progress.step, self.total_steps)
            started = time.perf_counter()
            record = self._train_step(forward_step)
            elapsed = time.perf_counter() - started
            progress.step += 1
            progress.nonfinite_in_a_row = 0 if record["finite"] else progress.nonfinite_in_a_row + 1
            alpha = {"alpha": current["loss"].alpha} if cfg.anchor.objective in ("anchored", "taid") else {}
            record = {"step": progress.step, "iteration": iteration, **alpha, **record,
                      "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed}
            self.log.log(record, self._line(record) if progress.step % cfg.train.log_interval == 0 else None)
            last = record
            if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteLossError(f"loss was not finite for {progress.nonfinite_in_a_row} steps in a row (train.max_nonfinite_in_a_row)")
            if not record["finite"]:
                self.log.message(f"step {progress.step}: non-finite loss, update skipped ({progress.nonfinite_in_a_row} in a row)")
            if self._should_save(progress.step):
                saved = self._save(progress)
        self.log.close()
        self.log.message(self._summary(first_step, progress.step, time.perf_counter() - loop_started, last, saved))
        return last

    def _should_save(self, step: int) -> bool:
        train = self.cfg.train
        at_iteration_end = step % self.steps_per_iteration == 0
        return (
            step == self.stop_step
            or (train.save_at_iteration_end and at_iteration_end)
            or (train.save_interval > 0 and step % train.save_interval == 0)
        )

    def _line(self, r: dict) -> str:
        divergence = f"kl_step {_number(r['kl_step'], '.4f')} kl_ref {_number(r['kl_reference'], '.4f')} " if "kl_step" in r else ""
        return (
            f"step {r['step']}/{self.total_steps} iteration {r['iteration']} loss {_number(r['loss'], '.4f')} {divergence}lr {r['lr']:.2e} "
            f"grad_norm {_number(r['grad_norm'], '.3f')} {r['step_time_s']:.2f}s {r['tokens_per_s']:.0f} tok/s"
        )

    def _summary(self, first_step: int, step: int, seconds: float, last: dict, saved: str | None) -> str:
        steps = step - first_step
        where = f"finished at step {step}/{self.total_steps}" if step == self.total_steps else \
            f"stopped at step {step}/{self.total_steps} (train.max_steps)"
        if steps == 0:
            return f"{where}: nothing left to train"
        resumed = f" (resumed at step {first_step})" if first_step else ""
        tokens_per_s = steps * self.cfg.train.global_batch_size * self.cfg.model.seq_length / seconds
        return (f"{where}: {steps} steps{resumed} in {seconds:.1f} s, {tokens_per_s:.0f} tok/s, "
                f"final loss {_number(last.get('loss'), '.4f')}, last checkpoint {saved}")


def _describe_reference(identity: dict | None) -> str:
    return "no reference checkpoint" if identity is None else f"{identity['path']} (metadata digest {identity['digest']})"


def train(cfg: RunConfig) -> dict:
    """Run a whole training job in this process (one rank of a torchrun launch)."""
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.run()
