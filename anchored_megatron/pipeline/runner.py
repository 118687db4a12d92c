"""Run the staged experiment: data in the parent, every stage on the same gloo ranks.

All stages of one experiment run inside ONE launch of ``tp`` ranks (``platform.initialize``
re-initialises Megatron's parallel state per trainer), which saves the ~10 s start-up of
each launch. A stage whose ``stage.json`` holds its current key is reused, and so is its
``eval.json``; anything else in its directory is removed and the stage re-runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time

from anchored_megatron.data.synthetic import (
    RegimeData, eval_prompts, finetune_records, pretrain_records, train_char_tokenizer, write_jsonl,
)
from anchored_megatron.pipeline.stages import ExperimentConfig, StageSpec, plan

STAGE_FILE = "stage.json"
EVAL_FILE = "eval.json"


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
    with open(paths["eval"], "w", encoding="utf-8") as fh:
        json.dump(eval_prompts(data, cfg.seed, exclude=seen), fh)
    return paths


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1)
    os.replace(tmp, path)


def _train_stage(stage: StageSpec, rank: int) -> dict:
    """Train (or reuse) one stage; returns its stage.json content."""
    import torch

    from anchored_megatron.config import build, RunConfig
    from anchored_megatron.training.trainer import Trainer

    out = stage.run["output_dir"]
    record = _read_json(os.path.join(out, STAGE_FILE))
    if record is not None and record.get("key") == stage.key:
        return record
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # everyone has read the old stage.json before rank 0 clears it
    if rank == 0 and os.path.isdir(out):
        shutil.rmtree(out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    cfg = build(RunConfig, json.loads(json.dumps(stage.run)))
    trainer = Trainer(cfg)
    trainer.setup()
    steps_per_epoch = trainer.sampler.steps_per_epoch
    if stage.eval_every_epochs:
        # Keep a checkpoint every eval interval: set after setup, once steps/epoch is known.
        trainer.cfg.train.save_interval = steps_per_epoch * stage.eval_every_epochs
    if rank == 0:
        print(f"[{stage.name}] {trainer.total_steps} steps ({steps_per_epoch}/epoch), objective {cfg.anchor.objective}", file=sys.stderr, flush=True)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    # The trainer copies its lines into out/train.log itself; the demo's console shows stages only.
    with open(os.devnull, "w", encoding="utf-8") as quiet, contextlib.redirect_stdout(quiet):
        trainer.run()
    record = {"key": stage.key, "steps_per_epoch": steps_per_epoch, "total_steps": trainer.total_steps,
              "train_seconds": round(time.perf_counter() - started, 1)}
    if rank == 0:
        _write_json(os.path.join(out, STAGE_FILE), record)
    torch.distributed.barrier()
    return record


def _checkpoints(out: str) -> list[tuple[int, str]]:
    root = os.path.join(out, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)):
        if name.startswith("iter_") and not name.endswith(".tmp"):
            found.append((int(name[len("iter_"):]), os.path.join(root, name)))
    return found


def _evaluate_stage(stage: StageSpec, record: dict, prompts: dict, tokenizer, rank: int, eval_cfg: dict) -> dict:
    import torch

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.convert import load_megatron_weights
    from anchored_megatron.eval import evaluate_chunks
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    out = stage.run["output_dir"]
    cached = _read_json(os.path.join(out, EVAL_FILE))
    if cached is not None and cached.get("key") == stage.key and cached.get("eval") == eval_cfg:
        return cached
    parallel = ParallelConfig(**stage.run["parallel"])
    initialize(parallel, seed=0)
    model = ModelConfig(**stage.run["model"])
    chunks = build_model_chunks(model, parallel)
    checkpoints = _checkpoints(out)
    if not stage.eval_every_epochs:
        checkpoints = checkpoints[-1:]
    points = []
    started = time.perf_counter()
    for step, path in checkpoints:
        load_megatron_weights(chunks, path)
        result = evaluate_chunks(chunks, tokenizer, prompts, vocab_size=model.vocab_size, max_length=model.seq_length,
                                 max_new_tokens=eval_cfg["max_new_tokens"], batch_size=eval_cfg["batch_size"], entropy=stage.entropy)
        result.update(step=step, epoch=step / record["steps_per_epoch"])
        points.append(result)
        if rank == 0:
            acc = result["accuracy"]
            print(f"[{stage.name}] epoch {result['epoch']:.0f}: target {acc['target']:.3f}, "
                  + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "target"), file=sys.stderr, flush=True)
    value = {"key": stage.key, "eval": eval_cfg, "points": points, "eval_seconds": round(time.perf_counter() - started, 1)}
    if rank == 0:
        _write_json(os.path.join(out, EVAL_FILE), value)
    torch.distributed.barrier()
    return value


def run_stages_on_rank(stages: list[dict], eval_path: str, tokenizer_path: str, eval_cfg: dict) -> dict:
    """Executed on every rank of the launch: train and evaluate each stage in order."""
    from anchored_megatron.data import load_tokenizer

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = load_tokenizer(tokenizer_path)
    with open(eval_path, encoding="utf-8") as fh:
        prompts = json.load(fh)
    results = {}
    for raw in stages:
        stage = StageSpec(**raw)
        record = _train_stage(stage, rank)
        results[stage.name] = {"stage": record, **_evaluate_stage(stage, record, prompts, tokenizer, rank, eval_cfg)}
    return results if rank == 0 else {}


def run_experiment(cfg: ExperimentConfig, *, max_new_tokens: int = 64, eval_batch_size: int = 512, timeout: float = 7200.0) -> dict:
    """Prepare data, run every stage on ``cfg.tp`` gloo ranks (cached), return per-stage results."""
    from dataclasses import asdict

    from anchored_megatron.data import load_tokenizer
    from anchored_megatron.testing import run_on_ranks

    cfg.validate()
    os.makedirs(cfg.output_dir, exist_ok=True)
    paths = prepare_data(cfg)
    vocab_size = load_tokenizer(paths["tokenizer"]).vocab_size
    stages = plan(cfg, paths, vocab_size)
    eval_cfg = {"max_new_tokens": max_new_tokens, "batch_size": eval_batch_size, "eval_digest": _eval_digest(paths["eval"])}
    results = run_on_ranks(run_stages_on_rank, cfg.tp, [asdict(s) for s in stages], paths["eval"], paths["tokenizer"], eval_cfg,
                           timeout=timeout, threads=max(1, (os.cpu_count() or 2) // cfg.tp))
    return results[0]


def _eval_digest(path: str) -> str:
    from anchored_megatron.pipeline.stages import file_digest

    return file_digest(path)
