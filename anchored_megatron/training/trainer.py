"""The Anchored Learning trainer on Megatron-Core.

Read ``Trainer.run`` top to bottom: T outer iterations x K epochs of steps; at each
iteration boundary the snapshot is refreshed (and optionally the optimizer reset); every
step runs Megatron's pipeline schedule over the microbatches, reduces the metrics once,
and steps the optimizer unless the loss was not finite. Elsewhere: whether the weights are
whole on every rank (DDP) or sharded (Megatron-FSDP), in ``sharding.py``; saving and resuming,
in ``resume.py``; a step's microbatches, in ``batches.py``; its metrics, in ``step_metrics.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch

from anchored_megatron.anchor import fused_passes
from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir
from anchored_megatron.config import RunConfig
from anchored_megatron.data import EpochSampler, build_sft_dataset, load_tokenizer
from anchored_megatron.models.builder import build_model_chunks
from anchored_megatron.planning.preflight import prepare_run, reference_model
from anchored_megatron.platform import initialize, shared_storage
from anchored_megatron.platform.collective_timeout import Watch
from anchored_megatron.platform.run_lock import hold_output_dir
from anchored_megatron.training import batches, frozen_cache, sharding, step_metrics
from anchored_megatron.training.evaluation import Evaluator
from anchored_megatron.training.forward_step import make_forward_step
from anchored_megatron.training.metrics_log import MetricsLog
from anchored_megatron.training.objectives import iteration_loss
from anchored_megatron.training.optim import build_optimizer, build_scheduler, reset_optimizer_state
from anchored_megatron.training.resume import Progress, RunCheckpoints
from anchored_megatron.training.roles import RoleStack, adjust_tensor_shapes_for, output_fusion
from anchored_megatron.training.run_files import TrainLog, write_run_config


class NonFiniteLossError(RuntimeError):
    pass


def _number(value, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


class Trainer:
    def __init__(self, cfg: RunConfig):
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        prepare_run(cfg, world_size)  # before any process group exists; completes the model from the student checkpoint
        self.cfg = cfg
        self.watch = Watch("train.collective_timeout_minutes", cfg.train.collective_timeout_minutes)  # names a timeout's step and phase

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.runtime = initialize(cfg.parallel, seed=cfg.seed, timeout_minutes=cfg.train.collective_timeout_minutes)
        self.is_logging_rank = self.runtime.rank == 0  # metrics are all-reduced, so every rank holds them
        # Before anything heavy: a second launch into a directory in use stops here, on every rank.
        self.output_lock = hold_output_dir(cfg.output_dir)
        self.train_log = None
        try:
            # Before anything is written: every node must see this output_dir and the same input checkpoints.
            shared_storage.check_output_dir(cfg.output_dir)
            shared_storage.check_same_checkpoints({option: path for option, path in (("student.checkpoint", cfg.student.checkpoint),
                                                   ("reference.checkpoint", cfg.reference.checkpoint)) if path}, resolve_checkpoint_dir)
            self.train_log = TrainLog(cfg.output_dir) if self.is_logging_rank else None
            with self._printing(), self.watch.reporting():
                self._setup_run()
        except BaseException:
            self._close()
            raise

    def _setup_run(self) -> None:
        cfg = self.cfg
        self._load_data()
        anchor = cfg.anchor
        self.steps_per_iteration = self.sampler.steps_per_epoch * anchor.epochs_per_iteration
        self.total_steps = self.steps_per_iteration * anchor.outer_iterations
        # max_steps stops the run early without changing the schedule (LR, outer iterations) it follows.
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self._build_roles()
        self.evaluator = Evaluator(cfg, self.runtime, self.tokenizer, self.wrapped, self.sharding,
                                   message=lambda line: self.log.message(line)) if cfg.eval.enabled else None
        self.checkpoints = RunCheckpoints(
            cfg, self.runtime, self.sharding, self.wrapped, self.optimizer, self.frozen, (self.sampler, self.replay_sampler),
            self.steps_per_iteration, message=lambda line: self.log.message(line),
        )

    def _load_data(self) -> None:
        """This rank's gold data (and replay data, ``data.replay_paths``) and their samplers."""
        from megatron.core import parallel_state

        cfg, runtime = self.cfg, self.runtime
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)  # prepare_run checked it against the model and checkpoints
        build = lambda data: build_sft_dataset(  # noqa: E731
            data, self.tokenizer, cfg.model.seq_length, seed=cfg.seed,
            rank=runtime.rank, world_size=runtime.world_size, barrier=torch.distributed.barrier,
        )
        self.dataset = build(cfg.data)
        gold_microbatches = cfg.train.num_microbatches(runtime.data_parallel_size)
        placement = dict(dp_rank=parallel_state.get_data_parallel_rank(), dp_size=runtime.data_parallel_size,
                         micro_batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle)
        self.sampler = EpochSampler(len(self.dataset), seed=cfg.seed, num_microbatches=gold_microbatches, **placement)
        self.sources = [batches.Source(self.dataset, self.sampler)]
        self.replay_dataset = self.replay_sampler = None
        replay_microbatches = 0
        if cfg.data.replay_paths:
            self.replay_dataset = build(dataclasses.replace(cfg.data, paths=list(cfg.data.replay_paths), weights=None,
                                                            replay_paths=[], replay_fraction=0.0))
            replay_microbatches = cfg.data.replay_microbatches(gold_microbatches)
            # Its own order (seed + 1) and epochs: the replay data cycles independently of the gold epochs.
            self.replay_sampler = EpochSampler(len(self.replay_dataset), seed=cfg.seed + 1, num_microbatches=replay_microbatches, **placement)
            self.sources.append(batches.Source(self.replay_dataset, self.replay_sampler, replay=True))
        self.num_microbatches = gold_microbatches + replay_microbatches

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
        """The student (wrapped by ``self.sharding``), the frozen roles, the stacks Megatron's
        schedule runs, and the optimizer with its LR schedule."""
        from megatron.core.distributed import finalize_model_grads

        cfg = self.cfg
        self.sharding = sharding.choose(cfg)
        # loss_func returns (sum, tokens): a true per-token mean. Set at construction: MoE routers
        # read it there to scale their load-balancing loss to that convention.
        self.student = build_model_chunks(cfg.model, cfg.parallel, calculate_per_token_loss=True)
        config = self.student[0].config
        self.wrapped = self.sharding.wrap(self.student)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [m.no_sync for m in self.wrapped] if len(self.wrapped) > 1 else self.wrapped[0].no_sync
        # The reference may have an MLP of its own (a dense teacher for a MoE student, or the reverse).
        self.frozen = {name: self.sharding.frozen(build_model_chunks(reference_model(cfg) if name == "reference" else cfg.model, cfg.parallel))
                       for name in cfg.anchor.frozen_roles}
        self.reference, self.snapshot, self.base = (self.frozen.get(name) for name in ("reference", "snapshot", "base"))
        self.frozen_names = list(self.frozen)
        self.frozen_cache = None
        if cfg.train.frozen_hidden_cache:
            lengths = [len(dataset) for dataset in (self.dataset, self.replay_dataset) if dataset is not None]
            self.frozen_cache, self.frozen_cache_note = frozen_cache.for_run(cfg, self.frozen_names, lengths, self.runtime.data_parallel_size)
        self.stacks = [RoleStack(self.wrapped[i], [role[i] for role in self.frozen.values()], output_fusion(cfg.model), self.frozen_cache)
                       for i in range(len(self.wrapped))]
        self.num_roles = 1 + len(self.frozen)
        steps = self.steps_per_iteration if cfg.anchor.reset_optimizer_per_iteration else self.total_steps
        self.optimizer, self.scheduler = build_optimizer(self.wrapped, cfg.optim, config.params_dtype, steps)
        if self.optimizer.config.fp16:
            config.grad_scale_func = self.optimizer.scale_loss

    # ---- checkpoints (resume.py) ----------------------------------------------------------------
    def _load_initial_weights(self) -> Progress:
        """Resume from our own latest checkpoint, else start from the student checkpoint; the
        reference and the base are always re-loaded from their own checkpoints (the reference
        must be the one the run was trained with)."""
        capture = self.evaluator.capture_base if self.evaluator is not None else None
        return self.checkpoints.load_initial(self.scheduler, with_start_weights=capture)

    def _save(self, progress: Progress, evaluation: dict | None = None) -> str:
        """The checkpoint of ``progress.step`` (with ``evaluation``, the record of the evaluation
        at that step); returns its path."""
        return self.checkpoints.save(progress, self.scheduler, evaluation)

    # ---- evaluation (evaluation.py) -------------------------------------------------------------
    def _should_evaluate(self, step: int) -> bool:
        if self.evaluator is None:
            return False
        interval = self.cfg.eval.interval
        return step == self.stop_step or step % self.steps_per_iteration == 0 or (interval > 0 and step % interval == 0)

    def _evaluate(self, step: int) -> dict:
        self.watch.phase = "an evaluation"
        record = self.evaluator.evaluate(step)
        self.log.log_eval(record, self.evaluator.line(record))
        return record

    # ---- outer iterations -------------------------------------------------------------------
    def _begin_iteration(self, iteration: int, progress: Progress) -> None:
        """At a boundary: snapshot <- student (kept on disk for mid-iteration resumes), and
        a fresh optimizer + schedule when configured."""
        anchor = self.cfg.anchor
        events = [f"alpha {iteration_loss(anchor, iteration).alpha:g}"] if anchor.objective == "anchored" else []
        if self.snapshot is not None:
            self.sharding.copy_student_to(self.snapshot)
            if self.frozen_cache is not None:
                self.frozen_cache.clear(self.frozen_names.index("snapshot"))
            self.checkpoints.save_snapshot(iteration)
            events.append("snapshot refreshed from the student")
        if anchor.reset_optimizer_per_iteration and iteration != progress.optimizer_iteration:
            reset_optimizer_state(self.optimizer)
            self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.steps_per_iteration)
            progress.optimizer_iteration = iteration
            events.append("optimizer state and LR schedule reset")
        self.log.message(f"outer iteration {iteration + 1}/{anchor.outer_iterations} from step {progress.step}"
                         + (": " + ", ".join(events) if events else ""))

    # ---- one step ---------------------------------------------------------------------------
    def _microbatches(self) -> list[dict]:
        return batches.step_microbatches(self.sources, self.runtime.device, self.frozen_cache)

    def _train_step(self, forward_step) -> dict:
        """One update: the schedule over every microbatch, one all-reduce of the metrics, then the
        optimizer step unless the loss was not finite; returns the step's metrics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        microbatches = self._microbatches()
        for model in self.wrapped:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(microbatches) for _ in self.stacks]
        pipelined = cfg.parallel.pp > 1
        self.watch.phase = "the pipeline schedule's forward/backward and gradient reduce"
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.stacks if len(self.stacks) > 1 else self.stacks[0],
            num_microbatches=self.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            adjust_tensor_shapes_fn=adjust_tensor_shapes_for(self.num_roles) if pipelined and self.num_roles > 1 else None,
        )
        self.watch.phase = "the metrics all-reduce"
        sums = step_metrics.reduce_sums(outputs, cfg.model, cfg.parallel.sequence_parallel, self.runtime.data_parallel_size,
                                        self.num_microbatches, self.runtime.device)
        finite = sums.finite
        grad_norm = float("nan")
        lr = self.optimizer.param_groups[0]["lr"]  # what this update uses; the scheduler then moves on
        if finite:
            self.watch.phase = "the optimizer step"
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        record = sums.metrics(step_metrics.metric_names(cfg.anchor))
        record.update(grad_norm=float(grad_norm) if grad_norm is not None else None, finite=finite, lr=lr)
        if self.frozen_cache is not None:
            record["frozen_cached"] = batches.cached_share(microbatches)
        if self.replay_sampler is not None:
            record.update(sums.replay_metrics())
        return record

    # ---- the main loop -----------------------------------------------------------------------
    def run(self) -> dict:
        try:
            with self._printing(), self.watch.reporting():
                return self._train()
        finally:
            self._close()

    def _train(self) -> dict:
        cfg = self.cfg
        self._open_log()
        self.watch.phase = "loading the checkpoints"
        progress = self._load_initial_weights()
        self.log.start(progress.step, self.stop_step)
        if self.evaluator is not None and progress.step == 0 and cfg.eval.at_start:
            self._evaluate(0)  # the base's own figures (a resume already logged them)
        first_step, loop_started, saved = progress.step, time.perf_counter(), None
        current = {"loss": iteration_loss(cfg.anchor, progress.step // self.steps_per_iteration, progress.step, self.total_steps)}
        forward_step = make_forward_step(lambda: current["loss"], cfg.model.vocab_size)
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        last = {}
        while progress.step < self.stop_step:
            self.watch.step, self.watch.phase = progress.step + 1, "the outer iteration's start"
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
            evaluation = self._evaluate(progress.step) if self._should_evaluate(progress.step) else None
            # keep_best compares evaluated checkpoints: every evaluation is followed by a save.
            if self._should_save(progress.step) or (evaluation is not None and cfg.train.keep_best is not None):
                self.watch.phase = "a checkpoint save"
                saved = self._save(progress, evaluation)
        self.log.close()
        self.log.message(self._summary(first_step, progress.step, time.perf_counter() - loop_started, last, saved))
        return last

    def _open_log(self) -> None:
        """metrics.jsonl (and tensorboard, the progress bar), then the run's first lines."""
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


def train(cfg: RunConfig) -> dict:
    """Run a whole training job in this process (one rank of a torchrun launch)."""
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.run()
