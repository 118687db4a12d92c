"""Run the forgetting experiment: data in the parent, every job on the same gloo ranks.

All jobs of one experiment run inside ONE launch of ``tp`` ranks (``platform.initialize``
re-initialises Megatron's parallel state per trainer), so the launch's start-up is paid once.
A job whose ``job.json`` holds its current key is reused, and so is its ``eval.json``;
anything else in its directory is removed and the job re-runs.

Output directories written when jobs were called stages (``stages/<name>/stage.json``) are
moved to ``jobs/<name>/job.json`` on the next run; their keys are unchanged, so they are reused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time

from anchored_megatron.data.synthetic import (
    RegimeData, eval_prompts, finetune_records, pretrain_records, replay_records, train_char_tokenizer, write_jsonl,
)
from anchored_megatron.experiment.jobs import JOBS_DIR, ExperimentConfig, JobSpec, file_digest, plan
from anchored_megatron.platform.files import write_atomically

JOB_FILE = "job.json"
EVAL_FILE = "eval.json"
# Where versions that called jobs "stages" kept them.
_STAGES_DIR, _STAGE_FILE = "stages", "stage.json"


def regime_data(cfg: ExperimentConfig) -> RegimeData:
    return RegimeData(regime=cfg.regime, skills=tuple(cfg.skills), pretrain_per_skill=cfg.pretrain_per_skill,
                      finetune_examples=cfg.finetune_examples, eval_per_skill=cfg.eval_per_skill,
                      target_min_steps=cfg.target_min_steps, target_max_steps=cfg.target_max_steps)


def prepare_data(cfg: ExperimentConfig) -> dict:
    """Tokenizer, pretraining / fine-tuning JSONL and held-out prompts under output_dir/data."""
    data_dir = os.path.join(cfg.output_dir, "data")
    data = regime_data(cfg)
    tok_dir = train_char_tokenizer(os.path.join(data_dir, "tokenizer"))
    pretrain = pretrain_records(data, cfg.seed)
    finetune = finetune_records(data, cfg.seed)
    paths = {
        "tokenizer": tok_dir,
        "tokenizer_model": os.path.join(tok_dir, "tokenizer.model"),
        "pretrain": write_jsonl(pretrain, os.path.join(data_dir, f"pretrain_{cfg.regime}.jsonl")),
        "finetune": write_jsonl(finetune, os.path.join(data_dir, "finetune.jsonl")),
        "cache": os.path.join(data_dir, "cache"),
        "eval": os.path.join(data_dir, "eval.json"),
    }
    seen = {r["prompt"] for r in pretrain} | {r["prompt"] for r in finetune}
    held_out = eval_prompts(data, cfg.seed, exclude=seen)
    # Compact, as before: the file's digest is part of every job's evaluation cache key.
    write_atomically(paths["eval"], json.dumps(held_out))
    held_out_prompts = {p for prompts in held_out.values() for p in prompts}
    replay = replay_records(data, cfg.seed, cfg.finetune_examples, exclude=held_out_prompts)
    paths["replay"] = write_jsonl(replay, os.path.join(data_dir, f"replay_{cfg.regime}.jsonl"))
    return paths


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: str, value) -> None:
    write_atomically(path, json.dumps(value, indent=1))


def _barrier() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _run_config(job: JobSpec):
    from anchored_megatron.config import RunConfig, build

    return build(RunConfig, copy.deepcopy(job.run))


def _train_job(job: JobSpec, rank: int) -> dict:
    """Train (or reuse) one job; returns its job.json content."""
    from anchored_megatron.training.trainer import Trainer

    out = job.run["output_dir"]
    record = read_json(os.path.join(out, JOB_FILE))
    if record is not None and record.get("key") == job.key:
        if rank == 0:
            print(f"[{job.name}] trained earlier: reusing {out}", file=sys.stderr, flush=True)
        return record
    if job.merge is not None:
        raise RuntimeError(f"[{job.name}] the merged checkpoint is made before the ranks start (merge_job); {out} has none for key {job.key}")
    _barrier()  # everyone has read the old job.json before rank 0 clears the directory
    if rank == 0 and os.path.isdir(out):
        shutil.rmtree(out)
    _barrier()
    cfg = _run_config(job)
    if job.prefix_of is not None:
        # The same run (same schedule: max_steps only stops it), up to the end of its epoch N.
        full = read_json(os.path.join(job.prefix_of["output_dir"], JOB_FILE))
        cfg.train.max_steps = full["steps_per_epoch"] * job.stop_after_epochs
    trainer = Trainer(cfg)
    trainer.setup()
    steps_per_epoch = trainer.sampler.steps_per_epoch
    if job.eval_every_epochs:
        # Keep a checkpoint every eval interval: set after setup, once steps/epoch is known.
        trainer.cfg.train.save_interval = steps_per_epoch * job.eval_every_epochs
    if rank == 0:
        stop = f"the first {trainer.stop_step} of " if trainer.stop_step < trainer.total_steps else ""
        print(f"[{job.name}] {stop}{trainer.total_steps} steps ({steps_per_epoch}/epoch), objective {cfg.anchor.objective}", file=sys.stderr, flush=True)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    # The trainer copies its lines into out/train.log itself; the demo's console shows jobs only.
    with open(os.devnull, "w", encoding="utf-8") as quiet, contextlib.redirect_stdout(quiet):
        trainer.run()
    record = {"key": job.key, "steps_per_epoch": steps_per_epoch, "total_steps": trainer.total_steps,
              "train_seconds": round(time.perf_counter() - started, 1)}
    if rank == 0:
        write_json(os.path.join(out, JOB_FILE), record)
    _barrier()
    return record


def _evaluate_job(job: JobSpec, record: dict, prompts: dict, tokenizer, rank: int, eval_cfg: dict) -> dict:
    from anchored_megatron.checkpoint.dirs import RUN_CHECKPOINTS, checkpoint_name, iterations
    from anchored_megatron.checkpoint.weights import load_megatron_weights
    from anchored_megatron.eval import evaluate_chunks
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    out = job.run["output_dir"]
    cached = read_json(os.path.join(out, EVAL_FILE))
    if cached is not None and cached.get("key") == job.key and cached.get("eval") == eval_cfg:
        return cached
    cfg = _run_config(job)
    initialize(cfg.parallel, seed=0)
    chunks = build_model_chunks(cfg.model, cfg.parallel)
    root = os.path.join(out, RUN_CHECKPOINTS)
    steps = iterations(root)
    if not job.eval_every_epochs:
        steps = steps[-1:]
    points = []
    started = time.perf_counter()
    for step in steps:
        load_megatron_weights(chunks, os.path.join(root, checkpoint_name(step)))
        result = evaluate_chunks(chunks, tokenizer, prompts, vocab_size=cfg.model.vocab_size, max_length=cfg.model.seq_length,
                                 max_new_tokens=eval_cfg["max_new_tokens"], batch_size=eval_cfg["batch_size"], entropy=job.entropy)
        result.update(step=step, epoch=step / record["steps_per_epoch"])
        points.append(result)
        if rank == 0:
            acc = result["accuracy"]
            print(f"[{job.name}] epoch {result['epoch']:.0f}: target {acc['target']:.3f}, "
                  + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "target"), file=sys.stderr, flush=True)
    value = {"key": job.key, "eval": eval_cfg, "points": points, "eval_seconds": round(time.perf_counter() - started, 1)}
    if rank == 0:
        write_json(os.path.join(out, EVAL_FILE), value)
    _barrier()
    return value


def run_jobs_on_rank(jobs: list[dict], eval_path: str, tokenizer_path: str, eval_cfg: dict) -> dict:
    """Executed on every rank of the launch: train and evaluate each job in order.
    Returns (on rank 0) job name -> {"train": job.json content, **eval.json content}."""
    from anchored_megatron.data import load_tokenizer

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = load_tokenizer(tokenizer_path)
    with open(eval_path, encoding="utf-8") as fh:
        prompts = json.load(fh)
    results = {}
    for raw in jobs:
        job = JobSpec(**raw)
        record = _train_job(job, rank)
        results[job.name] = {"train": record, **_evaluate_job(job, record, prompts, tokenizer, rank, eval_cfg)}
    return results if rank == 0 else {}


def _adopt_stage_outputs(output_dir: str) -> None:
    """Move ``stages/<name>/stage.json`` (written when jobs were called stages) to
    ``jobs/<name>/job.json``, so that those jobs are reused rather than re-run."""
    old, new = os.path.join(output_dir, _STAGES_DIR), os.path.join(output_dir, JOBS_DIR)
    if not os.path.isdir(old):
        return
    if os.path.exists(new):
        print(f"{old}: outputs of an earlier version, unused because {new} exists; delete {old} to free its space",
              file=sys.stderr, flush=True)
        return
    for name in os.listdir(old):
        record = os.path.join(old, name, _STAGE_FILE)
        if os.path.isfile(record):
            os.replace(record, os.path.join(old, name, JOB_FILE))
    os.replace(old, new)
    print(f"moved the jobs of an earlier version from {old} to {new} (reused where their keys match)", file=sys.stderr, flush=True)


def prepare_jobs(cfg: ExperimentConfig, *, max_new_tokens: int = 64, eval_batch_size: int = 512) -> tuple[list[JobSpec], dict, dict]:
    """(jobs in run order, data paths, evaluation settings) for ``cfg``: the data written and
    outputs of an earlier layout moved, nothing trained."""
    from anchored_megatron.data import load_tokenizer

    cfg.validate()
    os.makedirs(cfg.output_dir, exist_ok=True)
    _adopt_stage_outputs(cfg.output_dir)
    paths = prepare_data(cfg)
    vocab_size = load_tokenizer(paths["tokenizer"]).vocab_size
    eval_cfg = {"max_new_tokens": max_new_tokens, "batch_size": eval_batch_size, "eval_digest": file_digest(paths["eval"])}
    return plan(cfg, paths, vocab_size), paths, eval_cfg


def merge_job(job: JobSpec) -> dict:
    """Make (or reuse) a merge job's one checkpoint, in this process: at the final step of the
    run it merges toward, so that its evaluation reads like that run's last point."""
    from anchored_megatron.checkpoint.dirs import RUN_CHECKPOINTS, checkpoint_name
    from anchored_megatron.convert.merge import merge_checkpoints

    out = job.run["output_dir"]
    record = read_json(os.path.join(out, JOB_FILE))
    if record is not None and record.get("key") == job.key:
        return record
    finetuned = read_json(os.path.join(job.merge["finetuned_dir"], JOB_FILE))
    if os.path.isdir(out):
        shutil.rmtree(out)
    started = time.perf_counter()
    target = os.path.join(out, RUN_CHECKPOINTS, checkpoint_name(finetuned["total_steps"]))
    merge_checkpoints(job.merge["base_dir"], job.merge["finetuned_dir"], target, job.merge["ratio"], show_progress=False)
    record = {"key": job.key, "steps_per_epoch": finetuned["steps_per_epoch"], "total_steps": finetuned["total_steps"],
              "train_seconds": round(time.perf_counter() - started, 1)}
    write_json(os.path.join(out, JOB_FILE), record)
    print(f"[{job.name}] merged: {job.merge['ratio']:g} of the way from {job.merge['base']} to {job.merge['finetuned']}", file=sys.stderr, flush=True)
    return record


def run_jobs(jobs: list[JobSpec], paths: dict, eval_cfg: dict, tp: int, timeout: float = 7200.0) -> dict:
    """Every job of ``jobs`` (cached) on ``tp`` gloo ranks; job name -> results. The trained jobs
    run in one launch; merge jobs are merged here afterwards and evaluated in a second."""
    from dataclasses import asdict

    from anchored_megatron.platform import run_on_ranks

    def launch(selected):
        # torch threads: the cores shared evenly, run_on_ranks' default
        return run_on_ranks(run_jobs_on_rank, tp, [asdict(j) for j in selected], paths["eval"], paths["tokenizer"], eval_cfg,
                            timeout=timeout)[0]

    merges = [j for j in jobs if j.merge is not None]
    results = launch([j for j in jobs if j.merge is None])
    if merges:
        for job in merges:
            merge_job(job)
        results.update(launch(merges))
    # Each result names the jobs it was trained from (its reference teacher, for the study's
    # teacher-tracking statistics).
    results = {j.name: {**results[j.name], "depends": dict(j.depends)} for j in jobs}
    return fold_prefix_jobs(jobs, results)


def _losses(output_dir: str) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (one record per step: a resumed run truncates it)."""
    from anchored_megatron.training.metrics_log import METRICS_FILE

    with open(os.path.join(output_dir, METRICS_FILE), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return {r["step"]: r["loss"] for r in records}


def fold_prefix_jobs(jobs: list[JobSpec], results: dict) -> dict:
    """Each prefix job's points moved into the curve of the job it re-ran the first epochs of
    (that job's entry gains ``early_points_from``; the prefix job's entry is dropped), after checking
    that it is that run: its per-step losses equal the full run's first ones (relative 1e-6)."""
    folded = dict(results)
    for job in jobs:
        if job.prefix_of is None:
            continue
        name, full_dir = job.prefix_of["name"], job.prefix_of["output_dir"]
        early, full = _losses(job.run["output_dir"]), _losses(full_dir)
        if not early or any(step not in full for step in early):
            raise RuntimeError(f"{job.run['output_dir']}: its steps {min(early, default=None)}-{max(early, default=None)} "
                               f"are not all among the steps of {full_dir}")
        for step, loss in sorted(early.items()):
            if abs(loss - full[step]) > 1e-6 * max(abs(full[step]), 1e-12):
                raise RuntimeError(f"{job.run['output_dir']} is not the start of {full_dir}: "
                                   f"the loss at step {step} is {loss!r} there, {full[step]!r} here")
        prefix = folded.pop(job.name)
        first = min(p["epoch"] for p in folded[name]["points"])
        points = [p for p in prefix["points"] if p["epoch"] < first] + folded[name]["points"]
        folded[name] = {**folded[name], "points": points, "early_points_from": job.name}
    return folded


def run_experiment(cfg: ExperimentConfig, *, max_new_tokens: int = 64, eval_batch_size: int = 512, timeout: float = 7200.0) -> dict:
    """Prepare data, run every job on ``cfg.tp`` gloo ranks (cached); job name -> results."""
    jobs, paths, eval_cfg = prepare_jobs(cfg, max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size)
    return run_jobs(jobs, paths, eval_cfg, cfg.tp, timeout)
