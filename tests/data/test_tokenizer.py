"""Tokenizers load offline and agree with the libraries they wrap (sentencepiece,
transformers); the fingerprint separates different vocabularies."""

import os
import subprocess
import sys

import pytest

from anchored_megatron.data import TokenizerError, load_tokenizer
from anchored_megatron.data.train_tokenizer import main as train_main

TEXTS = ["the cat sat on a mat", "what is the capital of France ?", "two plus three equals five\n\nPlease", "Rome"]


def test_sentencepiece_matches_library(sp_dir):
    import sentencepiece

    raw = sentencepiece.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (raw.get_piece_size(), 1, 2, 3)
    for text in TEXTS:
        assert tok.encode(text) == raw.encode(text)
        assert tok.decode(tok.encode(text)) == text  # identity normalisation: exact round trip
    assert tok.encode_batch(TEXTS) == [raw.encode(t) for t in TEXTS]


def test_hf_directory_matches_transformers(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_dir)
    tok = load_tokenizer(hf_dir)
    assert tok.vocab_size == len(ref)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (ref.eos_token_id, ref.pad_token_id, None)
    assert tok.chat_template == ref.chat_template
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False))
    assert load_tokenizer(os.path.join(hf_dir, "tokenizer.json")).fingerprint == tok.fingerprint


def test_fingerprint_identifies_vocabulary(sp_dir, hf_dir, corpus_file, tmp_path):
    sp = load_tokenizer(sp_dir)
    assert load_tokenizer(os.path.join(sp_dir, "tokenizer.model")).fingerprint == sp.fingerprint
    assert sp.fingerprint != load_tokenizer(hf_dir).fingerprint
    assert train_main(["--input", corpus_file, "--vocab-size", "180", "--output", str(tmp_path / "other")]) == 0
    assert load_tokenizer(str(tmp_path / "other")).fingerprint != sp.fingerprint


def test_train_tokenizer_module_command(corpus_file, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "anchored_megatron.data.train_tokenizer", "--input", corpus_file, corpus_file,
         "--vocab-size", "150", "--output", str(out)],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert load_tokenizer(str(out)).vocab_size == 150
    missing = subprocess.run(
        [sys.executable, "-m", "anchored_megatron.data.train_tokenizer", "--input", "nope.txt", "--vocab-size", "50", "--output", str(out)],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=120,
    )
    assert missing.returncode == 2 and "--input nope.txt: file not found" in missing.stderr


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(str(bogus))


def test_train_tokenizer_accepts_a_path_with_a_comma(tmp_path):
    from anchored_megatron.data import load_tokenizer
    from anchored_megatron.data.train_tokenizer import main

    folder = tmp_path / "runs,seed=1"
    folder.mkdir()
    corpus = folder / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nred blue green\n" * 50)
    assert main(["--input", str(corpus), "--vocab-size", "40", "--output", str(folder / "tok")]) == 0
    tok = load_tokenizer(str(folder / "tok"))
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
