"""The forgetting study on a real pretrained model: its jobs, their run configs and cache keys.

Every method fine-tunes the same converted base (SmolLM2-135M-Instruct) on the same gold examples
of the target skill, with the same budget of T x K epochs, one checkpoint per epoch:

- ``teacher``: plain SFT of the base for ``teacher_epochs`` (the reference of distill and anchored);
- ``sft`` (its curve also gives early-stopped SFT), ``sft_kl`` and ``asft`` (reference = the base),
  ``distill`` (alpha 1 toward the teacher), ``anchored`` (alpha, snapshot anchor, T outer
  iterations of K epochs), ``anchored_replay`` (anchored, with the base's own greedy answers to
  general prompts as replay records: self-generated, no outside data) and its control
  ``sft_replay`` (the same replay records trained by CE: rehearsal without the trust region);
- ``wise_ft_r0.5``: no training, the base and the final SFT checkpoint averaged in weight space.

A seed sets the trainer's data order and the replay draw; the gold examples, the held-out items and
the retention suite are the same for every seed. A job's key hashes its run config with the paths
replaced by the digests of what they hold and its dependencies by their keys, so a job re-runs
exactly when something it depends on changed, and an interrupted study resumes job by job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from anchored_megatron.experiment.jobs import WISE_FT_PREFIX, TrainedJob, file_digest

REAL_METHODS = ("sft", "sft_kl", "distill", "anchored", "anchored_replay", "sft_replay", "asft", "wise_ft_r0.5")
TEACHER = "teacher"
BASE = "base"  # the converted pretrained model: every job's start, and the reference of sft_kl and asft


@dataclass
class RealStudyConfig:
    output_dir: str
    seed: int = 0
    skill: str = "reverse_words"
    train_examples: int = 64
    seq_length: int = 64
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 5e-5
    teacher_epochs: int = 4
    outer_iterations: int = 3  # T; every method's budget is T x K epochs
    epochs_per_iteration: int = 3  # K
    alpha: float = 0.5
    kl_weight: float = 0.1  # sft_kl's and asft's KL(p_base || p_theta) weight, as in the small study
    replay_fraction: float = 0.5  # as many replay sequences as gold ones in every step
    eval_max_sequences: int = 64  # of each held-out set, for the trainer's own evaluation
    methods: tuple[str, ...] = REAL_METHODS

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in REAL_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown} (known: {', '.join(REAL_METHODS)})")
        if "wise_ft_r0.5" in self.methods and "sft" not in self.methods:
            raise ValueError("methods: wise_ft_r0.5 merges the base with the final sft checkpoint: list sft too")
        for name in ("train_examples", "seq_length", "micro_batch_size", "global_batch_size", "teacher_epochs",
                     "outer_iterations", "epochs_per_iteration", "eval_max_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        if self.train_examples % self.global_batch_size:
            # Whole steps per epoch: an epoch's checkpoint is then an epoch of the gold data exactly.
            raise ValueError(f"train_examples={self.train_examples} is not a multiple of global_batch_size={self.global_batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return self.train_examples // self.global_batch_size


@dataclass
class RealJob:
    name: str
    run: dict  # the RunConfig as a dict (written as the job's run.yaml)
    depends: dict = field(default_factory=dict)  # role ("reference") -> job name
    every_epoch: bool = True  # evaluate every epoch's checkpoint (else the final one only)
    merge: dict | None = None  # WiSE-FT: {"finetuned": job, "ratio": r}; no training
    key: str = ""


def trained_methods(cfg: RealStudyConfig) -> dict[str, TrainedJob]:
    """The teacher and every trained method, by name (the small study's TrainedJob: objective,
    T, K, reference and anchor options)."""
    T, K = cfg.outer_iterations, cfg.epochs_per_iteration
    budget = T * K
    anchored = dict(objective="anchored", outer_iterations=T, epochs_per_iteration=K, reference=TEACHER,
                    alpha=cfg.alpha, source="snapshot")
    jobs = [
        TrainedJob(TEACHER, "sft", 1, cfg.teacher_epochs),
        TrainedJob("sft", "sft", 1, budget),
        TrainedJob("sft_kl", "sft_kl", 1, budget, reference=BASE, kl_weight=cfg.kl_weight),
        TrainedJob("distill", "distill", 1, budget, reference=TEACHER),
        TrainedJob("anchored", **anchored),
        TrainedJob("anchored_replay", replay=True, **anchored),
        TrainedJob("sft_replay", "sft", 1, budget, replay=True),
        TrainedJob("asft", "asft", 1, budget, reference=BASE, kl_weight=cfg.kl_weight),
    ]
    return {job.name: job for job in jobs}


def seed_dir(cfg: RealStudyConfig) -> str:
    return os.path.join(cfg.output_dir, f"seed{cfg.seed}")


def job_dir(cfg: RealStudyConfig, name: str) -> str:
    return os.path.join(seed_dir(cfg), name)


def _run_dict(cfg: RealStudyConfig, paths: dict, job: TrainedJob) -> dict:
    """``paths``: base (the converted Megatron checkpoint), hf (its Hugging Face directory: the
    tokenizer), train, heldout, general_eval, replay (JSONL files)."""
    steps = cfg.steps_per_epoch
    if job.reference is None:
        reference = None
    else:
        reference = paths["base"] if job.reference == BASE else job_dir(cfg, job.reference)
    replay = {"replay_paths": [paths["replay"]], "replay_fraction": cfg.replay_fraction} if job.replay else {}
    return {
        "output_dir": job_dir(cfg, job.name),
        "seed": cfg.seed,
        "parallel": {"tp": 1, "pp": 1},
        "model": {"seq_length": cfg.seq_length},
        "student": {"checkpoint": paths["base"]},
        "reference": {"checkpoint": reference},
        # The base's general answers run past seq_length: their first tokens are what is trained / evaluated.
        "data": {"paths": [paths["train"]], "tokenizer": paths["hf"], "packing": False, "truncate": True, **replay},
        "anchor": job.anchor(),
        "optim": {"lr": cfg.lr, "lr_schedule": "constant", "warmup_fraction": 0.0},
        "eval": {"paths": [paths["heldout"]], "general_paths": [paths["general_eval"]], "interval": steps,
                 "max_sequences": cfg.eval_max_sequences},
        "train": {"micro_batch_size": cfg.micro_batch_size, "global_batch_size": cfg.global_batch_size,
                  "save_interval": steps, "keep_checkpoints": 1000, "frozen_hidden_cache": job.reference is not None,
                  "progress_bar": False, "tensorboard": False},
    }


def plan(cfg: RealStudyConfig, paths: dict) -> list[RealJob]:
    """The seed's jobs in run order, keyed."""
    cfg.validate()
    specs = trained_methods(cfg)
    jobs = [RealJob(TEACHER, _run_dict(cfg, paths, specs[TEACHER]), every_epoch=False)]
    for name in cfg.methods:
        if name.startswith(WISE_FT_PREFIX):
            sft = next(j for j in jobs if j.name == "sft")
            jobs.append(RealJob(name, dict(sft.run, output_dir=job_dir(cfg, name)), every_epoch=False,
                                merge={"finetuned": "sft", "ratio": float(name[len(WISE_FT_PREFIX):])}))
            continue
        spec = specs[name]
        depends = {"reference": spec.reference} if spec.reference not in (None, BASE) else {}
        jobs.append(RealJob(name, _run_dict(cfg, paths, spec), depends))
    _assign_keys(jobs, paths)
    return jobs


def _assign_keys(jobs: list[RealJob], paths: dict) -> None:
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = file_digest(path)
        return digests[path]

    # What a path stands for: a data file by its content; the base by the digest the fetch recorded
    # (paths["base_digest"]); another job's output by that job's key.
    keys: dict[str, str] = {}
    for job in jobs:
        if job.merge is not None:
            spec = {"merge": {"ratio": job.merge["ratio"], "finetuned": keys[job.merge["finetuned"]], "base": paths["base_digest"]}}
        else:
            run = json.loads(json.dumps(job.run))
            run.pop("output_dir")
            run["student"]["checkpoint"] = paths["base_digest"]
            reference = run["reference"]["checkpoint"]
            if reference == paths["base"]:
                run["reference"]["checkpoint"] = paths["base_digest"]
            elif reference is not None:
                run["reference"]["checkpoint"] = keys[job.depends["reference"]]
            run["data"]["tokenizer"] = paths["base_digest"]
            for name in ("paths", "replay_paths"):
                if name in run["data"]:
                    run["data"][name] = [digest(p) for p in run["data"][name]]
            run["eval"]["paths"] = [digest(p) for p in run["eval"]["paths"]]
            run["eval"]["general_paths"] = [digest(p) for p in run["eval"]["general_paths"]]
            spec = {"run": run, "every_epoch": job.every_epoch}
        job.key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        keys[job.name] = job.key
