"""Read SFT records from local JSONL / JSON / Parquet files and check their shape.

Files are read with the standard ``json`` module and ``pyarrow`` rather than
``datasets.load_dataset``: a bad record must be reported by file and line (or row)
and, with ``on_bad_record: skip``, skipped on its own, which the ``datasets``
loaders cannot do (they fail the whole file with an Arrow error).

Two schemas: ``{"prompt", "response"[, "system"]}`` and
``{"messages": [{"role": system|user|assistant, "content": str}, ...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

ROLES = ("system", "user", "assistant")

# Problem kinds, the keys of the skip counts.
MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "non-UTF-8 bytes"
MISSING_FIELD = "missing field"
BAD_FIELD = "invalid field"
EMPTY_RESPONSE = "empty response"
TOO_LONG = "longer than seq_length"


class DataError(ValueError):
    """A bad record (or unreadable file); the message names the file and line or row."""


@dataclass(frozen=True)
class Location:
    path: str
    line: int | None = None  # 1-based line (JSONL / JSON)
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


def iter_file(path: str) -> Iterator[tuple[Location, object] | BadRecord]:
    """Yield ``(location, raw record)`` or ``BadRecord`` for each record of the file."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        yield from _iter_json_array(path)
    else:  # JSON Lines (also a .json file holding one object per line, as `datasets` accepts)
        yield from _iter_jsonl(path)


def _iter_jsonl(path: str):
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
            if not text.strip():
                continue  # blank lines (a trailing newline) are not records
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield BadRecord(location, MALFORMED_JSON, f"{exc.msg} (column {exc.colno})")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _iter_json_array(path: str):
    with open(path, "rb") as fh:
        data = fh.read()
    # surrogateescape keeps going past bad bytes; the records holding them are reported below.
    text = data.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{Location(path, line=_line_of(text, pos))}: {MALFORMED_JSON}: the JSON array is not closed")
        if text[pos] == "]":
            return
        location = Location(path, line=_line_of(text, pos))
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Inside an array there is no safe place to resume, so this is fatal even with
            # on_bad_record: skip (JSON Lines files can skip single lines).
            raise DataError(
                f"{Location(path, line=exc.lineno)}: {MALFORMED_JSON}: {exc.msg} (column {exc.colno}); "
                "a syntax error inside a JSON array cannot be skipped (JSON Lines records can)"
            ) from None
        bad_byte = _find_escaped_byte(record)
        if bad_byte is not None:
            yield BadRecord(location, NOT_UTF8, f"invalid byte 0x{bad_byte:02x} in the record")
        else:
            yield location, record


def _find_escaped_byte(value) -> int | None:
    if isinstance(value, str):
        for ch in value:
            if "\udc80" <= ch <= "\udcff":
                return ord(ch) - 0xDC00
        return None
    if isinstance(value, dict):
        items = list(value.keys()) + list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        found = _find_escaped_byte(item)
        if found is not None:
            return found
    return None


def _iter_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
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


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def to_messages(record, location: Location) -> list[dict] | BadRecord:
    """Normalise one record to a list of ``{"role", "content"}``, or say what is wrong."""
    if not isinstance(record, dict):
        return BadRecord(location, BAD_FIELD, f"expected an object with 'prompt'/'response' or 'messages', got {_type_name(record)}")
    if record.get("messages") is not None:
        return _check_messages(record["messages"], location)
    if "prompt" not in record and "response" not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        return BadRecord(location, MISSING_FIELD, f"expected 'prompt' and 'response', or 'messages' (fields present: {keys})")
    for name in ("prompt", "response"):
        if record.get(name) is None:  # absent, JSON null, or a Parquet null
            return BadRecord(location, MISSING_FIELD, f"'{name}'")
        if not isinstance(record[name], str):
            return BadRecord(location, BAD_FIELD, f"'{name}' must be a string, got {_type_name(record[name])}")
    if not record["response"].strip():
        return BadRecord(location, EMPTY_RESPONSE, "'response' is empty")
    messages = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            return BadRecord(location, BAD_FIELD, f"'system' must be a string, got {_type_name(system)}")
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return messages


def _check_messages(messages, location: Location):
    if not isinstance(messages, list) or not messages:
        return BadRecord(location, BAD_FIELD, f"'messages' must be a non-empty list, got {_type_name(messages)}")
    normalised = []
    for i, message in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(message, dict):
            return BadRecord(location, BAD_FIELD, f"'{key}' must be an object, got {_type_name(message)}")
        for name in ("role", "content"):
            if message.get(name) is None:
                return BadRecord(location, MISSING_FIELD, f"'{key}.{name}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return BadRecord(location, BAD_FIELD, f"'{key}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            return BadRecord(location, BAD_FIELD, f"'{key}.content' must be a string, got {_type_name(content)}")
        if role == "assistant" and not content.strip():
            return BadRecord(location, EMPTY_RESPONSE, f"'{key}.content' (assistant) is empty")
        normalised.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in normalised):
        return BadRecord(location, EMPTY_RESPONSE, "no assistant message")
    return normalised
