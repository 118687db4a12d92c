"""Saving and resuming a run: the trainer's own checkpoints (``output_dir/checkpoints``) and the
snapshots that a resume inside an outer iteration needs (``output_dir/snapshots``).

A checkpoint holds the student, its optimizer, ``Progress`` (plain values: step, sampler
positions, LR schedule), the reference's identity and each rank's RNG streams. A resume refuses,
before any tensor is read, a run whose LR schedule or reference changed; the RNG streams come back
only on the layout that saved them. The frozen roles are never in a checkpoint: the reference
and the base are loaded from their own, the snapshot from the one kept for its iteration.
"""

from __future__ import annotations

import dataclasses
import os
import random

import torch

from anchored_megatron.checkpoint import trainer_io as ckpt
from anchored_megatron.checkpoint.best import best_checkpoint, write_eval_record
from anchored_megatron.checkpoint.dirs import checkpoint_name, iterations, latest_checkpoint, resolve_checkpoint_dir
from anchored_megatron.checkpoint.manifest import metadata_digest
from anchored_megatron.checkpoint.model_config import write_trainer_model_config
from anchored_megatron.checkpoint.weights import load_megatron_weights
from anchored_megatron.config import ConfigError, RunConfig
from anchored_megatron.training.optim import check_resumed_schedule, load_scheduler_state


@dataclasses.dataclass
class Progress:
    """Everything (besides weights and optimizer) a resumed run needs; plain values only."""

    step: int = 0
    nonfinite_in_a_row: int = 0
    sampler: dict | None = None
    replay_sampler: dict | None = None
    scheduler: dict | None = None
    optimizer_iteration: int = 0  # the iteration the optimizer/scheduler state belongs to


class RunCheckpoints:
    """One run's saves and loads. ``student``: the wrapped student chunks; ``frozen``: the frozen
    roles' chunks by name; ``samplers``: the gold data's and the replay data's (None without
    replay); ``sharding``: how the weights are held (``sharding.choose``); ``message(line)``
    prints a line on the logging rank. The LR scheduler is passed per call: a run that resets
    its optimizer per iteration builds a new one at each boundary."""

    def __init__(self, cfg: RunConfig, runtime, sharding, student: list, optimizer, frozen: dict, samplers: tuple,
                 steps_per_iteration: int, message):
        self.cfg, self.runtime, self.sharding = cfg, runtime, sharding
        self.student, self.optimizer, self.frozen = student, optimizer, frozen
        self.sampler, self.replay_sampler = samplers
        self.steps_per_iteration = steps_per_iteration
        self.message = message
        self.root = os.path.join(cfg.output_dir, "checkpoints")
        self.snapshot_root = os.path.join(cfg.output_dir, "snapshots")
        self.reference_identity = None

    # ---- the start of a run -------------------------------------------------------------------
    def load_initial(self, scheduler, with_start_weights=None) -> Progress:
        """Resume from the run's latest checkpoint, else start from ``student.checkpoint``; the
        reference and the base are always loaded from their own checkpoints (the reference must
        be the one the run was trained with). ``with_start_weights()`` runs while the student
        holds its starting weights (the base), on a resume too: they are loaded for it first."""
        cfg = self.cfg
        reference, base = self.frozen.get("reference"), self.frozen.get("base")
        self.reference_identity = self._reference_identity()
        if reference is not None and not cfg.reference.checkpoint:
            self.sharding.copy_student_to(reference)  # random-init runs (tests): reference = the initial student
        latest = latest_checkpoint(self.root) if os.path.isdir(self.root) else None
        if latest is not None and with_start_weights is not None:
            if not cfg.student.checkpoint:
                raise ConfigError("eval.general_paths: a resumed run reads the base for the KL to the base from "
                                  "student.checkpoint, and this run started from random weights; evaluate without eval.general_paths")
            self._load_start_weights()
            with_start_weights()
        progress = self._resume(latest, scheduler) if latest is not None else None
        if reference is not None and cfg.reference.checkpoint:
            self._load_weights(reference, cfg.reference.checkpoint, "reference.checkpoint")
        if base is not None:  # the KL term's base: the student's starting point, resume or not
            self._load_weights(base, cfg.student.checkpoint, "student.checkpoint")
        if progress is not None:
            return progress
        self._load_start_weights()
        if with_start_weights is not None:
            with_start_weights()
        return Progress()

    def _load_start_weights(self) -> None:
        if self.cfg.student.checkpoint:
            self._load_weights(self.student, self.cfg.student.checkpoint, "student.checkpoint")
            self.sharding.after_student_load(self.optimizer)

    def _load_weights(self, chunks: list, path: str, key: str) -> None:
        with self.sharding.whole_weights(chunks, write=True):
            load_megatron_weights(chunks, resolve_checkpoint_dir(path, key), self.cfg.train.verify_checkpoint_checksums)

    def _resume(self, latest: str, scheduler) -> Progress:
        optimizer = self.sharding.checkpointed_optimizer(self.optimizer)
        with self.sharding.whole_weights(self.student, write=True):
            state = ckpt.load_checkpoint(
                latest, self.student, optimizer, rank_state_loader=self._restore_rank_state,
                checksums=self.cfg.train.verify_checkpoint_checksums,
                check_common=lambda common: self._check_resume(common, latest, scheduler), message=self.message,
            )
        self.sharding.after_resume(optimizer)
        progress = self._restore_progress(state["progress"], latest, scheduler)
        if "snapshot" in self.frozen and progress.step % self.steps_per_iteration != 0:
            self._reload_snapshot(progress.step)
        self.message(f"resumed from {latest} at step {progress.step}")
        return progress

    def _restore_progress(self, stored: dict, latest: str, scheduler) -> Progress:
        """The samplers and the LR schedule where the saved run left them."""
        stored = dict(stored)
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
        load_scheduler_state(scheduler, progress.scheduler)
        return progress

    def _reload_snapshot(self, step: int) -> None:
        """A resume inside an outer iteration: the snapshot as that iteration started with it."""
        iteration = step // self.steps_per_iteration
        snapshot = self.frozen["snapshot"]
        with self.sharding.whole_weights(snapshot, write=True):
            ckpt.load_checkpoint(
                os.path.join(self.snapshot_root, checkpoint_name(iteration)), snapshot, checksums=self.cfg.train.verify_checkpoint_checksums,
                advice=f"The snapshot of outer iteration {iteration} is needed to resume at step {step}: resume from a "
                f"checkpoint saved before that iteration (anchored-checkpoint list {self.root}, then anchored-checkpoint use).",
                message=self.message,
            )

    # ---- what a resume must find again -------------------------------------------------------
    def _reference_identity(self) -> dict | None:
        """The reference as a resumed run must find it again: resolved path + metadata digest
        (computed on rank 0: the metadata of a large checkpoint is tens of MB)."""
        cfg = self.cfg
        if "reference" not in self.frozen or not cfg.reference.checkpoint:
            return None
        identity = None
        if self.runtime.rank == 0:
            directory = os.path.realpath(resolve_checkpoint_dir(cfg.reference.checkpoint, "reference.checkpoint"))
            identity = {"path": directory, "digest": metadata_digest(directory)}
        box = [identity]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _check_resume(self, common: dict, checkpoint: str, scheduler) -> None:
        """Before any tensor is read: the resumed run must train as the saved one did."""
        check_resumed_schedule(scheduler, common["progress"]["scheduler"], checkpoint)
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
        self.message(f"train.allow_reference_change: resuming with another reference: {change}")

    # ---- saves -------------------------------------------------------------------------------
    def save(self, progress: Progress, scheduler, evaluation: dict | None = None) -> str:
        """The checkpoint of ``progress.step``, published atomically (with ``evaluation``, that
        step's eval record as its ``eval.json``); then the older ones pruned, except the best
        evaluated one under ``train.keep_best``."""
        progress.sampler = self.sampler.state_dict()
        progress.replay_sampler = None if self.replay_sampler is None else self.replay_sampler.state_dict()
        progress.scheduler = scheduler.state_dict()
        common = {"progress": dataclasses.asdict(progress), "layout": self._layout(), "reference": self.reference_identity}
        with self.sharding.whole_weights(self.student):
            path = ckpt.save_checkpoint(
                self.root, progress.step, self.student, self.sharding.checkpointed_optimizer(self.optimizer), common,
                rank_state=self._rank_state(),
                add_files=lambda directory: self._add_files(directory, evaluation),
            )
        if self.runtime.rank == 0:
            train = self.cfg.train
            best = None if train.keep_best is None else best_checkpoint(self.root, train.keep_best, train.keep_best_max_general_kl)
            ckpt.prune(self.root, keep=train.keep_checkpoints, protect=() if best is None else (best,))
            if "snapshot" in self.frozen:
                # A snapshot is needed while any kept checkpoint lies inside its iteration.
                oldest = min(iterations(self.root))
                ckpt.prune_below(self.snapshot_root, oldest // self.steps_per_iteration)
        torch.distributed.barrier()
        self.message(f"saved checkpoint {os.path.basename(path)} -> {path}")
        return path

    def _add_files(self, directory: str, evaluation: dict | None) -> None:
        write_trainer_model_config(directory, self.cfg.model, self.cfg.student.checkpoint)
        if evaluation is not None:
            write_eval_record(directory, evaluation)

    def save_snapshot(self, iteration: int) -> None:
        """The snapshot just refreshed for outer iteration ``iteration``, kept for resumes inside it."""
        snapshot = self.frozen["snapshot"]
        with self.sharding.whole_weights(snapshot):
            ckpt.save_checkpoint(self.snapshot_root, iteration, snapshot)

    # ---- each rank's RNG streams ---------------------------------------------------------------
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


def _describe_reference(identity: dict | None) -> str:
    return "no reference checkpoint" if identity is None else f"{identity['path']} (metadata digest {identity['digest']})"
