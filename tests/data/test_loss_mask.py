"""Loss masks cover exactly the response tokens (+ EOS), checked by decoding against
text rendered independently (plain f-strings, raw sentencepiece, transformers' chat template)."""

import pytest
import torch

from anchored_megatron.data import DataConfig, build_sft_dataset, load_tokenizer
from tests.data.conftest import message_records, prompt_records, write_json, write_jsonl, write_parquet

SEQ = 512  # the tiny test tokenizers spend many tokens per word
WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}


def padded_dataset(tmp_path, records, tokenizer_path, fmt="jsonl", **options):
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", records)
    cfg = DataConfig(paths=[path], tokenizer=tokenizer_path, packing=False, cache_dir=str(tmp_path / "cache"), **options)
    tokenizer = load_tokenizer(tokenizer_path)
    return build_sft_dataset(cfg, tokenizer, SEQ), tokenizer


def document(item):
    keep = item["document_ids"] >= 0
    return item["tokens"][keep].tolist()


def trained_groups(item, eos_id):
    """Trained label ids split after each EOS: one group per assistant turn."""
    ids = item["labels"][item["loss_mask"].bool()].tolist()
    groups, current = [], []
    for token in ids:
        current.append(token)
        if token == eos_id:
            groups.append(current)
            current = []
    assert not current, "every trained span must end with EOS"
    return groups


def check_mask_consistency(item):
    trained = item["loss_mask"].bool()
    assert item["loss_mask"].dtype == torch.float32 and item["labels"].dtype == torch.int64
    assert torch.equal(trained, item["labels"] != -100)
    # a trained label is the next input token
    positions = trained.nonzero().squeeze(1)
    assert torch.equal(item["labels"][positions], item["tokens"][positions + 1])


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_prompt_response_default_template_sentencepiece(tmp_path, sp_dir, fmt):
    import sentencepiece

    records = prompt_records(20)
    ds, tok = padded_dataset(tmp_path, records, sp_dir, fmt)
    raw = sentencepiece.SentencePieceProcessor(model_file=f"{sp_dir}/tokenizer.model")
    assert len(ds) == len(records)
    for record, item in zip(records, (ds[i] for i in range(len(ds)))):
        check_mask_consistency(item)
        expected_prompt = [raw.bos_id()] + raw.encode(f"User: {record['prompt']}\n\nAssistant: ")
        expected_response = raw.encode(record["response"]) + [raw.eos_id()]
        assert document(item) == expected_prompt + expected_response
        assert item["labels"][item["loss_mask"].bool()].tolist() == expected_response
        assert raw.decode(item["labels"][item["loss_mask"].bool()].tolist()) == record["response"]
        # exactly the positions that predict a response token carry loss
        first = len(expected_prompt) - 1
        expected_mask = torch.zeros(SEQ)
        expected_mask[first : first + len(expected_response)] = 1.0
        assert torch.equal(item["loss_mask"], expected_mask)


def test_messages_default_template_sentencepiece(tmp_path, sp_dir):
    records = message_records(20)
    ds, tok = padded_dataset(tmp_path, records, sp_dir)
    for record, item in zip(records, (ds[i] for i in range(len(ds)))):
        check_mask_consistency(item)
        rendered = ""
        for m in record["messages"]:
            rendered += {"system": "System: {}\n\n", "user": "User: {}\n\n", "assistant": "Assistant: {}"}[m["role"]].format(m["content"])
        assert tok.decode(document(item)) == rendered  # BOS / EOS decode to ""
        groups = trained_groups(item, tok.eos_id)
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert [tok.decode(g[:-1]) for g in groups] == answers


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.mark.parametrize("schema", ["messages", "prompt"])
def test_chat_template_hf_tokenizer(tmp_path, hf_dir, hf_reference, schema):
    records = message_records(15) if schema == "messages" else prompt_records(15)
    ds, tok = padded_dataset(tmp_path, records, hf_dir)
    assert tok.eos_id == hf_reference.convert_tokens_to_ids("<|im_end|>")
    for record, item in zip(records, (ds[i] for i in range(len(ds)))):
        check_mask_consistency(item)
        messages = record.get("messages") or [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]},
        ]
        rendered = hf_reference.apply_chat_template(messages, tokenize=False)
        assert tok.decode(document(item)) == rendered
        groups = trained_groups(item, tok.eos_id)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # the <|im_end|> closing each answer is the EOS; it is trained, once
        assert [hf_reference.decode(g[:-1]) for g in groups] == answers
        assert all(g.count(tok.eos_id) == 1 for g in groups)


def test_default_template_forced_on_hf_tokenizer(tmp_path, hf_dir, hf_reference):
    records = prompt_records(5)
    ds, tok = padded_dataset(tmp_path, records, hf_dir, chat_template="default")
    for record, item in zip(records, (ds[i] for i in range(len(ds)))):
        assert tok.decode(document(item)) == f"User: {record['prompt']}\n\nAssistant: {record['response']}<|im_end|>"
        trained = item["labels"][item["loss_mask"].bool()].tolist()
        assert trained[-1] == tok.eos_id
        assert hf_reference.decode(trained[:-1]) == record["response"]


def test_chat_template_override_from_file(tmp_path, sp_dir):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    records = prompt_records(5)
    ds, tok = padded_dataset(tmp_path, records, sp_dir, chat_template=str(template))
    for record, item in zip(records, (ds[i] for i in range(len(ds)))):
        assert tok.decode(document(item)) == f"user: {record['prompt']}\nassistant: {record['response']}\n"
        trained = item["labels"][item["loss_mask"].bool()].tolist()
        assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]) == record["response"]


def test_padding_mode_layout(tmp_path, sp_dir):
    ds, tok = padded_dataset(tmp_path, prompt_records(4), sp_dir)
    item = ds[0]
    n = int((item["document_ids"] >= 0).sum())
    assert item["document_ids"][:n].eq(0).all() and item["document_ids"][n:].eq(-1).all()
    assert item["position_ids"][:n].tolist() == list(range(n))
    assert item["tokens"][n:].eq(tok.pad_id).all()
    assert item["loss_mask"][n - 1 :].eq(0).all()  # the last token of a document has no target
    assert ds.stats["num_sequences"] == 4 and ds.stats["packing"] is False
