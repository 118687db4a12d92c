"""Train a sentencepiece tokenizer on local text files (one sentence per line).

    python -m anchored_megatron.data.train_tokenizer --input a.txt b.txt --vocab-size 1000 --output DIR

Writes ``DIR/tokenizer.model`` (+ ``tokenizer.vocab``), loadable with
``data.tokenizer: DIR`` or ``DIR/tokenizer.model``. Ids: 0 unk, 1 bos, 2 eos, 3 pad.
Text is kept as is (identity normalisation, whitespace kept, ``\\n`` a piece of its own)
so that decoding gives the original text back and chat templates' newlines survive.
"""

from __future__ import annotations

import argparse
import os
import sys


def _lines(paths: list[str]):
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                yield line.rstrip("\n")


def train(inputs: list[str], vocab_size: int, output: str, model_type: str = "bpe", byte_fallback: bool = False, character_coverage: float = 1.0) -> str:
    import sentencepiece

    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path}: file not found")
    if vocab_size < 8:
        raise ValueError(f"--vocab-size must be >= 8, got {vocab_size}")
    os.makedirs(output, exist_ok=True)
    prefix = os.path.join(output, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        # An iterator, not `input=`: sentencepiece splits that string on commas, so a path
        # holding one would break.
        sentence_iterator=_lines(inputs),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # pieces encoded one by one concatenate to exactly the rendered text
        hard_vocab_limit=False,  # small corpora: fewer pieces rather than a failure
        minloglevel=2,
    )
    return prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="directory for tokenizer.model")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    parser.add_argument("--byte-fallback", action="store_true", help="encode unseen characters as bytes (needs vocab >= ~300)")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        model = train(args.input, args.vocab_size, args.output, args.model_type, args.byte_fallback, args.character_coverage)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from anchored_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    print(f"wrote {model}: vocab_size={tokenizer.vocab_size} fingerprint={tokenizer.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
