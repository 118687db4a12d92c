"""Test data built offline in temporary directories: a sentencepiece model trained on
generated text, an HF tokenizer directory (``tokenizers`` + a ChatML template), and
writers for JSONL / JSON / Parquet record files."""

import json
import random

import pytest

WORDS = (
    "the cat dog sat on a mat red blue green house tree river runs jumps quickly slowly what is capital of "
    "Paris France Rome Italy answer question please tell me two plus three equals five"
).split()

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sentence(rng: random.Random, low: int = 1, high: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [sentence(rng, 4, 12) for _ in range(3000)]
    lines += ["System: User: Assistant: ? . , ! : 0 1 2 3 4 5 6 7 8 9"] * 20  # template characters
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory, corpus_file):
    from anchored_megatron.data.train_tokenizer import main

    out = tmp_path_factory.mktemp("sp")
    assert main(["--input", corpus_file, "--vocab-size", "200", "--output", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, corpus_file):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=240, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([corpus_file], trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=1)
    return str(path)


def write_parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def prompt_records(n: int, seed: int = 1, low: int = 1, high: int = 10) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, low, high), "response": sentence(rng, low, high)} for _ in range(n)]


def message_records(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": sentence(rng)}, {"role": "assistant", "content": sentence(rng)}]
        records.append({"messages": messages})
    return records
