"""Read SFT records from local JSONL / JSON / Parquet files and check their shape.

What reads what:

- Hugging Face ``datasets`` (``load_dataset("json" | "parquet")``, local files, its Arrow cache in
  a temporary directory that is removed afterwards) reads each file; ``iter_messages`` checks its
  rows with ``to_messages``. A row that is bad (or too long, later) is reported by file and line
  (JSON, JSON Lines) or row (Parquet). The line of a JSON row is looked up only when the location
  is printed: ``_SourceIndex`` then scans the file once with the ``json`` module, and the bad row
  is judged again on its raw JSON so that the message is the one the file deserves (``datasets``
  turns a ``null`` line into a row of nulls, for example). Clean files pay nothing for this.
- The standard ``json`` module and ``pyarrow`` (``iter_file``) read a file that ``datasets`` cannot
  load: malformed JSON, non-UTF-8 bytes or one field holding values of different types make it fail
  the whole file with an Arrow error, which names no record and cannot skip one. ``iter_file``
  reports or skips each bad record on its own, by line (or row); in a JSON array it resumes after
  an element that does not decode (``_element_end``). It also reads a file that ``datasets`` loads
  with a type that does not mean what the file says (a string field read as a number, a timestamp
  or bytes, invalid UTF-8 let into a string), and a file with none of the fields below.

So that ``datasets`` rows mean what the JSON says, the JSON loader gets each file as one chunk
(with its default 10 MB chunks, a later chunk is cast to the types of the first: strings that look
like dates come back re-formatted) and ``on_mixed_types=None`` (by default a field with mixed types
is stored as JSON text, and a later chunk's JSON text is cast to a plain string, quotes included).
Holding the file as one chunk costs memory of a few times its size while it is parsed.

Two schemas: ``{"prompt", "response"[, "system"]}`` and
``{"messages": [{"role": system|user|assistant, "content": str}, ...]}``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
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


class LazyLocation:
    """Where row ``index`` of a JSON / JSON Lines file read by ``datasets`` is: printed as
    ``file:line``, the line looked up (once per file) only then."""

    __slots__ = ("_source", "_index")

    def __init__(self, source: _SourceIndex, index: int):
        self._source, self._index = source, index

    def resolve(self) -> Location:
        return self._source.location(self._index)

    def __str__(self) -> str:
        return str(self.resolve())


@dataclass
class BadRecord:
    location: Location | LazyLocation
    kind: str
    detail: str

    def message(self) -> str:
        return f"{self.location}: {self.kind}: {self.detail}"


def iter_messages(path: str) -> Iterator[tuple[Location | LazyLocation, list[dict]] | BadRecord]:
    """Yield ``(location, messages)`` for each good record of the file and ``BadRecord`` for each bad one."""
    kind = _file_kind(path)
    with tempfile.TemporaryDirectory(prefix="anchored-datasets-", ignore_cleanup_errors=True) as scratch:
        dataset = _load_with_datasets(path, kind, scratch)
        if dataset is None:
            for item in iter_file(path):
                if isinstance(item, BadRecord):
                    yield item
                    continue
                messages = to_messages(item[1], item[0])
                yield messages if isinstance(messages, BadRecord) else (item[0], messages)
            return
        source = None if kind == "parquet" else _SourceIndex(path, kind, len(dataset))
        index = 0
        for batch in dataset.with_format("arrow").iter(batch_size=4096):
            for row in batch.to_pylist():
                location = Location(path, row=index) if source is None else LazyLocation(source, index)
                messages = to_messages(row, location)
                if isinstance(messages, BadRecord) and source is not None:
                    raw = source.raw(index)
                    if raw is not _UNKNOWN:
                        messages = to_messages(raw, location)
                yield messages if isinstance(messages, BadRecord) else (location, messages)
                index += 1


def _file_kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    # Anything else is JSON Lines (also a .json file holding one object per line, as `datasets` accepts).
    return "array" if path.endswith(".json") and head.startswith(b"[") else "lines"


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars and no log lines from ``datasets`` (its load errors lead to ``iter_file``)."""
    import datasets

    verbosity = datasets.utils.logging.get_verbosity()
    bars_were_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def _load_with_datasets(path: str, kind: str, cache_dir: str):
    """The file as a ``datasets.Dataset``, or ``None`` where ``iter_file`` must read it instead."""
    if glob.has_magic(path):  # data_files takes glob patterns; such a name would not mean this file
        return None
    if kind == "parquet":
        builder, options = "parquet", {}
    else:  # see the module docstring for why one chunk and no JSON-encoded mixed types
        builder = "json"
        options = {"chunksize": os.path.getsize(path) + 1, "on_mixed_types": None, "parse_agent_traces": False}
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", cache_dir=cache_dir, **options)
            # pyarrow's JSON reader lets invalid UTF-8 into string columns; a full check finds it.
            dataset.data.validate(full=True)
        except Exception:  # noqa: BLE001 - whatever datasets fails on, iter_file names the records
            return None
        return dataset if _keeps_json_meaning(dataset.features, datasets) else None


_TEXT_DTYPES = ("string", "large_string", "null")


def _keeps_json_meaning(features, datasets) -> bool:
    """Whether every field ``to_messages`` reads came through as text (or as all-null), so a row
    says what its record says; a field read as a number, timestamp, bytes, JSON text or struct
    does not."""

    def is_text(feature) -> bool:
        return isinstance(feature, datasets.Value) and feature.dtype in _TEXT_DTYPES

    if not any(name in features for name in ("prompt", "response", "messages")):
        return False  # every row is bad; iter_file says what each record really holds
    if not all(is_text(features[name]) for name in ("prompt", "response", "system") if name in features):
        return False
    messages = features.get("messages")
    if messages is None or is_text(messages):  # absent, or null in every row
        return True
    if not isinstance(messages, (datasets.List, datasets.LargeList)) or not isinstance(messages.feature, dict):
        return False
    return all(is_text(messages.feature[name]) for name in ("role", "content") if name in messages.feature)


_UNKNOWN = object()


class _SourceIndex:
    """The line and the raw JSON of each row of a JSON / JSON Lines file that ``datasets`` read,
    built on first use by scanning the file with the ``json`` module.

    If that scan does not find one JSON value per row (the two parsers disagree about the file),
    locations fall back to the 0-based row and bad rows are judged as ``datasets`` read them.
    """

    def __init__(self, path: str, kind: str, num_rows: int):
        self.path, self.kind, self.num_rows = path, kind, num_rows
        self._built = False
        self._text: str | None = None
        self._spans: list[tuple[int, int, int]] | None = None  # (line, start, end) per row

    def _build(self) -> None:
        self._built = True
        try:
            with open(self.path, encoding="utf-8", newline="") as fh:
                text = fh.read().removeprefix("\ufeff")
        except (OSError, UnicodeDecodeError):
            return
        line_of = _LineCounter(text)
        spans = []
        try:
            for start, end in _array_spans(text) if self.kind == "array" else _value_spans(text):
                spans.append((line_of(start), start, end))
        except (ValueError, _Unreadable):  # json.JSONDecodeError is a ValueError
            return
        if len(spans) == self.num_rows:
            self._text, self._spans = text, spans

    def location(self, index: int) -> Location:
        if not self._built:
            self._build()
        if self._spans is None:
            return Location(self.path, row=index)
        return Location(self.path, line=self._spans[index][0])

    def raw(self, index: int):
        if not self._built:
            self._build()
        if self._spans is None:
            return _UNKNOWN
        _, start, end = self._spans[index]
        return json.loads(self._text[start:end])


def _value_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each JSON value in ``text``, values separated by whitespace or nothing
    (what the ``datasets`` JSON Lines reader accepts: also objects over several lines)."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    while pos < len(text):
        _, end = decoder.raw_decode(text, pos)
        yield pos, end
        pos = _skip_space(text, end)


def _array_spans(text: str) -> Iterator[tuple[int, int]]:
    for start, end, value in _walk_json_array(text):
        if end is None:
            raise value
        yield start, end


class _LineCounter:
    """1-based line of a position in a text, counting on from the previous question."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def iter_file(path: str) -> Iterator[tuple[Location, object] | BadRecord]:
    """Yield ``(location, raw record)`` or ``BadRecord`` for each record of the file, read with
    ``json`` / ``pyarrow`` (the reader for files ``datasets`` cannot load)."""
    kind = _file_kind(path)
    if kind == "parquet":
        yield from _iter_parquet(path)
    elif kind == "array":
        yield from _iter_json_array(path)
    else:
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


def _iter_json_array(path: str):
    with open(path, "rb") as fh:
        data = fh.read()
    # surrogateescape keeps going past bad bytes; the records holding them are reported below.
    text = data.decode("utf-8", errors="surrogateescape")
    line_of = _LineCounter(text)
    try:
        for start, end, value in _walk_json_array(text):
            location = Location(path, line=line_of(start))
            if end is None:  # an element that does not decode: value is the JSONDecodeError
                where = "" if value.lineno == location.line else f"; the element starts at line {location.line}"
                yield BadRecord(Location(path, line=value.lineno), MALFORMED_JSON, f"{value.msg} (column {value.colno}){where}")
                continue
            bad_byte = _find_escaped_byte(value)
            if bad_byte is not None:
                yield BadRecord(location, NOT_UTF8, f"invalid byte 0x{bad_byte:02x} in the record")
            else:
                yield location, value
    except _Unreadable as exc:
        raise DataError(f"{Location(path, line=_LineCounter(text)(exc.pos))}: {MALFORMED_JSON}: {exc.reason}") from None


class _Unreadable(Exception):
    """The JSON array cannot be read on from ``pos`` (not closed, or no place to resume)."""

    def __init__(self, pos: int, reason: str):
        super().__init__(reason)
        self.pos, self.reason = pos, reason


def _skip_space(text: str, pos: int) -> int:
    return json.decoder.WHITESPACE.match(text, pos).end()


def _walk_json_array(text: str) -> Iterator[tuple[int, int | None, object]]:
    """The elements of the JSON array that ``text`` holds: ``(start, end, value)`` for each one
    that decodes, ``(start, None, JSONDecodeError)`` for each one that does not. After a bad
    element, reading resumes at the next element (see ``_element_end``); raises ``_Unreadable``
    where it cannot go on."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, text.index("[") + 1)
    if text.startswith("]", pos):
        _expect_end(text, pos + 1)
        return
    while True:
        if pos >= len(text):
            raise _Unreadable(pos, "the JSON array is not closed")
        start = pos
        try:
            value, pos = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            error = exc
        else:
            yield start, pos, value
            pos = _skip_space(text, pos)
            if pos >= len(text) or text[pos] in ",]":
                error = None
            else:  # something other than ',' or ']' after an element: skipped as one bad element
                start, error = pos, json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        if error is not None:
            yield start, None, error
            end = _element_end(text, start)
            if end is None:
                raise _Unreadable(
                    error.pos,
                    f"{error.msg} (column {error.colno}), and where this array element ends cannot be found "
                    "(an unclosed string or bracket), so the rest of the file cannot be read",
                )
            pos = end
        if pos >= len(text):
            raise _Unreadable(pos, "the JSON array is not closed")
        if text[pos] == "]":
            _expect_end(text, pos + 1)
            return
        pos = _skip_space(text, pos + 1)  # past the ','


def _expect_end(text: str, pos: int) -> None:
    pos = _skip_space(text, pos)
    if pos < len(text):
        raise _Unreadable(pos, "text after the end of the JSON array")


def _element_end(text: str, start: int) -> int | None:
    """Position of the ',' or ']' that ends the array element starting at ``start`` (which did
    not decode): the first one outside strings and outside brackets opened after ``start``;
    ``None`` if the text ends first.

    Limits of this resynchronisation: it finds the true end when the broken element's quotes and
    brackets pair up (a missing or extra comma or colon, a bad literal, single quotes, a stray
    closing '}', which is passed over). An unclosed string or bracket throws the count off for the
    rest of the file. Then either the text ends first (``None``: the file cannot be read on, a
    clear error even with ``on_bad_record: skip``), or it stops inside a later element, which
    fails to decode or lacks the record fields and is counted as bad too, or at a ']' that closes
    a nested list, which leaves text after the "end" of the array: also a clear error. The elements
    lost to such a miscount are not counted one by one.
    """
    depth = 0
    in_string = False
    pos = start
    while pos < len(text):
        char = text[pos]
        if in_string:
            if char == "\\":
                pos += 1  # the escaped character cannot end the string
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            if depth > 0:
                depth -= 1
            elif char == "]":
                return pos
        elif char == "," and depth == 0:
            return pos
        pos += 1
    return None


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
