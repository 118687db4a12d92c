"""`make demo-real`: SFT and Anchored Learning on a real pretrained model, SmolLM2-135M-Instruct,
on CPU in about 20 minutes (2 cores).

The target skill is reversing the order of 4-6 words (the base gets 0% of it; bench/real_pilot.py).
1. The teacher: plain SFT of the base on 64 examples for 3 epochs.
2. The student: anchored to that teacher from the base (alpha 0.5, snapshot anchor, T = K = 2),
   with the frozen roles' hidden states cached.
Both runs evaluate during training (eval.paths: held-out reversal items; eval.general_paths: the
base's own answers to general prompts, bench/data/real/general_eval_v1.jsonl), so their records
hold the held-out target loss and the forgetting monitor KL(p_base || p_theta) at every epoch.
Every epoch is evaluated (eval.interval = one epoch). Then base, teacher and student answer 40 held-out reversal items and a sample of the retention
suite (items the base answers correctly, bench/data/real/retention_v1.jsonl), greedy through the
model's chat template; the demo prints target exact match, general retention (the base is 100% by
construction), the last evaluation's KL to the base, and two sample answers of each.

The numbers of one such short run settle nothing; the study is bench/ (docs/real-model.md).

    .venv/bin/python bench/demo_real.py [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_pilot  # noqa: E402  (bench/, next to this file)

SKILL = "reverse_words"
EXAMPLES, EPOCHS, LR, SEQ = 64, 3, 5e-5, 64
HELD_OUT, RETENTION_SAMPLE = 40, 60
DATA = os.path.join(ROOT, "bench", "data", "real")


def _train(name: str, work: str, hf_dir: str, mg_dir: str, data: dict, settings: list[str]) -> dict:
    out = os.path.join(work, name)
    if os.path.exists(os.path.join(out, "checkpoints", "latest")) and os.path.exists(os.path.join(out, "done")):
        print(f"{name}: reusing {out}", file=sys.stderr, flush=True)
    else:
        common = [f"model.seq_length={SEQ}", "train.micro_batch_size=8", "train.global_batch_size=8", f"optim.lr={LR}",
                  "optim.lr_schedule=constant", "optim.warmup_fraction=0.0", f"eval.paths=[{data['target']}]",
                  f"eval.general_paths=[{data['general']}]", "eval.max_sequences=64", f"eval.interval={EXAMPLES // 8}",
                  "train.keep_checkpoints=1",
                  # The base's general answers run past 64 tokens: their first 64 are evaluated.
                  "data.truncate=true"]
        real_pilot._run_trainer(name, out, hf_dir, mg_dir, data["train"], common + settings)
        open(os.path.join(out, "done"), "w").close()
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        evals = [r for r in map(json.loads, fh) if r.get("record") == "eval"]
    return {"dir": out, "evals": evals}


def _export(run_dir: str, hf_dir: str) -> str:
    from anchored_megatron.convert import megatron_to_hf

    out = run_dir + "_hf"
    if not os.path.exists(os.path.join(out, "config.json")):
        megatron_to_hf(run_dir, out, "fp32", hf_config_source=hf_dir, tokenizer_dir=hf_dir, show_progress=False)
    return out


def _score(model_dir: str, targets: list[tuple], retention_items: list[dict]) -> dict:
    from anchored_megatron.eval import retention
    from anchored_megatron.eval.hf_chat import ChatModel

    _, score, max_new = real_pilot.CANDIDATES[SKILL]
    chat = ChatModel(model_dir, threads=2)
    target_replies = chat.greedy([q for q, _, _ in targets], max_new)
    kept_replies = chat.greedy([item["prompt"] for item in retention_items], 64)
    return {
        "target": sum(score(r, a) for r, (_, a, _) in zip(target_replies, targets)) / len(targets),
        "retention": sum(retention.passes(item["check"], r) for item, r in zip(retention_items, kept_replies)) / len(retention_items),
        "samples": [(targets[0][0], target_replies[0]), (retention_items[0]["prompt"], kept_replies[0])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "anchored_megatron", "demo-real"))
    args = parser.parse_args()
    from anchored_megatron.convert.fetch_smollm2 import fetch
    from anchored_megatron.data.synthetic import write_jsonl
    from anchored_megatron.platform import warnings_filter

    warnings_filter.install()  # this process imports Megatron for the conversions: its notices of missing TE/apex are not news
    if not sys.stderr.isatty():  # progress bars on terminals only
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    work = args.output_dir
    os.makedirs(work, exist_ok=True)
    hf_dir = fetch()
    mg_dir = os.path.join(work, "base")
    if not os.path.exists(os.path.join(mg_dir, "model_config.yaml")):
        from anchored_megatron.convert import hf_to_megatron

        hf_to_megatron(hf_dir, mg_dir, "fp32", show_progress=False)
    targets = real_pilot.heldout_items(SKILL, HELD_OUT)
    examples, _ = real_pilot.training_examples(SKILL, EXAMPLES, f"{real_pilot.SEED}-sft-{SKILL}", {q for q, _, _ in targets})
    data = {
        "train": write_jsonl([{"prompt": q, "response": a} for q, a in examples], os.path.join(work, "train.jsonl")),
        "target": write_jsonl([{"prompt": q, "response": a} for q, a, _ in targets], os.path.join(work, "heldout.jsonl")),
        "general": os.path.join(DATA, "general_eval_v1.jsonl"),
    }
    with open(os.path.join(DATA, "retention_v1.jsonl"), encoding="utf-8") as fh:
        kept = [json.loads(line) for line in fh]
    retention_items = random.Random("demo-real").sample(kept, RETENTION_SAMPLE)

    teacher = _train("teacher_sft", work, hf_dir, mg_dir, data,
                     ["anchor.objective=sft", "anchor.outer_iterations=1", f"anchor.epochs_per_iteration={EPOCHS}"])
    student = _train("anchored", work, hf_dir, mg_dir, data,
                     ["anchor.objective=anchored", f"reference.checkpoint={teacher['dir']}", "anchor.outer_iterations=2",
                      "anchor.epochs_per_iteration=2", "train.frozen_hidden_cache=true"])
    rows = [("base", hf_dir, None), ("teacher (SFT)", _export(teacher["dir"], hf_dir), teacher), ("anchored", _export(student["dir"], hf_dir), student)]
    print(f"\nSmolLM2-135M-Instruct, target skill {SKILL} ({EXAMPLES} training examples), {HELD_OUT} held-out items; "
          f"general retention on {RETENTION_SAMPLE} suite items the base answers correctly\n")
    print(f"{'model':<15}{'target exact match':>20}{'general retention':>19}{'KL to base':>12}{'held-out loss':>15}")
    results = []
    for name, model_dir, run in rows:
        scored = _score(model_dir, targets, retention_items)
        # The base's figures are any run's evaluation at step 0; the others' their run's last.
        last = run["evals"][-1] if run else teacher["evals"][0]
        print(f"{name:<15}{100 * scored['target']:>19.0f}%{100 * scored['retention']:>18.0f}%"
              f"{last['general_kl_base']:>12.4f}{last['target_loss']:>15.4f}", flush=True)
        results.append((name, scored))
    for name, scored in results:
        print(f"\n{name}:")
        for question, reply in scored["samples"]:
            print(f"  Q: {question}\n  A: {json.dumps(reply)}")
    print(f"\n{time.perf_counter() - started:.0f} s in all; runs and exports kept in {work} (a second run reuses them)")


if __name__ == "__main__":
    main()
