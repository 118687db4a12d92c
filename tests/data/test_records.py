"""``iter_messages``: the records of each format exactly as written, each named by file and line
(JSON Lines, JSON array) or row (Parquet), values never re-typed, and memory bounded by a part of
the file. Bad records through the whole pipeline: test_bad_input.py."""

import json
import tracemalloc

import pytest

from anchored_megatron.data.records import BadRecord, DataError, Location, iter_messages
from tests.data.conftest import message_records, prompt_records, write_json, write_jsonl, write_parquet


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


def bad_messages(items) -> list[str]:
    return [item.message() for item in items if isinstance(item, BadRecord)]


def array_element_lines(path) -> list[int]:
    """Lines where `write_json` (indent=1) starts each element."""
    return [i for i, line in enumerate(open(path).read().splitlines(), start=1) if line == " {"]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_clean_file_gives_every_record_with_its_location(tmp_path, suffix):
    written = written_records()
    if suffix == "parquet":  # one schema per Parquet file
        written = message_records(6, seed=13)
    writer = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}[suffix]
    path = writer(tmp_path / f"d.{suffix}", written)
    if suffix == "jsonl":
        locations = [Location(path, line=n) for n in range(1, len(written) + 1)]
    elif suffix == "json":
        locations = [Location(path, line=n) for n in array_element_lines(path)]
    else:
        locations = [Location(path, row=n) for n in range(len(written))]
    assert read_all(path) == [(location, expected_messages(r)) for location, r in zip(locations, written, strict=True)]


def test_clean_jsonl_locations_are_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in prompt_records(3, seed=14)]
    path.write_text("\n" + lines[0] + "\n\n" + lines[1] + "\n   \n" + lines[2] + "\n")
    assert [str(location) for location, _ in read_all(path)] == [f"{path}:2", f"{path}:4", f"{path}:6"]


def test_clean_json_array_locations_are_element_lines(tmp_path):
    path = write_json(tmp_path / "d.json", prompt_records(3, seed=15))
    starts = array_element_lines(path)
    assert len(starts) == 3
    assert [str(location) for location, _ in read_all(path)] == [f"{path}:{n}" for n in starts]


def test_bad_jsonl_record_named_by_line(tmp_path):
    good = [json.dumps(r) for r in prompt_records(4, seed=16)]
    path = tmp_path / "d.jsonl"
    # Blank and whitespace-only lines before the bad one are not records, but they are lines.
    path.write_text("\n\n" + good[0] + "\n  \n" + good[1] + "\n" + '{"prompt": "the cat"}' + "\n" + good[2] + "\n")
    items = read_all(path)
    assert bad_messages(items) == [f"{path}:6: missing field: 'response'"]
    assert len(items) == 4


def test_lines_that_are_not_objects_are_each_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(prompt_records(1)[0]) + "\nnull\n1\n[1, 2]\n")
    expected = "invalid field: expected an object with 'prompt'/'response' or 'messages', got"
    assert bad_messages(read_all(path)) == [f"{path}:2: {expected} null", f"{path}:3: {expected} int", f"{path}:4: {expected} list"]


def test_record_over_several_jsonl_lines_is_malformed_at_its_first_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}, indent=1) + "\n")
    assert bad_messages(read_all(path))[0] == (
        f"{path}:1: malformed JSON: Expecting property name enclosed in double quotes (column 2); "
        "the record does not end on this line (JSON Lines holds one record per line)"
    )


def test_bad_parquet_row_named_by_row(tmp_path):
    written = prompt_records(4, seed=17)
    written[3]["response"] = "  "
    path = write_parquet(tmp_path / "d.parquet", written)
    bad = read_all(path)[3]
    assert bad.message() == f"{path} row 3: empty response: 'response' is empty"


def test_number_among_strings_is_one_bad_record(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in prompt_records(3, seed=18)]
    lines.insert(2, json.dumps({"prompt": "the cat", "response": 5}))
    path.write_text("\n".join(lines) + "\n")
    items = read_all(path)
    assert bad_messages(items) == [f"{path}:3: invalid field: 'response' must be a string, got int"]
    assert len(items) == 4


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_numbers_in_every_row_are_not_read_as_text(tmp_path, suffix):
    writer = write_jsonl if suffix == "jsonl" else write_parquet
    path = writer(tmp_path / f"d.{suffix}", [{"prompt": "the cat", "response": n} for n in range(3)])
    assert all(isinstance(item, BadRecord) and item.kind == "invalid field" for item in read_all(path))


def test_values_are_kept_verbatim(tmp_path):
    # Date-like strings stay as written, and a field that holds different types in different
    # records (here `id`, not a record field) does not change how the records are read.
    written = [
        {"prompt": "2020-01-01T10:00:00Z", "response": "2021-02-03", "id": 1},
        {"prompt": "1.50", "response": "null", "id": "a"},
        {"prompt": "true", "response": "[1, 2]", "id": [1]},
    ]
    for path in (write_jsonl(tmp_path / "d.jsonl", written), write_json(tmp_path / "d.json", written)):
        assert [messages for _, messages in read_all(path)] == [expected_messages(r) for r in written]


def test_binary_parquet_columns_are_decoded(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": pa.array([b"the cat", b"caf\xe9"]), "response": pa.array([b"the dog", b"ok"])}), path)
    assert read_all(path) == [
        (Location(path, row=0), expected_messages({"prompt": "the cat", "response": "the dog"})),
        BadRecord(Location(path, row=1), "non-UTF-8 bytes", "invalid byte 0xe9 in a binary column"),
    ]


def test_parquet_columns_other_than_the_record_fields_are_not_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A binary column with bytes that are not UTF-8 would make the row bad if it were read.
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["the cat"], "response": ["the dog"], "raw": pa.array([b"\xff"])}), path)
    assert read_all(path) == [(Location(path, row=0), expected_messages({"prompt": "the cat", "response": "the dog"}))]


def test_corrupt_parquet_page_is_named_by_the_rows_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    written = prompt_records(20_000, seed=19)
    pq.write_table(pa.Table.from_pylist(written), path, row_group_size=5000)
    page = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    with open(path, "r+b") as fh:  # the page header of the third row group's first column
        fh.seek(page)
        fh.write(b"\xff" * 64)
    items = []
    with pytest.raises(DataError) as info:
        items.extend(iter_messages(path))
    assert str(info.value).startswith(f"{path}: cannot read Parquet file from row {len(items)} on: ")
    assert 0 < len(items) <= 10_000
    assert items == [(Location(path, row=n), expected_messages(r)) for n, r in enumerate(written[: len(items)])]


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{path}: cannot read Parquet file: "):
        read_all(path)


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_reading_holds_a_part_of_the_file_not_all_of_it(tmp_path, suffix):
    # About 12 MB of records; holding the file (as bytes or text) would take more than that.
    written = [{"prompt": f"{i} " + "the cat sat " * 40, "response": "on the mat " * 50} for i in range(12_000)]
    path = (write_jsonl if suffix == "jsonl" else write_json)(tmp_path / f"d.{suffix}", written)
    size = (tmp_path / f"d.{suffix}").stat().st_size
    assert size > 12_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_messages(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(written)
    assert peak < size / 3, (peak, size)
