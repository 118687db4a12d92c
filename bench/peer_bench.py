"""One training step of fine-tuning and distillation, side by side: plain Hugging Face + PyTorch,
TRL, and this project's trainer, on the same model and the same token batches.

Engines (``--engines``), each run in its own subprocess:

- ``plain``: transformers + PyTorch with a hand-written loop. SFT: cross-entropy on the response
  tokens. Distillation the naive way: the teacher's forward under ``no_grad`` every step, the
  full-vocabulary logits of both models, forward KL(p_teacher || p_student) per response token.
  AdamW, gradient clipping at 1.
- ``trl`` (when ``trl`` is importable; ``pip install trl==1.16.0``): ``SFTTrainer`` for SFT,
  ``GKDTrainer`` off-policy with forward KL (``lmbda=0``, ``beta=0``) for distillation; fp32
  (``bf16=False``) and ``gradient_checkpointing=False`` (TRL's defaults are bf16 and recomputation:
  here every engine does the same fp32 work); the step is timed from ``on_step_begin`` to
  ``on_step_end``.
- ``ours-tp1``, ``ours-dp2``, ``ours-pp2``: ``python -m anchored_megatron.train --config run.yaml
  key=value ...`` in one process, or ``torchrun --standalone --nproc_per_node 2`` for DP=2 and PP=2,
  default options (``train.tensorboard=false``); the step time is the run's ``step_time_s`` in
  ``metrics.jsonl`` (rank 0's).

Rows (``--rows``): ``sft``; ``sft-unfused`` and ``sft-chunk1024`` (ours at one process with
``model.fused_output_loss=false`` / ``model.fused_output_chunk_tokens=1024``); ``distill`` (the
teacher runs every step); ``distill-cache`` (ours with ``train.frozen_hidden_cache=true``: the data is
one global batch, so every step after the first reads the teacher from the cache); ``anchored``
(ours: teacher and snapshot, alpha 0.5). The teacher is the model itself (the cost is what matters).

The same token batches for every engine: 8 records of exactly 256 tokens (a prompt and a 128-word
response, about half of each sequence; the loss on response tokens only), made from a string seed and tokenised once by this project's data
pipeline (the trainer's own code, ``data.packing=false``); the HF loop and TRL get those token ids,
and each step is the whole set: 8 sequences x 256 tokens, micro-batch 4 (gradient accumulation 2),
fp32, AdamW lr 1e-5, torch threads 2 in one process and 1 per rank at two (``--threads``). The model is
SmolLM2-135M-Instruct when ``make real-model`` fetched it (``--fetch`` does it here), else a
random-initialised Llama of its shape (30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocab
49152, tied embeddings) with a small word-level tokenizer.

Measurement: ``--rounds`` interleaved rounds (each round runs every selected engine and row once,
``--steps`` steps each: row by row, the engines of a row back to back, in reverse order every other
round, so that a drift of the machine's speed hits the runs compared with each other alike); the
step time is the median over all rounds of each run's steps after its first two (which hold
compilation and warm-up; with 2 steps, the last step), and under the table each round's own ratio
to the plain loop's run of that round is listed (the paired figure: on a shared machine a round's
speed can differ from the next one's by a third); the peak RSS is the sum over the engine's process tree
(torchrun's agent, every rank and their helpers, such as Inductor's compile workers; pages shared
between processes count once per process), sampled every 0.2 s from the start to the end of its
last step (for our trainer: until ``metrics.jsonl`` holds it, so its closing checkpoint save is
left out). Ratios are to the plain loop's SFT step (SFT rows) or its distillation step
(distill and anchored rows): 0.50x is half the time or memory.

    .venv/bin/python bench/peer_bench.py [--steps 6] [--rounds 2] [--fetch] [--output bench/results/peer_bench.md]
    .venv/bin/python bench/peer_bench.py --quick          # tiny random Llama, 2 steps, 1 round: a smoke run
    .venv/bin/python bench/peer_bench.py --engines plain ours-tp1 --rows sft distill
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEQ_LENGTH, GLOBAL_BATCH, MICRO_BATCH, LR = 256, 8, 4, 1e-5
SEED = "peer-bench"  # a string seed: the same records on every Python and platform
RESPONSE_WORDS = 128  # about half of each sequence is the response
SKIPPED_STEPS = 2  # warm-up steps left out of the median
RSS_INTERVAL_S = 0.2
TRL_MISSING = "TRL not installed: its columns are left out (pip install trl==1.16.0, or pip install -e .[peer])"
WORDS = ("the of and to in is it that was for on are with as his they be at one have this from or had by word but what "
         "some we can out other were all there when up use your how said an each she which do their time if will way "
         "about many then them write would like so these her long make thing see him two has look more day could go "
         "come did number sound no most people my over know water than call first who may down side been now find").split()
FILLER = "the"  # one token in both tokenizers used here: the fill adds it to reach the exact length

SMOLLM2_SHAPE = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152)
QUICK_SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    family: str  # "sft" or "distill": which plain step the ratios are to
    overrides: tuple[str, ...]  # for our trainer; "{teacher}" is the converted checkpoint
    data_parallel_overrides: tuple[str, ...] = ()  # added where DP > 1


@dataclasses.dataclass(frozen=True)
class Column:
    label: str
    rows: tuple[str, ...]
    processes: int = 1
    overrides: tuple[str, ...] = ()
    data_parallel: int = 1


TEACHER = ("reference.checkpoint={teacher}",)
ROWS = {
    "sft": Row("SFT", "sft", ("anchor.objective=sft",)),
    "sft-unfused": Row("SFT, model.fused_output_loss=false", "sft", ("anchor.objective=sft", "model.fused_output_loss=false")),
    "sft-chunk1024": Row("SFT, model.fused_output_chunk_tokens=1024", "sft",
                         ("anchor.objective=sft", "model.fused_output_chunk_tokens=1024")),
    "distill": Row("distill (teacher forward every step)", "distill", ("anchor.objective=distill", *TEACHER)),
    # per_rank keeps each rank's sequences fixed, what the frozen-hidden cache needs at DP > 1
    "distill-cache": Row("distill, train.frozen_hidden_cache=true", "distill",
                         ("anchor.objective=distill", *TEACHER, "train.frozen_hidden_cache=true"), ("data.shuffle=per_rank",)),
    "anchored": Row("anchored (teacher + snapshot, alpha 0.5)", "distill", ("anchor.objective=anchored", *TEACHER)),
}
COLUMNS = {
    "plain": Column("plain HF + PyTorch", ("sft", "distill")),
    "trl": Column("TRL", ("sft", "distill")),
    "ours-tp1": Column("ours TP=1", tuple(ROWS)),
    "ours-dp2": Column("ours DP=2", ("sft", "distill", "distill-cache", "anchored"), 2, data_parallel=2),
    "ours-pp2": Column("ours PP=2", ("sft",), 2, ("parallel.pp=2",)),
}


def sequence_digest(ids) -> str:
    """What identifies a sequence in the results: the SHA-1 of its token ids written as decimals."""
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()


# ---- the model, the tokenizer and the data every engine uses ------------------------------------------


def _word_tokenizer(directory: str) -> None:
    """A word-level tokenizer (every word of WORDS one token) with what our trainer and transformers need."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(["<unk>", "<s>", "</s>", "<pad>", "System", "User", "Assistant", ":", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)


def _random_llama(directory: str, shape: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    _word_tokenizer(directory)
    config = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def model_dir(args: argparse.Namespace, work: str) -> tuple[str, str]:
    """(Hugging Face directory, a line saying which model it is)."""
    if args.quick:
        directory = os.path.join(work, "hf")
        _random_llama(directory, QUICK_SHAPE)
        return directory, "a random-initialised tiny Llama (--quick: 2 layers, hidden 64, vocab 512), word-level tokenizer"
    from anchored_megatron.convert.fetch_smollm2 import fetch, is_complete, model_dir as smollm2_dir

    if is_complete(smollm2_dir()):
        return smollm2_dir(), "SmolLM2-135M-Instruct (make real-model), its tokenizer and chat template"
    if args.fetch:
        return fetch(), "SmolLM2-135M-Instruct (fetched), its tokenizer and chat template"
    print(f"SmolLM2-135M-Instruct not found at {smollm2_dir()} (--fetch downloads it): "
          "using a random-initialised Llama of its shape", file=sys.stderr, flush=True)
    directory = os.path.join(work, "hf")
    _random_llama(directory, SMOLLM2_SHAPE)
    return directory, "a random-initialised Llama of SmolLM2-135M's shape, word-level tokenizer"


def _token_counts(records: list[dict], tokenizer_dir: str, work: str) -> list[int]:
    """Each record's length in tokens as the trainer tokenises it (its template, its encoder)."""
    from anchored_megatron.data import chat_template, load_tokenizer
    from anchored_megatron.data.preprocess import tokenize_files
    from anchored_megatron.data.synthetic import write_jsonl

    path = os.path.join(work, "measure.jsonl")
    write_jsonl(records, path)
    tokenizer = load_tokenizer(tokenizer_dir)
    template = chat_template.resolve(None, tokenizer.chat_template)
    docs = tokenize_files([path], tokenizer, template, 10 ** 9, "error", False)
    return [int(n) for n in docs.doc_offsets[1:] - docs.doc_offsets[:-1]]


def write_records(path: str, tokenizer_dir: str, work: str) -> None:
    """GLOBAL_BATCH records of exactly SEQ_LENGTH tokens: random words from a string seed, then the
    prompt trimmed (each word is at least one token) or filled with FILLER until the length is exact."""
    from anchored_megatron.data.synthetic import write_jsonl

    rng = random.Random(SEED)
    records = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(SEQ_LENGTH - RESPONSE_WORDS)),
                "response": " ".join(rng.choice(WORDS) for _ in range(RESPONSE_WORDS))} for _ in range(GLOBAL_BATCH)]
    for _ in range(6):
        counts = _token_counts(records, tokenizer_dir, work)
        if all(count == SEQ_LENGTH for count in counts):
            write_jsonl(records, path)
            return
        for record, count in zip(records, counts):
            words = record["prompt"].split(" ")
            gap = SEQ_LENGTH - count
            record["prompt"] = " ".join(words[:gap] if gap < 0 else words + [FILLER] * gap)
    raise SystemExit(f"could not make records of exactly {SEQ_LENGTH} tokens with {tokenizer_dir} (lengths {counts})")


def tokenized_batch(data: str, tokenizer_dir: str, work: str) -> str:
    """The records through the trainer's data pipeline, saved for the HF loop and TRL: ``tokens``,
    ``labels`` (next-token targets, -100 off the response) and ``loss_mask``, each [8, 256]."""
    import torch

    from anchored_megatron.data import DataConfig, build_sft_dataset, load_tokenizer

    cfg = DataConfig(paths=[data], tokenizer=tokenizer_dir, packing=False, cache_dir=os.path.join(work, "token-cache"))
    with contextlib.redirect_stdout(sys.stderr):  # its summary line; stdout carries the report alone
        dataset = build_sft_dataset(cfg, load_tokenizer(tokenizer_dir), SEQ_LENGTH)
    if len(dataset) != GLOBAL_BATCH or dataset.stats["fill_ratio"] != 1.0:
        raise SystemExit(f"{data}: {len(dataset)} sequences at fill {dataset.stats['fill_ratio']:.3f}; "
                         f"expected {GLOBAL_BATCH} full ones")
    items = [dataset[i] for i in range(len(dataset))]
    path = os.path.join(work, "batch.pt")
    torch.save({name: torch.stack([item[name] for item in items]) for name in ("tokens", "labels", "loss_mask")}, path)
    return path


def convert(hf_dir: str, work: str) -> str:
    from anchored_megatron.convert import hf_to_megatron

    out = os.path.join(work, "megatron")
    hf_to_megatron(hf_dir, out, "fp32", show_progress=False)
    return out


def write_run_yaml(work: str, hf_dir: str, megatron_dir: str, data: str, steps: int) -> str:
    """Our trainer's config: one epoch is one step (the data is one global batch), so T=1, K=steps."""
    import yaml

    config = {
        "seed": 1234,
        "student": {"checkpoint": megatron_dir},
        "data": {"paths": [data], "tokenizer": hf_dir, "packing": False, "cache_dir": os.path.join(work, "cache")},
        "model": {"seq_length": SEQ_LENGTH, "params_dtype": "fp32"},
        "anchor": {"objective": "sft", "outer_iterations": 1, "epochs_per_iteration": steps},
        "optim": {"lr": LR},
        "train": {"micro_batch_size": MICRO_BATCH, "global_batch_size": GLOBAL_BATCH, "tensorboard": False,
                  "progress_bar": False},
    }
    path = os.path.join(work, "run.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


# ---- the HF loop and TRL, in a worker subprocess ------------------------------------------------------


def _load_model(hf_dir: str, trained: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if trained:
        return model.train()
    return model.eval().requires_grad_(False)


def _forward_kl_sum(student_logits, teacher_logits, loss_mask):
    """Sum over response positions of KL(p_teacher || p_student), full vocabulary, the naive way."""
    import torch.nn.functional as F

    log_p_student = F.log_softmax(student_logits.float(), dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return (per_token * loss_mask).sum()


def plain_steps(spec: dict, batch: dict, record) -> list[float]:
    import torch
    import torch.nn.functional as F

    model = _load_model(spec["hf_dir"], trained=True)
    teacher = _load_model(spec["hf_dir"], trained=False) if spec["family"] == "distill" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    response_tokens = batch["loss_mask"].sum()  # the loss is a mean over the step's response tokens
    times = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        for first in range(0, GLOBAL_BATCH, MICRO_BATCH):
            tokens, labels, mask = (batch[name][first:first + MICRO_BATCH] for name in ("tokens", "labels", "loss_mask"))
            record(len(times), tokens, int((labels != -100).sum()))
            logits = model(input_ids=tokens).logits
            if teacher is None:
                loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
            else:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=tokens).logits
                loss_sum = _forward_kl_sum(logits, teacher_logits, mask)
            (loss_sum / response_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def trl_steps(spec: dict, batch: dict, record) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    times, started = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - started[-1])

    def collate(examples: list[dict]) -> dict:
        """Our token ids; labels unshifted, as transformers' models shift them."""
        index = torch.tensor([example["index"] for example in examples])
        tokens = batch["tokens"][index]
        labels = torch.full_like(tokens, -100)
        labels[:, 1:] = batch["labels"][index][:, :-1]
        record(len(times), tokens, int((labels[:, 1:] != -100).sum()))  # the positions the shifted loss reads
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": labels}

    common = dict(output_dir=os.path.join(spec["work"], "trl"), per_device_train_batch_size=MICRO_BATCH,
                  gradient_accumulation_steps=GLOBAL_BATCH // MICRO_BATCH, learning_rate=LR, max_steps=spec["steps"],
                  max_length=SEQ_LENGTH, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                  save_strategy="no", report_to="none", logging_steps=spec["steps"], disable_tqdm=True,
                  dataloader_num_workers=0, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    kwargs = dict(model=_load_model(spec["hf_dir"], trained=True), train_dataset=Dataset.from_dict({"index": list(range(GLOBAL_BATCH))}),
                  data_collator=collate, processing_class=AutoTokenizer.from_pretrained(spec["hf_dir"]), callbacks=[StepTimer()])
    if spec["family"] == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(args=SFTConfig(**common), **kwargs)
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer = GKDTrainer(teacher_model=_load_model(spec["hf_dir"], trained=False),
                             args=GKDConfig(**common, lmbda=0.0, beta=0.0), **kwargs)
    trainer.train()
    return times


def worker(spec_path: str) -> None:
    """One HF-loop or TRL run; writes step times and the digests of the sequences each step consumed."""
    import torch

    with open(spec_path) as fh:
        spec = json.load(fh)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batch = torch.load(spec["batch"], weights_only=True)
    consumed: list[list[str]] = []  # per step, the digests of the sequences its micro-batches held
    targets: list[int] = []  # per step, the positions with a loss target

    def record(step: int, tokens, step_targets: int) -> None:
        if len(consumed) == step:
            consumed.append([])
            targets.append(0)
        consumed[step] += [sequence_digest(row) for row in tokens.tolist()]
        targets[step] += step_targets

    times = {"plain": plain_steps, "trl": trl_steps}[spec["engine"]](spec, batch, record)
    with open(spec["result"], "w") as fh:
        json.dump({"step_times": times, "consumed": consumed, "response_tokens": targets}, fh)


# ---- running one engine and watching it ----------------------------------------------------------------


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [record for record in records if record.get("record") != "eval"]


def _watch(command: list[str], env: dict, log: str, steps_done, timeout_s: float) -> int:
    """Run ``command``; the peak RSS of its process tree until ``steps_done()`` (or its end), in bytes."""
    peak, counting = 0, True
    deadline = time.monotonic() + timeout_s
    with open(log, "w") as fh, subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                                start_new_session=True) as process:
        try:
            while process.poll() is None:
                if counting:
                    peak = max(peak, _tree_rss(process.pid))
                    counting = not steps_done()
                if time.monotonic() > deadline:
                    raise SystemExit(f"{' '.join(command[:6])} ... still running after {timeout_s:.0f} s (--timeout)")
                time.sleep(RSS_INTERVAL_S)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # our own session: the engine and its children
            raise
    if process.returncode != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({process.returncode}); the end of {log}:\n{tail}")
    return peak


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    path = [ROOT, env["PYTHONPATH"]] if env.get("PYTHONPATH") else [ROOT]
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(path), NO_VCS_VERSION="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_peer(setup: dict, engine: str, row: str, out: str, timeout_s: float) -> dict:
    os.makedirs(out)
    spec = {"engine": engine, "family": ROWS[row].family, "hf_dir": setup["hf_dir"], "batch": setup["batch"],
            "steps": setup["steps"], "threads": setup["threads"], "work": out, "result": os.path.join(out, "result.json")}
    with open(os.path.join(out, "spec.json"), "w") as fh:
        json.dump(spec, fh)
    command = [sys.executable, os.path.abspath(__file__), "--worker", os.path.join(out, "spec.json")]
    peak = _watch(command, _env(setup["threads"]), os.path.join(out, "output.log"), lambda: False, timeout_s)
    with open(spec["result"]) as fh:
        return dict(json.load(fh), peak_rss=peak)


def run_ours(setup: dict, column: str, row: str, out: str, timeout_s: float) -> dict:
    processes = COLUMNS[column].processes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    overrides = [f"output_dir={out}", *(o.format(teacher=setup["megatron_dir"]) for o in ROWS[row].overrides),
                 *COLUMNS[column].overrides, *(ROWS[row].data_parallel_overrides if COLUMNS[column].data_parallel > 1 else ())]
    command = [*launcher, "-m", "anchored_megatron.train", "--config", setup["run_yaml"], *overrides]
    log = out + ".log"
    peak = _watch(command, _env(max(1, setup["threads"] // processes)), log, lambda: len(_metrics(out)) >= setup["steps"], timeout_s)
    records = _metrics(out)
    shutil.copy(os.path.join(out, "metrics.jsonl"), out + ".metrics.jsonl")
    shutil.rmtree(out)  # the closing checkpoint: model and optimizer state
    return {"step_times": [r["step_time_s"] for r in records], "response_tokens": [r["response_tokens"] for r in records],
            "frozen_cached": [r.get("frozen_cached") for r in records], "peak_rss": peak}


def run_one(setup: dict, column: str, row: str, round_index: int, timeout_s: float) -> dict:
    out = os.path.join(setup["work"], "runs", f"r{round_index}-{column}-{row}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    started = time.perf_counter()
    run = run_peer(setup, column, row, out, timeout_s) if column in ("plain", "trl") else \
        run_ours(setup, column, row, out, timeout_s)
    if len(run["step_times"]) != setup["steps"]:
        raise SystemExit(f"{COLUMNS[column].label} / {row}: {len(run['step_times'])} step times, expected {setup['steps']}")
    run.update(column=column, row=row, round=round_index, wall_s=time.perf_counter() - started)
    print(f"[round {round_index + 1}] {COLUMNS[column].label} / {ROWS[row].label}: steps "
          f"{' '.join(f'{t:.2f}' for t in run['step_times'])} s, peak RSS {run['peak_rss'] / 2 ** 30:.2f} GiB, "
          f"{run['wall_s']:.0f} s wall", file=sys.stderr, flush=True)
    return run


# ---- the report ------------------------------------------------------------------------------------------


def _left_out(steps: int) -> int:
    """Warm-up steps left out of a run of ``steps``: SKIPPED_STEPS, fewer when the run is shorter (the last step stays)."""
    return min(SKIPPED_STEPS, steps - 1)


def steady_step(runs: list[dict]) -> float:
    """Median over the runs of their steps after the warm-up ones."""
    return statistics.median(t for run in runs for t in run["step_times"][_left_out(len(run["step_times"])):])


def _skipped(steps: int) -> str:
    left_out = _left_out(steps)
    return "no step" if left_out == 0 else "step 1" if left_out == 1 else f"steps 1-{left_out}"


def _cell(value: float, base: float | None, unit: str) -> str:
    ratio = f" ({value / base:.2f}x)" if base else ""
    return f"{value:.2f} {unit}{ratio}"


def table(runs: list[dict], columns: list[str], rows: list[str]) -> list[str]:
    def group(column, row):
        return [run for run in runs if run["column"] == column and run["row"] == row]

    def plain(row, measure):
        found = group("plain", ROWS[row].family)  # the families are the plain loop's two rows
        return measure(found) if found else None

    step = steady_step
    rss = lambda found: max(run["peak_rss"] for run in found) / 2 ** 30  # noqa: E731
    lines = ["| step | " + " | ".join(COLUMNS[c].label for c in columns) + " |", "| --- |" + " --- |" * len(columns)]
    for title, measure, unit in (("", step, "s"), ("peak RSS: ", rss, "GiB")):
        for row in rows:
            cells = [_cell(measure(group(c, row)), plain(row, measure), unit) if group(c, row) else "" for c in columns]
            if any(cells):
                lines.append(f"| {title}{ROWS[row].label} | " + " | ".join(cells) + " |")
    return lines


def paired_ratios(runs: list[dict], columns: list[str], rows: list[str]) -> list[str]:
    """Per row and engine, each round's step time over the plain loop's in the same round."""
    def steady(column, row, round_index):
        found = [run for run in runs if run["column"] == column and run["row"] == row and run["round"] == round_index]
        return steady_step(found) if found else None

    lines = []
    rounds = sorted({run["round"] for run in runs})
    for row in rows:
        for column in columns:
            if column == "plain":
                continue
            ratios = []
            for round_index in rounds:
                mine, base = steady(column, row, round_index), steady("plain", ROWS[row].family, round_index)
                if mine is not None and base:
                    ratios.append(mine / base)
            if ratios:
                spread = f" (median {statistics.median(ratios):.2f}x)" if len(ratios) > 1 else ""
                lines.append(f"- {ROWS[row].label}, {COLUMNS[column].label}: "
                             + ", ".join(f"{ratio:.2f}x" for ratio in ratios) + spread)
    return ["", "step time over the plain loop's, round by round:", *lines] if lines else []


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(runs: list[dict], setup: dict, args: argparse.Namespace, columns: list[str], rows: list[str], load: tuple[str, str]) -> str:
    versions = ", ".join(f"{name} {_version(name)}" for name in ("torch", "transformers", "trl", "megatron-core"))
    lines = [f"# peer_bench {datetime.datetime.now().isoformat(timespec='minutes')}",
             f"machine: {os.cpu_count()} cores, load average {load[0]} at start, {load[1]} at end; {versions}",
             f"model: {setup['model']}, fp32, AdamW lr {LR:g}; a step: {GLOBAL_BATCH} sequences x {SEQ_LENGTH} tokens "
             f"({setup['response_tokens']} response tokens), micro-batch {MICRO_BATCH} (gradient accumulation "
             f"{GLOBAL_BATCH // MICRO_BATCH}); torch threads {setup['threads']} in one process, "
             f"{max(1, setup['threads'] // 2)} per rank at two",
             f"median step over {args.rounds} interleaved round(s) of {args.steps} steps, {_skipped(args.steps)} of each run "
             f"left out; peak RSS of each engine's process tree (the largest over the rounds); (Nx): to the plain loop's "
             "SFT step (SFT rows) or its distillation step (distill and anchored rows)",
             "TRL: SFTTrainer (SFT), GKDTrainer lmbda=0 beta=0 (distill); ours: python -m anchored_megatron.train, "
             "DP=2 and PP=2 under torchrun", "", *table(runs, columns, rows), *paired_ratios(runs, columns, rows)]
    if setup.get("trl_missing"):
        lines += ["", TRL_MISSING]
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 6; --quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 steps, 1 round: a smoke run")
    parser.add_argument("--engines", nargs="+", choices=list(COLUMNS), default=list(COLUMNS), help="columns to run")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--fetch", action="store_true", help="download SmolLM2-135M-Instruct when it is missing")
    parser.add_argument("--output", help="also write the table here")
    parser.add_argument("--json", help="also write every run's raw figures here")
    parser.add_argument("--work-dir", help="keep the model, data, configs and logs here (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of a one-process engine; each of two ranks gets half (at least 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 6)
    args.rounds = args.rounds or (1 if args.quick else 2)
    for name in ("steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def _trl_importable() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def prepare(args: argparse.Namespace, work: str) -> dict:
    hf_dir, description = model_dir(args, work)
    data = os.path.join(work, "data.jsonl")
    write_records(data, hf_dir, work)
    batch = tokenized_batch(data, hf_dir, work)
    import torch

    saved = torch.load(batch, weights_only=True)
    from anchored_megatron.platform import warnings_filter

    warnings_filter.install()  # Megatron-Core's import notices, as anchored-convert silences them
    megatron_dir = convert(hf_dir, work) if any(c.startswith("ours") for c in args.engines) else None
    return {"work": work, "hf_dir": hf_dir, "model": description, "batch": batch, "megatron_dir": megatron_dir,
            "run_yaml": write_run_yaml(work, hf_dir, megatron_dir, data, args.steps), "steps": args.steps,
            "threads": args.threads,
            "response_tokens": int(saved["loss_mask"].sum()),
            "sequences": [sequence_digest(row) for row in saved["tokens"].tolist()]}


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    if args.worker:
        return worker(args.worker)
    columns = [c for c in COLUMNS if c in args.engines]
    trl_missing = "trl" in columns and not _trl_importable()
    if trl_missing:
        print(TRL_MISSING, file=sys.stderr, flush=True)
        columns.remove("trl")
    rows = [r for r in ROWS if r in args.rows and any(r in COLUMNS[c].rows for c in columns)]
    if not rows:
        raise SystemExit(f"nothing to run: no engine of {', '.join(columns) or '(none)'} has a row of {', '.join(args.rows)}")
    work = args.work_dir or tempfile.mkdtemp(prefix="peer-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        setup = dict(prepare(args, work), trl_missing=trl_missing)
        start_load = _load()
        runs = [run_one(setup, column, row, r, args.timeout)
                for r in range(args.rounds) for row in rows for column in (columns if r % 2 == 0 else columns[::-1])
                if row in COLUMNS[column].rows]
        text = report(runs, setup, args, columns, rows, (start_load, _load()))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(text, end="")
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"setup": setup, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
