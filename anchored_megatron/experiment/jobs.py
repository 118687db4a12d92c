"""The forgetting experiment's jobs: which trainer runs, with which configs, in which order.

A job is one trainer run plus the evaluation of its checkpoints:

1. ``base``: SFT from random init on the regime's pretraining mixture, many epochs.
2. ``teacher``: SFT of the base on the target (a short run).
3. methods, each from the base with the same data and epoch budget: ``sft`` (its curve also
   gives early-stopped SFT), ``sft_kl`` (reference = base), ``distill`` (alpha 1, reference =
   teacher), ``anchored`` (alpha, snapshot, T x K), ``anchored_live``, ``anchored_a3`` ((0.3, 10, 2)
   scaled to the budget), ``dft``, ``asft`` (reference = base), ``taid`` (reference = teacher, t from
   0.4 to 1, TAID's defaults), ``anchored_ref_sftkl`` / ``anchored_ref_early`` (anchored toward a
   teacher made with sft_kl / stopped after one epoch: extra teacher jobs), ``anchored_base_kl``
   (+ kl_weight KL(p_base || p_theta)), ``anchored_reset`` (fresh optimizer per outer iteration),
   ``anchored_ramp`` (alpha 0.2 -> 0.8 over the outer iterations), ``anchored_replay`` (a replay
   trust region on fresh general-skill records drawn like the base's pretraining data),
   ``sft_replay`` (its control: SFT with the same replay records at the same fraction, trained by
   CE on them, i.e. rehearsal: the data without the trust region), and
   ``wise_ft_r<ratio>`` (no training: the base and the final SFT checkpoint merged in weight space).

A job's cache key hashes its run config (paths replaced by the keys / digests of what
they point to), so a job is re-run exactly when something it depends on changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace

from anchored_megatron.data.synthetic import CHAT_TEMPLATE

METHODS = ("sft", "sft_kl", "distill", "anchored", "anchored_live", "anchored_a3")
# Methods the forgetting study adds to the demo's (opt in through ExperimentConfig.methods).
STUDY_METHODS = METHODS + ("dft", "asft", "taid", "anchored_ref_sftkl", "anchored_ref_early", "anchored_base_kl",
                           "anchored_reset", "anchored_ramp", "anchored_replay", "sft_replay", "wise_ft_r0.25", "wise_ft_r0.5", "wise_ft_r0.75")
WISE_FT_PREFIX = "wise_ft_r"
TAID_T = (0.4, 1.0)  # TAID's published t_start, t_end
ALPHA_RAMP = (0.2, 0.8)  # anchored_ramp: alpha from 0.2 at the first outer iteration to 0.8 at the last
REPLAY_FRACTION = 0.5  # anchored_replay: as many replay sequences as gold ones in every step
JOBS_DIR = "jobs"  # under ExperimentConfig.output_dir, one directory per job
BASE, TEACHER = "base", "teacher"
# Teachers made another way, trained only when a chosen method is anchored toward them.
OTHER_TEACHERS = ("teacher_sftkl", "teacher_early")
# The anchor options a TrainedJob may set; those left None stay out of its run config.
_ANCHOR_OPTIONS = ("alpha", "alpha_end", "alpha_schedule", "source", "reset_optimizer_per_iteration", "kl_weight", "base_kl_weight")


@dataclass
class JobSpec:
    name: str
    run: dict  # a RunConfig as a dict (paths included)
    depends: dict = field(default_factory=dict)  # RunConfig key -> name of the job whose output it loads
    eval_every_epochs: int = 0  # 0: evaluate the final checkpoint only
    entropy: bool = False  # report the model's per-token entropy on its own responses
    merge: dict | None = None  # no training: {"base": job, "finetuned": job, "ratio": r} merged in weight space
    # A re-run of another job's first epochs, stopped after stop_after_epochs, with a checkpoint
    # evaluated every epoch: {"name": job, "output_dir": its directory}. Its points are folded into
    # that job's curve (runner.fold_prefix_jobs), where the regular checkpoints come too late.
    prefix_of: dict | None = None
    stop_after_epochs: int = 0
    key: str = ""


@dataclass
class ExperimentConfig:
    output_dir: str
    seed: int = 0
    regime: str = "C"
    # data sizes (see data/synthetic/regimes.py)
    pretrain_per_skill: int = 1500
    finetune_examples: int = 600
    eval_per_skill: int = 500
    skills: tuple[str, ...] = ("add", "rev", "up", "rep", "kv")
    target_min_steps: int = 2  # derived quantities per target problem (fewer = an easier target)
    target_max_steps: int = 3
    # model (Llama-shaped; TP=2 needs even heads and query groups)
    hidden_size: int = 128
    num_layers: int = 4
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2
    seq_length: int = 96
    tp: int = 2
    # base pretraining
    base_epochs: int = 6
    base_lr: float = 2e-3
    base_global_batch: int = 64
    # fine-tuning
    teacher_epochs: int = 3
    finetune_lr: float = 3e-4
    finetune_global_batch: int = 16
    outer_iterations: int = 5  # T of the anchored method; the budget is T x K epochs for every method
    epochs_per_iteration: int = 5  # K
    alpha: float = 0.5
    kl_weight: float = 0.1
    reset_optimizer_per_iteration: bool = False
    methods: tuple[str, ...] = METHODS
    eval_every_epochs: int = 1
    # The first early_eval_epochs epochs of each of early_eval_methods also evaluated, one point per
    # epoch, by a prefix job (JobSpec.prefix_of): for methods that pass the matched-target levels
    # before their first regular checkpoint, where a chord from the base would stand in for their path.
    early_eval_epochs: int = 0
    early_eval_methods: tuple[str, ...] = ()
    tag: str = ""  # appended to the teacher's and methods' directories (e.g. one per learning rate; the base is shared)
    micro_batch_size: int = 16
    progress_bar: bool = True

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in STUDY_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown} (known: {', '.join(STUDY_METHODS)})")
        if self.regime not in ("A", "B", "C"):
            raise ValueError(f"regime must be A, B or C, got {self.regime!r}")
        for name in ("base_epochs", "teacher_epochs", "outer_iterations", "epochs_per_iteration", "eval_every_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.early_eval_epochs, int) or not 0 <= self.early_eval_epochs < self.eval_every_epochs:
            raise ValueError(f"early_eval_epochs must be an integer in [0, eval_every_epochs={self.eval_every_epochs}), got {self.early_eval_epochs!r}")
        not_trained = [m for m in self.early_eval_methods if m not in self.methods or m.startswith(WISE_FT_PREFIX)]
        if not_trained:
            raise ValueError(f"early_eval_methods: {not_trained} are not trained methods of this plan (methods: {', '.join(self.methods)})")
        if bool(self.early_eval_epochs) != bool(self.early_eval_methods):
            raise ValueError("early_eval_epochs and early_eval_methods are set together (one of them is empty)")
        for name in ("base_global_batch", "finetune_global_batch"):
            if getattr(self, name) % self.micro_batch_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of micro_batch_size={self.micro_batch_size}")

    @property
    def budget_epochs(self) -> int:
        return self.outer_iterations * self.epochs_per_iteration

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainedJob:
    """What sets one trained job of the plan apart from the others; everything else in its run
    config is shared (``_run_dict``). Anchor options left None are not written (AnchorConfig's
    defaults apply): the run configs, and so the cache keys, stay those of the jobs cached before."""

    name: str
    objective: str
    outer_iterations: int
    epochs_per_iteration: int
    reference: str | None = None  # the job whose final checkpoint is the reference model
    replay: bool = False  # also train on the replay records (REPLAY_FRACTION of every step)
    alpha: float | None = None
    alpha_end: float | None = None
    alpha_schedule: str | None = None
    source: str | None = None
    reset_optimizer_per_iteration: bool | None = None
    kl_weight: float | None = None
    base_kl_weight: float | None = None

    @property
    def depends(self) -> dict:
        """RunConfig role -> the job whose output it loads: the base starts from random init,
        every other job from the base."""
        if self.name == BASE:
            return {}
        return {"student": BASE, **({"reference": self.reference} if self.reference else {})}

    def anchor(self) -> dict:
        options = {name: getattr(self, name) for name in _ANCHOR_OPTIONS if getattr(self, name) is not None}
        return {"objective": self.objective, "outer_iterations": self.outer_iterations,
                "epochs_per_iteration": self.epochs_per_iteration, **options}


def trained_jobs(cfg: ExperimentConfig) -> dict[str, TrainedJob]:
    """Every trained job a plan can hold, by name: the base, the teachers, the methods."""
    T, K = cfg.outer_iterations, cfg.epochs_per_iteration
    budget = T * K

    def one_run(name, objective, **options):  # methods without outer iterations: one run of the budget
        return TrainedJob(name, objective, 1, budget, **options)

    anchored = TrainedJob("anchored", "anchored", T, K, reference=TEACHER, alpha=cfg.alpha, source="snapshot",
                          reset_optimizer_per_iteration=cfg.reset_optimizer_per_iteration)
    jobs = [
        TrainedJob(BASE, "sft", 1, cfg.base_epochs),
        TrainedJob(TEACHER, "sft", 1, cfg.teacher_epochs),
        TrainedJob("teacher_sftkl", "sft_kl", 1, cfg.teacher_epochs, reference=BASE, kl_weight=cfg.kl_weight),
        TrainedJob("teacher_early", "sft", 1, 1),
        one_run("sft", "sft"),
        one_run("sft_kl", "sft_kl", reference=BASE, kl_weight=cfg.kl_weight),
        one_run("distill", "distill", reference=TEACHER),
        anchored,
        replace(anchored, name="anchored_live", source="live"),
        # (alpha, T, K) = (0.3, 10, 2) at the paper's scale; here T is scaled so T x K = the budget.
        replace(anchored, name="anchored_a3", outer_iterations=max(1, budget // 2), epochs_per_iteration=2 if budget >= 2 else 1, alpha=0.3),
        replace(anchored, name="anchored_base_kl", base_kl_weight=cfg.kl_weight),
        replace(anchored, name="anchored_reset", reset_optimizer_per_iteration=True),
        replace(anchored, name="anchored_ramp", alpha=ALPHA_RAMP[0], alpha_schedule="linear", alpha_end=ALPHA_RAMP[1]),
        replace(anchored, name="anchored_replay", replay=True),
        replace(anchored, name="anchored_ref_sftkl", reference="teacher_sftkl"),
        replace(anchored, name="anchored_ref_early", reference="teacher_early"),
        one_run("sft_replay", "sft", replay=True),
        one_run("dft", "dft"),
        one_run("asft", "asft", reference=BASE, kl_weight=cfg.kl_weight),
        one_run("taid", "taid", reference=TEACHER, alpha=TAID_T[0], alpha_end=TAID_T[1]),
    ]
    return {job.name: job for job in jobs}


def _job_dir(cfg: ExperimentConfig, name: str) -> str:
    # The base is shared by every tag (learning rate) of an experiment.
    return os.path.join(cfg.output_dir, JOBS_DIR, name if name == BASE else name + cfg.tag)


def _model(cfg: ExperimentConfig, vocab_size: int) -> dict:
    return dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
                vocab_size=vocab_size, seq_length=cfg.seq_length)


def _run_dict(cfg: ExperimentConfig, paths: dict, vocab_size: int, job: TrainedJob) -> dict:
    """The job's RunConfig as a dict: the base pretrains on the general mixture (cosine lr), every
    other job fine-tunes the base on the target (constant lr)."""
    pretraining = job.name == BASE
    lr = cfg.base_lr if pretraining else cfg.finetune_lr
    replay_data = {"replay_paths": [paths["replay"]], "replay_fraction": REPLAY_FRACTION} if job.replay else {}
    return {
        "output_dir": _job_dir(cfg, job.name),
        "seed": cfg.seed,
        "parallel": {"tp": cfg.tp},
        "model": _model(cfg, vocab_size),
        "student": {"checkpoint": None if pretraining else _job_dir(cfg, BASE)},
        "reference": {"checkpoint": _job_dir(cfg, job.reference) if job.reference else None},
        "data": {"paths": [paths["pretrain" if pretraining else "finetune"]], "tokenizer": paths["tokenizer"],
                 "chat_template": CHAT_TEMPLATE, "cache_dir": paths["cache"], **replay_data},
        "anchor": job.anchor(),
        "optim": {"lr": lr, "min_lr": lr / 10 if pretraining else 0.0, "warmup_fraction": 0.05,
                  "lr_schedule": "cosine" if pretraining else "constant", "clip_grad": 1.0},
        "train": {"micro_batch_size": cfg.micro_batch_size, "global_batch_size": cfg.base_global_batch if pretraining else cfg.finetune_global_batch,
                  "progress_bar": cfg.progress_bar, "tensorboard": False, "keep_checkpoints": 1000, "log_interval": 1000000},
    }


def plan(cfg: ExperimentConfig, paths: dict, vocab_size: int) -> list[JobSpec]:
    """The jobs in run order. ``paths``: tokenizer, pretrain, finetune, cache (from prepare_data)."""
    cfg.validate()
    specs = trained_jobs(cfg)
    methods = [m for m in cfg.methods if not m.startswith(WISE_FT_PREFIX)]
    referenced = {specs[m].reference for m in methods}
    teachers = [TEACHER] + [t for t in OTHER_TEACHERS if t in referenced]
    jobs = [JobSpec(BASE, _run_dict(cfg, paths, vocab_size, specs[BASE]), entropy=True)]
    jobs += [JobSpec(t, _run_dict(cfg, paths, vocab_size, specs[t]), specs[t].depends) for t in teachers]
    for name in cfg.methods:
        if name.startswith(WISE_FT_PREFIX):
            sft = next((j for j in jobs if j.name == "sft"), None)
            if sft is None:
                raise ValueError(f"methods: {name} merges the base with the final sft checkpoint: list sft before it")
            # Evaluated like the SFT run (same model and layout); its one checkpoint is the merge.
            merged = dict(copy.deepcopy(sft.run), output_dir=_job_dir(cfg, name))
            ratio = float(name[len(WISE_FT_PREFIX):])
            jobs.append(JobSpec(name, merged, {"student": BASE}, merge={"base": BASE, "finetuned": "sft", "ratio": ratio,
                                                                        "base_dir": _job_dir(cfg, BASE), "finetuned_dir": sft.run["output_dir"]}))
            continue
        run_cfg, depends = _run_dict(cfg, paths, vocab_size, specs[name]), specs[name].depends
        jobs.append(JobSpec(name, run_cfg, depends, eval_every_epochs=cfg.eval_every_epochs))
        if name in cfg.early_eval_methods:
            prefix = f"{name}_first{cfg.early_eval_epochs}"
            jobs.append(JobSpec(prefix, dict(copy.deepcopy(run_cfg), output_dir=_job_dir(cfg, prefix)), depends,
                                eval_every_epochs=1, prefix_of={"name": name, "output_dir": run_cfg["output_dir"]},
                                stop_after_epochs=cfg.early_eval_epochs))
    _assign_keys(jobs, paths)
    return jobs


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _assign_keys(jobs: list[JobSpec], paths: dict) -> None:
    keys = {}
    digests = {}
    for job in jobs:
        if job.merge is not None:
            spec = {"ratio": job.merge["ratio"], "base": keys[job.merge["base"]], "finetuned": keys[job.merge["finetuned"]]}
            job.key = hashlib.sha256(json.dumps({"merge": spec}, sort_keys=True).encode()).hexdigest()[:16]
            keys[job.name] = job.key
            continue
        run = copy.deepcopy(job.run)
        run.pop("output_dir")
        run["train"].pop("progress_bar")
        for key in ("paths", "replay_paths"):
            if key in run["data"]:
                run["data"][key] = [digests.setdefault(p, file_digest(p)) for p in run["data"][key]]
        run["data"]["tokenizer"] = digests.setdefault(paths["tokenizer_model"], file_digest(paths["tokenizer_model"]))
        run["data"].pop("cache_dir")
        for role, source in job.depends.items():
            run[role]["checkpoint"] = keys[source]
        spec = {"run": run, "eval_every_epochs": job.eval_every_epochs, "entropy": job.entropy}
        if job.prefix_of is not None:  # only then, so that the keys of the jobs cached before prefix jobs stay valid
            spec.update(prefix_of=keys[job.prefix_of["name"]], stop_after_epochs=job.stop_after_epochs)
        blob = json.dumps(spec, sort_keys=True)
        job.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        keys[job.name] = job.key
