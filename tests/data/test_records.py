"""Files are read through Hugging Face ``datasets``; a bad row in a file it loads is still named
by file and line, and a file it cannot load (or loads with other types) is read record by record."""

import json
import os

import datasets
import pytest

from anchored_megatron.data import records
from anchored_megatron.data.records import BadRecord, iter_messages
from tests.data.conftest import message_records, prompt_records, write_json, write_jsonl, write_parquet


@pytest.fixture
def loads(monkeypatch):
    """Every ``datasets.load_dataset`` call: (builder, keyword arguments, dataset or exception)."""
    calls = []
    original = datasets.load_dataset

    def spy(builder, **kwargs):
        try:
            dataset = original(builder, **kwargs)
        except Exception as exc:
            calls.append((builder, kwargs, exc))
            raise
        calls.append((builder, kwargs, dataset))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


@pytest.fixture
def no_fallback(monkeypatch):
    """Fails the test if the json / pyarrow reader is used."""

    def fail(path):
        raise AssertionError(f"{path} was read without datasets")

    monkeypatch.setattr(records, "iter_file", fail)


def expected_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    system = [{"role": "system", "content": record["system"]}] if "system" in record else []
    return system + [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def written_records() -> list[dict]:
    plain = prompt_records(4, seed=11)
    plain[1]["system"] = "be brief"
    return plain + message_records(4, seed=12)


def read_all(path) -> list:
    return list(iter_messages(str(path)))


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_clean_file_read_through_datasets(tmp_path, loads, no_fallback, suffix):
    written = written_records()
    if suffix == "parquet":  # one schema per Parquet file
        written = message_records(6, seed=13)
    writer = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}[suffix]
    path = writer(tmp_path / f"d.{suffix}", written)
    items = read_all(path)
    assert [messages for _, messages in items] == [expected_messages(r) for r in written]
    assert [(builder, kwargs["data_files"]) for builder, kwargs, _ in loads] == [
        ("parquet" if suffix == "parquet" else "json", os.path.abspath(path))
    ]


def test_clean_jsonl_locations_are_lines(tmp_path, loads, no_fallback):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in prompt_records(3, seed=14)]
    path.write_text("\n" + lines[0] + "\n\n" + lines[1] + "\n   \n" + lines[2] + "\n")
    assert [str(location) for location, _ in read_all(path)] == [f"{path}:2", f"{path}:4", f"{path}:6"]


def test_clean_json_array_locations_are_element_lines(tmp_path, no_fallback):
    path = write_json(tmp_path / "d.json", prompt_records(3, seed=15))
    starts = [i for i, line in enumerate(open(path).read().splitlines(), start=1) if line == " {"]
    assert len(starts) == 3
    assert [str(location) for location, _ in read_all(path)] == [f"{path}:{n}" for n in starts]


def test_bad_row_of_loaded_jsonl_named_by_line(tmp_path, loads, no_fallback):
    good = [json.dumps(r) for r in prompt_records(4, seed=16)]
    path = tmp_path / "d.jsonl"
    # Blank and whitespace-only lines before the bad one are not records, but they are lines.
    path.write_text("\n\n" + good[0] + "\n  \n" + good[1] + "\n" + '{"prompt": "the cat"}' + "\n" + good[2] + "\n")
    items = read_all(path)
    bad = [item for item in items if isinstance(item, BadRecord)]
    assert [b.message() for b in bad] == [f"{path}:6: missing field: 'response'"]
    assert len(items) == 4 and isinstance(loads[0][2], datasets.Dataset)


def test_null_line_judged_on_its_raw_json(tmp_path, no_fallback):
    # datasets reads a `null` line as a row of nulls; the report says what the file holds.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(prompt_records(1)[0]) + "\nnull\n")
    bad = read_all(path)[1]
    assert bad.message() == f"{path}:2: invalid field: expected an object with 'prompt'/'response' or 'messages', got null"


def test_bad_row_of_loaded_parquet_named_by_row(tmp_path, loads, no_fallback):
    written = prompt_records(4, seed=17)
    written[3]["response"] = "  "
    path = write_parquet(tmp_path / "d.parquet", written)
    bad = read_all(path)[3]
    assert bad.message() == f"{path} row 3: empty response: 'response' is empty"


def test_number_among_strings_read_record_by_record(tmp_path, loads):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in prompt_records(3, seed=18)]
    lines.insert(2, json.dumps({"prompt": "the cat", "response": 5}))
    path.write_text("\n".join(lines) + "\n")
    items = read_all(path)
    assert isinstance(loads[0][2], Exception)  # datasets fails the whole file
    assert [b.message() for b in items if isinstance(b, BadRecord)] == [f"{path}:3: invalid field: 'response' must be a string, got int"]
    assert len(items) == 4


def test_numbers_in_every_row_are_not_read_as_text(tmp_path):
    # datasets loads this file with an int64 column; the records still are not strings.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat", "response": n} for n in range(3)])
    assert all(isinstance(item, BadRecord) and item.kind == "invalid field" for item in read_all(path))


def test_date_like_strings_kept_verbatim_past_the_first_chunk(tmp_path):
    # More than datasets' default 10 MB chunk, the second chunk all date-like prompts: read in
    # such chunks, those would be parsed as timestamps and cast back to differently written strings.
    filler = {"prompt": "the cat", "response": "x" * 1000}
    later = {"prompt": "2020-01-01T10:00:00Z", "response": "the dog"}
    path = write_jsonl(tmp_path / "d.jsonl", [filler] * 9_000 + [later] * 30_000)
    assert os.path.getsize(path) > 10 << 20
    prompts = {messages[0]["content"] for _, messages in read_all(path)[9_000:]}
    assert prompts == {later["prompt"]}


def test_binary_parquet_columns_are_decoded(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": pa.array([b"the cat"]), "response": pa.array([b"the dog"])}), path)
    assert read_all(path) == [(records.Location(path, row=0), expected_messages({"prompt": "the cat", "response": "the dog"}))]


def test_datasets_cache_is_temporary_and_quiet(tmp_path, loads, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(3))
    read_all(path)
    cache_dir = loads[0][1]["cache_dir"]
    assert not os.path.exists(cache_dir)
    assert not cache_dir.startswith(os.path.expanduser("~/.cache"))
    assert "Generating" not in capsys.readouterr().err
