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
from dataclasses import asdict, dataclass, field

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


def _model(cfg: ExperimentConfig, vocab_size: int) -> dict:
    return dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
                vocab_size=vocab_size, seq_length=cfg.seq_length)


def plan(cfg: ExperimentConfig, paths: dict, vocab_size: int) -> list[JobSpec]:
    """The jobs in run order. ``paths``: tokenizer, pretrain, finetune, cache (from prepare_data)."""
    cfg.validate()
    root = os.path.join(cfg.output_dir, JOBS_DIR)

    def run(name, data_path, objective, epochs_t, epochs_k, lr, batch, student, reference=None, replay=False, **anchor):
        replay_data = {"replay_paths": [paths["replay"]], "replay_fraction": REPLAY_FRACTION} if replay else {}
        return {
            "output_dir": os.path.join(root, name if name == "base" else name + cfg.tag),
            "seed": cfg.seed,
            "parallel": {"tp": cfg.tp},
            "model": _model(cfg, vocab_size),
            "student": {"checkpoint": student},
            "reference": {"checkpoint": reference},
            "data": {"paths": [data_path], "tokenizer": paths["tokenizer"], "chat_template": CHAT_TEMPLATE, "cache_dir": paths["cache"],
                     **replay_data},
            "anchor": {"objective": objective, "outer_iterations": epochs_t, "epochs_per_iteration": epochs_k, **anchor},
            "optim": {"lr": lr, "min_lr": lr / 10 if name == "base" else 0.0, "warmup_fraction": 0.05,
                      "lr_schedule": "cosine" if name == "base" else "constant", "clip_grad": 1.0},
            "train": {"micro_batch_size": cfg.micro_batch_size, "global_batch_size": batch, "progress_bar": cfg.progress_bar,
                      "tensorboard": False, "keep_checkpoints": 1000, "log_interval": 1000000},
        }

    base_dir = os.path.join(root, "base")
    teacher_dir = os.path.join(root, "teacher" + cfg.tag)
    ft = dict(data_path=paths["finetune"], lr=cfg.finetune_lr, batch=cfg.finetune_global_batch, student=base_dir)
    T, K = cfg.outer_iterations, cfg.epochs_per_iteration
    budget = T * K
    jobs = [
        JobSpec("base", run("base", paths["pretrain"], "sft", 1, cfg.base_epochs, cfg.base_lr, cfg.base_global_batch, None), entropy=True),
        JobSpec("teacher", run("teacher", objective="sft", epochs_t=1, epochs_k=cfg.teacher_epochs, **ft), depends={"student": "base"}),
    ]
    # Teachers made differently, for the anchored variants that use them.
    other_teachers = {
        "anchored_ref_sftkl": JobSpec("teacher_sftkl", run("teacher_sftkl", objective="sft_kl", epochs_t=1, epochs_k=cfg.teacher_epochs,
                                                           reference=base_dir, kl_weight=cfg.kl_weight, **ft),
                                      depends={"student": "base", "reference": "base"}),
        "anchored_ref_early": JobSpec("teacher_early", run("teacher_early", objective="sft", epochs_t=1, epochs_k=1, **ft),
                                      depends={"student": "base"}),
    }
    jobs += [teacher for method, teacher in other_teachers.items() if method in cfg.methods]
    reset = cfg.reset_optimizer_per_iteration
    method_runs = {
        "sft": (run("sft", objective="sft", epochs_t=1, epochs_k=budget, **ft), {"student": "base"}),
        "sft_kl": (run("sft_kl", objective="sft_kl", epochs_t=1, epochs_k=budget, reference=base_dir, kl_weight=cfg.kl_weight, **ft),
                   {"student": "base", "reference": "base"}),
        "distill": (run("distill", objective="distill", epochs_t=1, epochs_k=budget, reference=teacher_dir, **ft),
                    {"student": "base", "reference": "teacher"}),
        "anchored": (run("anchored", objective="anchored", epochs_t=T, epochs_k=K, reference=teacher_dir, alpha=cfg.alpha,
                         source="snapshot", reset_optimizer_per_iteration=reset, **ft), {"student": "base", "reference": "teacher"}),
        "anchored_live": (run("anchored_live", objective="anchored", epochs_t=T, epochs_k=K, reference=teacher_dir, alpha=cfg.alpha,
                              source="live", reset_optimizer_per_iteration=reset, **ft), {"student": "base", "reference": "teacher"}),
        # (alpha, T, K) = (0.3, 10, 2) at the paper's scale; here T is scaled so T x K = the budget.
        "anchored_a3": (run("anchored_a3", objective="anchored", epochs_t=max(1, budget // 2), epochs_k=2 if budget >= 2 else 1,
                            reference=teacher_dir, alpha=0.3, source="snapshot", reset_optimizer_per_iteration=reset, **ft),
                        {"student": "base", "reference": "teacher"}),
        "anchored_base_kl": (run("anchored_base_kl", objective="anchored", epochs_t=T, epochs_k=K, reference=teacher_dir, alpha=cfg.alpha,
                                 source="snapshot", base_kl_weight=cfg.kl_weight, reset_optimizer_per_iteration=reset, **ft),
                             {"student": "base", "reference": "teacher"}),
        "anchored_reset": (run("anchored_reset", objective="anchored", epochs_t=T, epochs_k=K, reference=teacher_dir, alpha=cfg.alpha,
                               source="snapshot", reset_optimizer_per_iteration=True, **ft), {"student": "base", "reference": "teacher"}),
        "anchored_ramp": (run("anchored_ramp", objective="anchored", epochs_t=T, epochs_k=K, reference=teacher_dir, alpha=ALPHA_RAMP[0],
                              alpha_schedule="linear", alpha_end=ALPHA_RAMP[1], source="snapshot", reset_optimizer_per_iteration=reset, **ft),
                          {"student": "base", "reference": "teacher"}),
        "anchored_replay": (run("anchored_replay", objective="anchored", epochs_t=T, epochs_k=K, reference=teacher_dir, alpha=cfg.alpha,
                                source="snapshot", replay=True, reset_optimizer_per_iteration=reset, **ft),
                            {"student": "base", "reference": "teacher"}),
        "sft_replay": (run("sft_replay", objective="sft", epochs_t=1, epochs_k=budget, replay=True, **ft), {"student": "base"}),
        "dft": (run("dft", objective="dft", epochs_t=1, epochs_k=budget, **ft), {"student": "base"}),
        "asft": (run("asft", objective="asft", epochs_t=1, epochs_k=budget, reference=base_dir, kl_weight=cfg.kl_weight, **ft),
                 {"student": "base", "reference": "base"}),
        "taid": (run("taid", objective="taid", epochs_t=1, epochs_k=budget, reference=teacher_dir, alpha=TAID_T[0], alpha_end=TAID_T[1], **ft),
                 {"student": "base", "reference": "teacher"}),
    }
    for teacher_method, teacher in other_teachers.items():
        method_runs[teacher_method] = (
            run(teacher_method, objective="anchored", epochs_t=T, epochs_k=K, reference=teacher.run["output_dir"], alpha=cfg.alpha,
                source="snapshot", reset_optimizer_per_iteration=reset, **ft),
            {"student": "base", "reference": teacher.name})
    for name in cfg.methods:
        if name.startswith(WISE_FT_PREFIX):
            if "sft" not in {j.name for j in jobs}:
                raise ValueError(f"methods: {name} merges the base with the final sft checkpoint: list sft before it")
            # Evaluated like the SFT run (same model and layout); its one checkpoint is the merge.
            merged = dict(copy.deepcopy(method_runs["sft"][0]), output_dir=os.path.join(root, name + cfg.tag))
            ratio = float(name[len(WISE_FT_PREFIX):])
            jobs.append(JobSpec(name, merged, {"student": "base"}, merge={"base": "base", "finetuned": "sft", "ratio": ratio,
                                                                          "base_dir": base_dir, "finetuned_dir": method_runs["sft"][0]["output_dir"]}))
            continue
        run_cfg, depends = method_runs[name]
        jobs.append(JobSpec(name, run_cfg, depends, eval_every_epochs=cfg.eval_every_epochs))
        if name in cfg.early_eval_methods:
            prefix = f"{name}_first{cfg.early_eval_epochs}"
            jobs.append(JobSpec(prefix, dict(copy.deepcopy(run_cfg), output_dir=os.path.join(root, prefix + cfg.tag)), depends,
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
