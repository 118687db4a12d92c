"""Every bad-input case names the file and line (or row) and the problem; with
``on_bad_record: skip`` it is counted and the counts are printed."""

import json

import pytest

from anchored_megatron.config import ConfigError
from anchored_megatron.config import build as build_config
from anchored_megatron.data import DataConfig, DataError, build_sft_dataset, load_tokenizer
from anchored_megatron.data.files import check_data_files
from tests.data.conftest import prompt_records, write_json, write_parquet

SEQ = 64
GOOD = [json.dumps(r).encode() for r in prompt_records(4, seed=9, high=4)]
LONG = json.dumps({"prompt": "the cat", "response": " ".join(["house"] * 200)}).encode()

# case -> (bad JSONL line, problem kind, words in the detail)
CASES = {
    "malformed_json": (b'{"prompt": "the cat", "response": ', "malformed JSON", "Expecting"),
    "missing_field": (b'{"prompt": "the cat"}', "missing field", "'response'"),
    "empty_response": (b'{"prompt": "the cat", "response": "   "}', "empty response", "'response' is empty"),
    "empty_assistant": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}', "empty response", "messages[1].content"),
    "non_utf8": (b'{"prompt": "caf\xe9", "response": "the dog"}', "non-UTF-8 bytes", "0xe9"),
    "too_long": (LONG, "longer than seq_length", f"> seq_length {SEQ}"),
}


def write_with_bad_line(path, bad: bytes, at_line: int = 3) -> str:
    lines = GOOD[: at_line - 1] + [bad] + GOOD[at_line - 1 :]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def build_ds(path, sp_dir, tmp_path, **options):
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "cache"), **options)
    return build_sft_dataset(cfg, load_tokenizer(sp_dir), SEQ)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_error_names_file_and_line(tmp_path, sp_dir, case):
    bad, kind, detail = CASES[case]
    path = write_with_bad_line(tmp_path / "d.jsonl", bad, at_line=3)
    with pytest.raises(DataError) as info:
        build_ds(path, sp_dir, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: {kind}: "), message
    assert detail in message and "on_bad_record: skip" in message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_skipped_and_counted(tmp_path, sp_dir, case, capsys):
    bad, kind, _ = CASES[case]
    path = write_with_bad_line(tmp_path / "d.jsonl", bad, at_line=2)
    ds = build_ds(path, sp_dir, tmp_path, on_bad_record="skip")
    assert ds.stats["skipped"] == {kind: 1} and ds.stats["num_skipped"] == 1
    assert ds.stats["num_records"] == len(GOOD) + 1 and ds.stats["num_documents"] == len(GOOD)
    assert f"skipped 1 bad records: 1 {kind}" in capsys.readouterr().out


def test_too_long_is_truncated_only_when_asked(tmp_path, sp_dir):
    path = write_with_bad_line(tmp_path / "d.jsonl", LONG, at_line=1)
    ds = build_ds(path, sp_dir, tmp_path, truncate=True, packing=False)
    assert ds.stats["num_truncated"] == 1 and ds.stats["num_skipped"] == 0
    first = ds[0]
    assert bool((first["document_ids"] == 0).all())  # exactly seq_length tokens
    assert first["loss_mask"].sum() > 0


def test_parquet_bad_row_is_named(tmp_path, sp_dir):
    records = prompt_records(5, seed=3, high=4)
    records[2] = {"prompt": "the cat", "response": None}
    path = write_parquet(tmp_path / "d.parquet", records)
    with pytest.raises(DataError, match=rf"^{path} row 2: missing field: 'response'"):
        build_ds(path, sp_dir, tmp_path)
    assert build_ds(path, sp_dir, tmp_path, on_bad_record="skip").stats["skipped"] == {"missing field": 1}


def test_json_array_bad_bytes_named_and_skippable(tmp_path, sp_dir):
    text = json.dumps(prompt_records(3, seed=4, high=4), indent=1).encode()
    path = tmp_path / "d.json"
    path.write_bytes(text.replace(b'"prompt": "', b'"prompt": "\xff', 1))  # in the first record
    with pytest.raises(DataError, match=rf"^{path}:2: non-UTF-8 bytes: invalid byte 0xff"):
        build_ds(str(path), sp_dir, tmp_path)
    assert build_ds(str(path), sp_dir, tmp_path, on_bad_record="skip").stats["skipped"] == {"non-UTF-8 bytes": 1}


def write_array_with_broken_element(path, records, broken: int) -> tuple[str, int]:
    """A pretty-printed JSON array whose element ``broken`` lacks the ':' after "response";
    returns the path and the line of that syntax error."""
    elements = [json.dumps(r, indent=1).replace("\n", "\n ") for r in records]
    elements[broken] = elements[broken].replace('"response":', '"response"', 1)
    text = "[\n " + ",\n ".join(elements) + "\n]\n"
    path.write_text(text)
    error_line = next(i for i, line in enumerate(text.splitlines(), start=1) if line.strip().startswith('"response" '))
    return str(path), error_line


def test_json_array_broken_element_skipped_and_counted(tmp_path, sp_dir):
    records = prompt_records(5, seed=5, high=4)
    path, _ = write_array_with_broken_element(tmp_path / "d.json", records, broken=2)
    ds = build_ds(path, sp_dir, tmp_path, on_bad_record="skip", packing=False)
    assert ds.stats["skipped"] == {"malformed JSON": 1}
    assert ds.stats["num_records"] == 5 and ds.stats["num_documents"] == 4


def test_json_array_broken_element_error_names_its_line(tmp_path, sp_dir):
    path, line = write_array_with_broken_element(tmp_path / "d.json", prompt_records(5, seed=5, high=4), broken=2)
    assert line > 3  # inside the file, not on its first lines
    with pytest.raises(DataError, match=rf"^{path}:{line}: malformed JSON: Expecting ':' delimiter .*on_bad_record: skip"):
        build_ds(path, sp_dir, tmp_path)


def test_json_array_unclosed_bracket_is_fatal_even_when_skipping(tmp_path, sp_dir):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": "a", "response": ["b"},\n {"prompt": "c", "response": "d"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON: .*rest of the file cannot be read"):
        build_ds(str(path), sp_dir, tmp_path, on_bad_record="skip")


def test_text_after_json_array_is_an_error(tmp_path, sp_dir):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "response": "b"}\n]\n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=rf"^{path}:4: malformed JSON: text after the end of the JSON array"):
        build_ds(str(path), sp_dir, tmp_path, on_bad_record="skip")


def test_json_array_of_records_is_read(tmp_path, sp_dir):
    path = write_json(tmp_path / "d.json", prompt_records(6, seed=8, high=4))
    assert build_ds(path, sp_dir, tmp_path).stats["num_documents"] == 6


def test_no_usable_records(tmp_path, sp_dir):
    path = tmp_path / "d.jsonl"
    path.write_bytes(CASES["missing_field"][0] + b"\n")
    with pytest.raises(DataError, match="no usable records"):
        build_ds(str(path), sp_dir, tmp_path, on_bad_record="skip")


@pytest.mark.parametrize(
    "options, key",
    [
        ({"paths": []}, "data.paths"),
        ({"paths": ["missing.jsonl"]}, "data.paths[0]"),
        ({"paths": ["x.csv"]}, "data.paths[0]"),
        ({"weights": [1.0, 2.0]}, "data.weights"),
        ({"weights": [-1.0]}, "data.weights[0]"),
        ({"tokenizer": None}, "data.tokenizer"),
        ({"tokenizer": "/no/such/tokenizer"}, "data.tokenizer"),
        ({"on_bad_record": "ignore"}, "data.on_bad_record"),
        ({"packing": "yes"}, "data.packing"),
        ({"chat_template": "chatml"}, "data.chat_template"),
    ],
)
def test_config_errors_name_the_key(tmp_path, sp_dir, options, key):
    good = write_json(tmp_path / "d.json", prompt_records(2))
    values = {"paths": [good], "tokenizer": sp_dir, **options}
    with pytest.raises(ConfigError) as info:
        check_data_files(DataConfig(**values))
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_yaml_section_maps_onto_config(tmp_path, sp_dir):
    good = write_json(tmp_path / "d.json", prompt_records(2))
    cfg = build_config(DataConfig, {"paths": [good], "tokenizer": sp_dir, "packing": False}, "data")
    cfg.validate()
    assert cfg.packing is False and cfg.on_bad_record == "error"
    with pytest.raises(ConfigError, match=r"^data\.shufle: unknown option"):
        build_config(DataConfig, {"shufle": "per_rank"}, "data")
    with pytest.raises(ConfigError, match=r"^data\.shuffle: expected a string, got True"):
        build_config(DataConfig, {"shuffle": True}, "data")


def test_prefix_unstable_chat_template_is_refused(tmp_path, sp_dir):
    path = write_json(tmp_path / "d.json", prompt_records(2, high=3))
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match=r"^data\.chat_template: .*not a prefix"):
        build_ds(path, sp_dir, tmp_path, chat_template=template)


def test_byte_order_mark_is_not_a_bad_record(tmp_path, sp_dir):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(GOOD) + b"\n")
    assert build_ds(str(path), sp_dir, tmp_path).stats["num_documents"] == len(GOOD)
