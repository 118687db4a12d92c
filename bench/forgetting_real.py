"""The forgetting study on a real pretrained model: SmolLM2-135M-Instruct, the reverse_words skill.

Does Anchored Learning keep SFT's gain on a new skill while losing less of what the pretrained
model could already do? Every method of ``anchored_megatron.experiment.real`` fine-tunes the
converted base on the same 64 gold examples for the same T x K epochs (one checkpoint per epoch),
at TP=1 on CPU, one ``python -m anchored_megatron.train`` process per job. Each epoch's checkpoint is
exported to Hugging Face and asked, greedy through the model's chat template:

- the 50 held-out reversal items (target exact match, the gain);
- the 156 retention items the base answers correctly (bench/data/real/retention_v1.jsonl: verifiable
  instructions, facts, arithmetic), so the base scores 100% and the loss reads as degradation;
and the trainer's own evaluation at every epoch gives the held-out target loss and, on the base's
own answers to 250 general prompts, the NLL and KL(p_base || p_theta) (eval.general_paths).

Seeds set the data order and the replay draw. The statistics are the small study's
(anchored_megatron/eval/study.py): retention at 0.9x and 1.0x the teacher's target accuracy along each
method's curve, paired differences against sft, sft_kl and distill with 95% t-intervals, and each
method's final degradation in percent of the base.

Jobs are cached under --output-dir by key: an interrupted study resumes at the job (and the
checkpoint evaluation) it stopped in. Run it in the background from a worktree pinned to a commit:

    python bench/forgetting_real.py [--seeds 0,1,2] [--output-dir DIR]     # train what is missing, then report
    python bench/forgetting_real.py --report-only                          # the report from what is cached
    python bench/forgetting_real.py --dry-run                              # the plan and its keys

Writes bench/results/forgetting_real_summary.json, bench/results/forgetting_real.txt and
docs/results/forgetting_real.png (with --report-only or when every seed is done).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_pilot  # noqa: E402  (bench/, next to this file)

from anchored_megatron.experiment.real import BASE, TEACHER, RealJob, RealStudyConfig, plan, seed_dir  # noqa: E402
from anchored_megatron.data.synthetic import write_jsonl  # noqa: E402
from anchored_megatron.experiment.runner import read_json, write_json  # noqa: E402

DATA = os.path.join(ROOT, "bench", "data", "real")
RETENTION = os.path.join(DATA, "retention_v1.jsonl")
HELD_OUT_ITEMS = 50
# As the retention suite's items were kept (bench/real_retention.py): a reply is cut where the base's was.
MAX_NEW = {"instruction": 64, "fact": 32}
JOB_FILE, EVAL_FILE = "job.json", "eval.json"
MODEL_NAME = "SmolLM2-135M-Instruct"
SUMMARY = os.path.join(ROOT, "bench", "results", "forgetting_real_summary.json")
REPORT = os.path.join(ROOT, "bench", "results", "forgetting_real.txt")
PLOT = os.path.join(ROOT, "docs", "results", "forgetting_real.png")
SAMPLES = 2  # replies of each kind kept per evaluated checkpoint


def _log(text: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def prepare(cfg: RealStudyConfig) -> dict:
    """The model (fetched, converted once for every seed) and the data files shared by every seed."""
    from anchored_megatron.convert import hf_to_megatron
    from anchored_megatron.convert.fetch_smollm2 import SOURCE_FILE, fetch
    from anchored_megatron.experiment.jobs import file_digest

    hf_dir = fetch()
    base = os.path.join(cfg.output_dir, "base")
    if not os.path.exists(os.path.join(base, "model_config.yaml")):
        _log(f"converting {hf_dir} to {base}")
        hf_to_megatron(hf_dir, base + ".partial", "fp32", show_progress=False)
        os.replace(base + ".partial", base)
    data_dir = os.path.join(cfg.output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    targets = real_pilot.heldout_items(cfg.skill, HELD_OUT_ITEMS)
    examples, _ = real_pilot.training_examples(cfg.skill, cfg.train_examples, f"{real_pilot.SEED}-study-{cfg.skill}",
                                               {q for q, _, _ in targets})
    return {
        "hf": hf_dir, "base": base,
        # The base stands for what it was made from: the GGUF file's digest and the converter's versions.
        "base_digest": file_digest(os.path.join(hf_dir, SOURCE_FILE)),
        "train": write_jsonl([{"prompt": q, "response": a} for q, a in examples], os.path.join(data_dir, "train.jsonl")),
        "heldout": write_jsonl([{"prompt": q, "response": a} for q, a, _ in targets], os.path.join(data_dir, "heldout.jsonl")),
        "general_eval": os.path.join(DATA, "general_eval_v1.jsonl"),
        "replay": os.path.join(DATA, "general_replay_v1.jsonl"),
        "targets": targets,
    }


# ---- training ----------------------------------------------------------------------------------


def train(job: RealJob, paths: dict) -> dict:
    """Train (or reuse) one job; returns its job.json. A run that stopped part-way resumes from its
    latest checkpoint (the trainer does that by itself)."""
    out = job.run["output_dir"]
    record = read_json(os.path.join(out, JOB_FILE))
    if record is not None and record.get("key") == job.key:
        return record
    if record is not None:  # trained for another key: its checkpoints are not this job's
        _log(f"[{job.name}] {out} holds key {record.get('key')}, not {job.key}: training again")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    if job.merge is not None:
        _merge(job, paths)
    else:
        _run_trainer(job)
    record = {"key": job.key, "train_seconds": round(time.perf_counter() - started, 1)}
    write_json(os.path.join(out, JOB_FILE), record)
    return record


def _run_trainer(job: RealJob) -> None:
    import yaml

    out = job.run["output_dir"]
    config = os.path.join(out, "run.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(job.run, fh, sort_keys=False)
    _log(f"[{job.name}] training: {job.run['anchor']}")
    command = [sys.executable, "-m", "anchored_megatron.train", "--config", config]
    with open(os.path.join(out, "trainer.out"), "a", encoding="utf-8") as log, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env={**os.environ, "NO_VCS_VERSION": "1"}) as process:
        for line in process.stdout:
            log.write(line)
            log.flush()
            if "saved checkpoint" in line or "finished at step" in line or "eval" in line.split(":", 1)[0]:
                _log(f"[{job.name}] {line.strip()}")
    if process.returncode != 0:
        raise SystemExit(f"[{job.name}] the trainer failed ({process.returncode}); its output: {os.path.join(out, 'trainer.out')}")


def _merge(job: RealJob, paths: dict) -> None:
    from anchored_megatron.checkpoint.dirs import RUN_CHECKPOINTS, checkpoint_name, iterations
    from anchored_megatron.convert.merge import merge_checkpoints

    finetuned = os.path.join(os.path.dirname(job.run["output_dir"]), job.merge["finetuned"])
    step = iterations(os.path.join(finetuned, RUN_CHECKPOINTS))[-1]
    target = os.path.join(job.run["output_dir"], RUN_CHECKPOINTS, checkpoint_name(step))
    if os.path.exists(target):
        shutil.rmtree(target)
    merge_checkpoints(paths["base"], finetuned, target, job.merge["ratio"], show_progress=False)
    _log(f"[{job.name}] merged: {job.merge['ratio']:g} of the way from the base to {job.merge['finetuned']}'s step {step}")


# ---- evaluation --------------------------------------------------------------------------------


def _retention_items() -> list[dict]:
    with open(RETENTION, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def score_model(hf_model: str, skill: str, targets: list, items: list[dict]) -> dict:
    """Target exact match and retention of one Hugging Face model directory, greedy."""
    from anchored_megatron.eval import retention
    from anchored_megatron.eval.hf_chat import ChatModel

    _, score, max_new = real_pilot.CANDIDATES[skill]
    chat = ChatModel(hf_model)
    target_replies = chat.greedy([q for q, _, _ in targets], max_new)
    passed, by_kind, kind_replies = [], {}, {}
    for kind, limit in MAX_NEW.items():
        group = [item for item in items if item["kind"] == kind]
        replies = chat.greedy([item["prompt"] for item in group], limit)
        kind_passed = [retention.passes(item["check"], reply) for item, reply in zip(group, replies)]
        by_kind[kind] = sum(kind_passed) / len(group)
        passed += kind_passed
        kind_replies[kind] = [{"prompt": item["prompt"], "reply": reply} for item, reply in zip(group[:SAMPLES], replies)]
    correct = [score(reply, answer) for reply, (_, answer, _) in zip(target_replies, targets)]
    return {
        "accuracy": {"target": sum(correct) / len(targets), "retention": sum(passed) / len(passed)},
        "retention_by_kind": by_kind,
        "samples": {"target": [{"prompt": q, "reply": r} for (q, _, _), r in zip(targets[:SAMPLES], target_replies)], **kind_replies},
    }


def _trainer_evals(out: str) -> dict[int, dict]:
    """step -> the trainer's evaluation record at that step (held-out target loss, general NLL, KL to the base)."""
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    except OSError:
        return {}
    keep = ("target_loss", "general_loss", "general_kl_base")
    return {r["step"]: {k: r.get(k) for k in keep} for r in records if r.get("record") == "eval"}


def evaluate(job: RealJob, cfg: RealStudyConfig, paths: dict, items: list[dict]) -> dict:
    """Every epoch's checkpoint (or the final one) scored; eval.json grows one point at a time, so an
    interrupted evaluation resumes at the checkpoint it stopped in. Then the checkpoints no later job
    needs are deleted (a study of 24 runs would otherwise hold ~2 GB per checkpoint)."""
    from anchored_megatron.checkpoint.dirs import RUN_CHECKPOINTS, checkpoint_name, iterations
    from anchored_megatron.convert import megatron_to_hf

    out = job.run["output_dir"]
    path = os.path.join(out, EVAL_FILE)
    cached = read_json(path)
    if cached is None or cached.get("key") != job.key:
        cached = {"key": job.key, "points": []}
    done = {p["step"] for p in cached["points"]}
    root = os.path.join(out, RUN_CHECKPOINTS)
    steps = iterations(root) if os.path.isdir(root) else []
    if not job.every_epoch:
        steps = steps[-1:]
    evals = _trainer_evals(out)
    for step in steps:
        if step in done:
            continue
        started = time.perf_counter()
        export = os.path.join(out, "export")
        shutil.rmtree(export, ignore_errors=True)
        megatron_to_hf(os.path.join(root, checkpoint_name(step)), export, "fp32", hf_config_source=paths["hf"], tokenizer_dir=paths["hf"],
                       show_progress=False)
        point = {"step": step, "epoch": step / cfg.steps_per_epoch, **score_model(export, cfg.skill, paths["targets"], items), **evals.get(step, {})}
        point["eval_seconds"] = round(time.perf_counter() - started, 1)
        shutil.rmtree(export)
        cached["points"].append(point)
        cached["points"].sort(key=lambda p: p["step"])
        write_json(path, cached)
        _log(f"[{job.name}] epoch {point['epoch']:g}: target {point['accuracy']['target']:.2f}, retention "
             f"{point['accuracy']['retention']:.3f}, KL to base {point.get('general_kl_base') or 0:.4f} ({point['eval_seconds']:.0f} s)")
    if steps and len(cached["points"]) >= len(steps):
        _prune(job, root)
    return cached


def _prune(job: RealJob, root: str) -> None:
    """Keep only what a later job reads: the teacher's and sft's final checkpoints (the reference of
    distill and anchored; WiSE-FT's merge)."""
    from anchored_megatron.checkpoint.dirs import checkpoint_name, iterations

    steps = iterations(root)
    keep_final = job.name in (TEACHER, "sft")
    for step in steps[:-1] if keep_final else steps:
        shutil.rmtree(os.path.join(root, checkpoint_name(step)), ignore_errors=True)
    shutil.rmtree(os.path.join(job.run["output_dir"], "snapshots"), ignore_errors=True)


def score_base(cfg: RealStudyConfig, paths: dict, items: list[dict]) -> None:
    """The base's own scores, cached once per study in base_eval.json."""
    path = os.path.join(cfg.output_dir, "base_eval.json")
    cached = read_json(path)
    if cached is None or cached.get("base_digest") != paths["base_digest"]:
        started = time.perf_counter()
        cached = {"base_digest": paths["base_digest"], "step": 0, "epoch": 0.0, **score_model(paths["hf"], cfg.skill, paths["targets"], items)}
        cached["eval_seconds"] = round(time.perf_counter() - started, 1)
        write_json(path, cached)
        _log(f"[base] target {cached['accuracy']['target']:.2f}, retention {cached['accuracy']['retention']:.3f}")


def run_seed(cfg: RealStudyConfig, paths: dict, items: list[dict], dry_run: bool = False) -> dict | None:
    """Every job of one seed, trained and evaluated (cached); job name -> {"points", "depends"}."""
    jobs = plan(cfg, paths)
    if dry_run:
        for job in jobs:
            done = (read_json(os.path.join(job.run["output_dir"], JOB_FILE)) or {}).get("key") == job.key
            print(f"seed {cfg.seed} {job.name:<16} key {job.key} {'trained' if done else 'to train'}  {job.run['anchor']}")
        return None
    for job in jobs:
        train(job, paths)
        evaluate(job, cfg, paths, items)
    score_base(cfg, paths, items)
    results = cached_seed(cfg, paths)
    if results is None:
        raise RuntimeError(f"seed {cfg.seed}: every job trained and evaluated, yet its results in {seed_dir(cfg)} are incomplete")
    return results


def cached_seed(cfg: RealStudyConfig, paths: dict) -> dict | None:
    """A seed's results if every job of it is trained and evaluated for its current key, else None."""
    results = {}
    for job in plan(cfg, paths):
        trained = read_json(os.path.join(job.run["output_dir"], JOB_FILE))
        evaluated = read_json(os.path.join(job.run["output_dir"], EVAL_FILE))
        if not trained or trained.get("key") != job.key or not evaluated or evaluated.get("key") != job.key:
            return None
        if not job.every_epoch and len(evaluated["points"]) != 1 or not evaluated["points"]:
            return None
        results[job.name] = {"train": trained, "points": evaluated["points"], "depends": dict(job.depends)}
    base = read_json(os.path.join(cfg.output_dir, "base_eval.json"))
    if base is None or base.get("base_digest") != paths["base_digest"]:
        return None
    results[BASE] = {"points": [{**base, **_trainer_evals(os.path.join(seed_dir(cfg), TEACHER)).get(0, {})}]}
    return results


# ---- report ------------------------------------------------------------------------------------


def report(runs: dict[int, dict], cfg: RealStudyConfig, missing: list[int]) -> str:
    from anchored_megatron.eval.report import LABELS
    from anchored_megatron.eval.study import FRACTIONS, methods_of, plot_frontiers, summarize_regime, teacher_tracking

    seeds = sorted(runs)
    results = [runs[s] for s in seeds]
    records = summarize_regime(results, "real", seeds)
    for record in records:
        record.update(regime="real", model=MODEL_NAME, degradation_final=record["degradation"])
    tracking = teacher_tracking(results)
    lines = [f"# forgetting_real  {datetime.date.today().isoformat()}  {MODEL_NAME}, skill {cfg.skill}, "
             f"{cfg.train_examples} gold examples, T x K = {cfg.outer_iterations} x {cfg.epochs_per_iteration} epochs, "
             f"lr {cfg.lr:g}, seeds {','.join(map(str, seeds))}" + (f" (seeds {missing} not finished: left out)" if missing else ""),
             f"base: target exact match {100 * results[0][BASE]['points'][0]['accuracy']['target']:.0f}%, "
             f"retention 100% of {len(_retention_items())} kept items by construction (measured "
             f"{100 * results[0][BASE]['points'][0]['accuracy']['retention']:.1f}%)", ""]
    header = f"{'method':<32}{'target':>8}{'retention':>11}{'degr. final':>13}{'ret@0.9x':>10}{'ret@1.0x':>10}{'KL base':>9}"
    lines.append(header)
    for record in records:
        m = record["method"]
        finals = [r[m]["points"][-1] if m in r else None for r in results]
        kl = [p.get("general_kl_base") for p in finals if p and p.get("general_kl_base") is not None]

        def pct(value):
            return f"{100 * value:.1f}" if value is not None else "—"

        lines.append(f"{LABELS.get(m, m):<32}{pct(record['gain'] + results[0][BASE]['points'][0]['accuracy']['target']):>8}"
                     f"{pct(1 - record['degradation'] if record['degradation'] is not None else None):>11}"
                     f"{pct(record['degradation']):>13}{pct(record['general_at_0.9x']):>10}{pct(record['general_at_1.0x']):>10}"
                     f"{(sum(kl) / len(kl)) if kl else float('nan'):>9.4f}")
    lines += ["", "paired differences of retention at matched target accuracy (method - other, percentage points, 95% t-interval over seeds):"]
    for record in records:
        for label in FRACTIONS.values():
            for other, stats in record.get(f"paired_diff_at_{label}", {}).items():
                if stats["mean"] is None:
                    continue
                ci = f"[{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}]" if stats["ci_low"] is not None else "[n<2]"
                lines.append(f"  {record['method']:<18} vs {other:<10} at {label}: {100 * stats['mean']:+.1f} {ci} (n={stats['n']})")
    summary = {"date": datetime.date.today().isoformat(), "model": MODEL_NAME, "regime": "real", "skill": cfg.skill,
               "settings": {k: v for k, v in cfg.__dict__.items() if k not in ("output_dir", "seed")},
               "seeds": seeds, "records": records, "teacher_tracking": tracking, "methods": methods_of(results)}
    write_json(SUMMARY, summary)
    plot_frontiers(results, PLOT, f"{MODEL_NAME}: target exact match vs retention ({len(seeds)} seeds)")
    text = "\n".join(lines) + "\n"
    with open(REPORT, "w", encoding="utf-8") as fh:
        fh.write(text)
    return text


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "anchored_megatron", "forgetting-real"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, run in this order")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the report from the seeds already done")
    parser.add_argument("--dry-run", action="store_true", help="print each seed's jobs, keys and whether they are trained")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    from anchored_megatron.platform import warnings_filter

    warnings_filter.install()  # this process imports Megatron for the exports: its notices of missing TE/apex are not news
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    options = {"methods": tuple(args.methods.split(","))} if args.methods else {}
    configs = {s: RealStudyConfig(output_dir=args.output_dir, seed=s, **options) for s in seeds}
    for cfg in configs.values():
        cfg.validate()
    paths = prepare(configs[seeds[0]])
    items = _retention_items()
    runs, missing = {}, []
    for seed, cfg in configs.items():
        if args.report_only:
            results = cached_seed(cfg, paths)
        else:
            results = run_seed(cfg, paths, items, dry_run=args.dry_run)
        if results is None:
            missing.append(seed)
        else:
            runs[seed] = results
    if args.dry_run:
        return
    if not runs:
        raise SystemExit(f"no seed of {seeds} is done in {args.output_dir}: nothing to report")
    print(report(runs, configs[seeds[0]], missing), end="")


if __name__ == "__main__":
    main()
