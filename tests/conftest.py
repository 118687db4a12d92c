import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The anchored loss's compiled kernels are tested against float64 in tests/anchor (test_fused_passes,
# the distributed grid) and end to end in tests/training/test_trainer.py, which switch them on.
# Elsewhere the eager passes (the same numbers to fp32 rounding) spare every rank process the
# Dynamo trace and compile: about 30% of a trainer test's time.
os.environ.setdefault("ANCHORED_FUSED_LOSS", "0")

from anchored_megatron.platform import run_on_ranks  # noqa: E402


@pytest.fixture(scope="session")
def ranks():
    """``ranks(fn, n, *args, **kwargs)`` runs a module-level ``fn`` on n gloo ranks; returns per-rank results."""
    return run_on_ranks


def write_word_tokenizer(directory, words=("a", "b", "c")) -> str:
    """A minimal Hugging Face tokenizer directory (word level, with an EOS token) for tests that
    need a real tokenizer but no trained one."""
    import json
    import os

    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["<unk>", "<eos>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"eos_token": "<eos>"}, fh)
    return str(directory)
