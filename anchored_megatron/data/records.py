"""Read SFT records from local JSON Lines / JSON array / Parquet files, one record at a time.

``iter_messages`` is the one way in: it picks the reader for the file's format, checks each
record against the schemas (``schema.py``) and yields ``(location, messages)`` for a good record
and ``BadRecord`` for a bad one. Each reader streams (memory: one line; one array element in a
window of ``json_array.CHUNK_CHARS`` characters; one Parquet batch) and knows where it is as it
reads, so every record is named by ``file:line`` (JSON Lines, JSON array: the line where the record
starts) or ``file row N`` (Parquet, 0-based):

- JSON Lines (``.jsonl``, and a ``.json`` file that does not start with '['): one record per
  line, decoded with the ``json`` module; a line that does not decode or is not UTF-8 is one bad
  record and the next line is read as usual. Blank lines are not records.
- JSON array (``.json`` starting with '['): ``json_array.iter_elements``, which decodes element
  by element and resumes after a broken one (its limits are in that module).
- Parquet: ``pyarrow.parquet.ParquetFile.iter_batches`` over the record fields' columns, read
  through a buffer per column rather than a row group at a time; binary columns are decoded as UTF-8.

Why not Hugging Face ``datasets`` (``load_dataset("json" | "parquet")``): it fails a whole file
on one bad record with an Arrow error that names no record and cannot skip it, and it gives
values types the file does not say (JSON read in chunks is cast to the types of the first chunk,
so date-like strings come back re-formatted; a field with mixed types becomes JSON text). Keeping
the meaning meant reading each JSON file as one chunk (memory of a few times the file), and naming
or skipping a bad record still needed a second, complete reader. For Parquet it reads with the
same pyarrow reader used here, plus an Arrow cache on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from anchored_megatron.data import json_array
from anchored_megatron.data.schema import FIELDS, SchemaError, to_messages

# Problem kinds found while reading (the schema's kinds are in schema.py); keys of the skip counts.
MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "non-UTF-8 bytes"

_PARQUET_BATCH_ROWS = 4096
_PARQUET_BUFFER_BYTES = 1 << 20  # per column read


class DataError(ValueError):
    """A bad record (or unreadable file); the message names the file and line or row."""


@dataclass(frozen=True)
class Location:
    path: str
    line: int | None = None  # 1-based line (JSON Lines / JSON array)
    row: int | None = None  # 0-based row index (Parquet)

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path} row {self.row}"
        return self.path


@dataclass
class BadRecord:
    location: Location
    kind: str
    detail: str

    def message(self) -> str:
        return f"{self.location}: {self.kind}: {self.detail}"


def iter_messages(path: str) -> Iterator[tuple[Location, list[dict]] | BadRecord]:
    """Yield ``(location, messages)`` for each good record of the file and ``BadRecord`` for each bad one."""
    for item in _READERS[_file_kind(path)](path):
        if isinstance(item, BadRecord):
            yield item
            continue
        location, record = item
        try:
            messages = to_messages(record)
        except SchemaError as exc:
            yield BadRecord(location, exc.kind, exc.detail)
            continue
        yield location, messages


def _file_kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if not path.endswith(".json"):
        return "lines"
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        while not head and (chunk := fh.read(4096)):
            head = chunk.lstrip(b" \t\r\n")
    return "array" if head.startswith(b"[") else "lines"


def _read_json_lines(path: str):
    if path.endswith(".json"):
        one_per_line = "a .json file that does not start with '[' is read as JSON Lines: one record per line"
    else:
        one_per_line = "JSON Lines holds one record per line"
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            location = Location(path, line=number)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRecord(location, NOT_UTF8, f"invalid byte 0x{raw[exc.start]:02x} at byte {exc.start} of the line")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the record
            text = text.rstrip("\r\n")  # so that an error at the end of the line has that line's column
            if not text.strip():
                continue  # blank lines (a trailing newline) are not records
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                detail = f"{exc.msg} (column {exc.colno})"
                if exc.pos >= len(text.rstrip()):
                    detail += f"; the record does not end on this line ({one_per_line})"
                yield BadRecord(location, MALFORMED_JSON, detail)
                continue
            yield location, record


def _read_json_array(path: str):
    # surrogateescape lets reading go on past bytes that are not UTF-8; the element holding one is reported.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as stream:
        try:
            for element in json_array.iter_elements(stream):
                location = Location(path, line=element.line)
                if isinstance(element, json_array.BrokenElement):
                    yield BadRecord(location, NOT_UTF8 if element.not_utf8 else MALFORMED_JSON, element.detail)
                else:
                    yield location, element.value
        except json_array.UnreadableArray as exc:
            raise DataError(f"{Location(path, line=exc.line)}: {MALFORMED_JSON}: {exc.reason}") from None


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        # Buffered reads go page by page; by default each column's chunk of a whole row group is read at once.
        parquet = pq.ParquetFile(path, buffer_size=_PARQUET_BUFFER_BYTES, pre_buffer=False)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from None
    # Only the record fields' columns are read; with none of them every row is reported with all its fields.
    columns = [name for name in parquet.schema_arrow.names if name in FIELDS] or None
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001 - a corrupt page surfaces only when it is read
            raise DataError(f"{path}: cannot read Parquet file from row {row} on: {exc}") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            location = Location(path, row=row)
            row += 1
            try:
                yield location, _decode_bytes(record)
            except UnicodeDecodeError as exc:
                yield BadRecord(location, NOT_UTF8, f"invalid byte 0x{exc.object[exc.start]:02x} in a binary column")


def _decode_bytes(value):
    # Binary columns arrive as bytes; strings must be valid UTF-8.
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_bytes(v) for v in value]
    return value


_READERS = {"lines": _read_json_lines, "array": _read_json_array, "parquet": _read_parquet}
