"""A tiny end-to-end setting for trainer tests: a sentencepiece tokenizer, SFT records, and
base / teacher checkpoints of a 4-layer Llama-shaped model, all built offline."""

import json
import random

import pytest

from anchored_megatron.config import ModelConfig

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=256, seq_length=64)
WORDS = "alpha beta gamma delta red blue green one two three four five six seven eight nine ten plus minus equals".split()


def _save_base_and_teacher(base_dir, teacher_dir):
    """Random base; teacher = base with every weight nudged (a stand-in for an SFT'd model)."""
    import torch

    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.checkpoint.weights import save_megatron_weights
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=11)
    model = ModelConfig(**MODEL)
    chunks = build_model_chunks(model, ParallelConfig())
    save_megatron_weights(chunks, base_dir, model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_megatron_weights(chunks, teacher_dir, model)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ranks):
    """Paths for a run: tokenizer dir, data file, base and teacher checkpoints."""
    from anchored_megatron.data.train_tokenizer import main as train_tokenizer

    root = tmp_path_factory.mktemp("tiny_run")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)) + "\nUser: Assistant: System: ? 0 1 2 3\n")
    assert train_tokenizer(["--input", str(corpus), "--vocab-size", "120", "--output", str(root / "tok")]) == 0
    records = [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))),
         "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))}
        for _ in range(64)
    ]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    ranks(_save_base_and_teacher, 1, str(root / "base"), str(root / "teacher"))
    return {"root": root, "tokenizer": str(root / "tok"), "data": str(data), "base": str(root / "base"), "teacher": str(root / "teacher")}


def run_config(tiny_run, output_dir, **overrides):
    """A RunConfig dict for the tiny setting; ``overrides`` are dotted keys."""
    from anchored_megatron.config import merge_overrides

    data = {
        "output_dir": str(output_dir),
        "seed": 3,
        "model": dict(MODEL),
        "student": {"checkpoint": tiny_run["base"]},
        "reference": {"checkpoint": tiny_run["teacher"]},
        "data": {"paths": [tiny_run["data"]], "tokenizer": tiny_run["tokenizer"], "cache_dir": str(tiny_run["root"] / "cache")},
        "anchor": {"objective": "anchored", "alpha": 0.5, "outer_iterations": 2, "epochs_per_iteration": 1},
        "optim": {"lr": 3e-3, "warmup_fraction": 0.1, "clip_grad": 1.0},
        "train": {"micro_batch_size": 1, "global_batch_size": 4, "progress_bar": False, "tensorboard": False},
    }
    return merge_overrides(data, [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in overrides.items()])


def read_metrics(output_dir):
    """Every step's record of a run's metrics.jsonl."""
    import os

    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def as_bytes(results) -> bytes:
    """Bytes, not tensors, back from a rank: tensors through the result queue each need a
    shared-memory handle, which can vanish with the rank process before the parent picks it up."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()
