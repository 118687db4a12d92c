"""Stream the elements of a JSON array from a text stream, one element at a time, each with its line.

The stream is read in chunks into a window that holds the element being read and the chunk
around it (memory: a chunk, or one element where an element is larger), never the whole file.
The standard ``json`` decoder decodes each element in place; where an element reaches the end of
the window the window grows and the element is decoded again, so chunk boundaries never change
what is read.

A broken element (one that does not decode) is reported and reading resumes at the next element:
its end is the first ',' or ']' outside strings and outside brackets opened after its start
(``_element_end``). Something other than ',' or ']' after a good element is skipped the same way,
as one broken element. Limits of this resynchronisation: it finds the true end when the broken
element's quotes and brackets pair up (a missing or extra comma or colon, a bad literal, single
quotes, a stray closing '}', which is passed over). An unclosed string or bracket throws the count
off for the rest of the file. Then either the text ends first (``UnreadableArray``: the file cannot
be read on, a clear error even with ``on_bad_record: skip``), or it stops inside a later element,
which fails to decode or lacks the record fields and is counted as bad too, or at a ']' that closes
a nested list, which leaves text after the "end" of the array: also a clear error. The elements lost
to such a miscount are not counted one by one.

Bytes that are not UTF-8 reach the text as lone surrogates (open the stream with
``errors="surrogateescape"``); an element whose text holds one is reported as broken, with the byte.
"""

from __future__ import annotations

import json
import re
from typing import Iterator, NamedTuple

CHUNK_CHARS = 1 << 18

_DECODER = json.JSONDecoder()
_SPACE = json.decoder.WHITESPACE
_STRUCTURE = re.compile(r'["\[\]{},]')
_DELIMITER = re.compile(r"[,\]]")
_STRING_STOP = re.compile(r'["\\]')
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class Element(NamedTuple):
    line: int  # 1-based line where the element starts
    value: object


class BrokenElement(NamedTuple):
    line: int  # 1-based line of the problem
    detail: str
    not_utf8: bool  # the element decodes but holds bytes that are not UTF-8


class UnreadableArray(Exception):
    """The array cannot be read on from ``line`` (not closed, no place to resume, or text after it)."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


class _NeedMore(Exception):
    """A step reached the end of the window before the end of the stream."""


def iter_elements(stream, chunk_chars: int = CHUNK_CHARS) -> Iterator[Element | BrokenElement]:
    """Each element of the JSON array that ``stream`` (a text stream) holds, in order."""
    window = _Window(stream, chunk_chars)
    pos, step = 0, _open
    while step is not None:
        try:
            items, pos, step = step(window, pos)
        except _NeedMore:
            window.read_more(keep=pos)  # the step starts again on the longer text
            pos = 0
            continue
        yield from items


class _Window:
    """``text`` is the part of the stream read and not yet dropped; ``text[0]`` is at ``line0``,
    column ``col0`` (0-based) of the stream."""

    def __init__(self, stream, chunk_chars: int):
        self.stream, self.chunk_chars = stream, chunk_chars
        self.text, self.at_eof = "", False
        self.line0, self.col0 = 1, 0
        self._mark, self._mark_line = 0, 1  # the last position asked for by line_at, and its line

    def read_more(self, keep: int) -> None:
        """Drop the text before ``keep`` and read on; positions then count from ``keep``."""
        text = self.text
        last_newline = text.rfind("\n", 0, keep)
        self.col0 = keep - last_newline - 1 if last_newline >= 0 else self.col0 + keep
        self.line0 = self.line_at(keep)
        # At least as much as is kept, so that reading one large element costs linear time.
        chunk = self.stream.read(max(self.chunk_chars, len(text) - keep))
        self.at_eof = not chunk
        self.text = text[keep:] + chunk
        self._mark, self._mark_line = 0, self.line0

    def line_at(self, pos: int) -> int:
        if pos < self._mark:
            self._mark, self._mark_line = 0, self.line0
        self._mark_line += self.text.count("\n", self._mark, pos)
        self._mark = pos
        return self._mark_line

    def column_at(self, pos: int) -> int:
        last_newline = self.text.rfind("\n", 0, pos)
        return pos - last_newline if last_newline >= 0 else self.col0 + pos + 1

    def skip_space(self, pos: int) -> int:
        """The first non-space position from ``pos``; ``len(text)`` only at the end of the stream."""
        pos = _SPACE.match(self.text, pos).end()
        if pos == len(self.text) and not self.at_eof:
            raise _NeedMore
        return pos


# Each step reads from ``pos`` and returns (elements found, where to go on, the next step), or
# raises _NeedMore without having returned anything, so it can start again on a longer window.


def _open(window: _Window, pos: int):
    pos = window.skip_space(pos)
    if window.text.startswith("\ufeff", pos):  # a UTF-8 byte-order mark is not part of the JSON
        pos = window.skip_space(pos + 1)
    if not window.text.startswith("[", pos):
        raise UnreadableArray(window.line_at(pos), "expected '[' at the start of a JSON array")
    pos = window.skip_space(pos + 1)
    if window.text.startswith("]", pos):
        return (), pos + 1, _close
    return (), pos, _element


def _element(window: _Window, pos: int):
    start = window.skip_space(pos)
    text = window.text
    if start == len(text):
        raise UnreadableArray(window.line_at(start), "the JSON array is not closed")
    # An object, array or string ends at its closing character; a number or literal cut by the end
    # of the window may decode as a shorter one ("1e5" as 1), so it is read only with what follows.
    if text[start] not in '{["' and not window.at_eof and _DELIMITER.search(text, start) is None:
        raise _NeedMore
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        return _broken(window, start, exc)
    bad_byte = _ESCAPED_BYTE.search(text, start, end)
    if bad_byte is not None:
        element = BrokenElement(window.line_at(start), f"invalid byte 0x{ord(bad_byte.group()) - 0xDC00:02x} in the record", True)
    else:
        element = Element(window.line_at(start), value)
    return (element,), end, _delimiter


def _delimiter(window: _Window, pos: int):
    pos = window.skip_space(pos)
    text = window.text
    if pos == len(text):
        raise UnreadableArray(window.line_at(pos), "the JSON array is not closed")
    if text[pos] == ",":
        return (), pos + 1, _element
    if text[pos] == "]":
        return (), pos + 1, _close
    return _broken(window, pos, json.JSONDecodeError("Expecting ',' delimiter", text, pos))


def _close(window: _Window, pos: int):
    pos = window.skip_space(pos)
    if pos < len(window.text):
        raise UnreadableArray(window.line_at(pos), "text after the end of the JSON array")
    return (), pos, None


def _broken(window: _Window, start: int, error: json.JSONDecodeError):
    """The element from ``start`` does not decode: report it and go on at the ',' or ']' after it."""
    end = _element_end(window.text, start)
    if end is None and not window.at_eof:
        raise _NeedMore
    start_line = window.line_at(start)
    line, column = window.line_at(error.pos), window.column_at(error.pos)
    detail = f"{error.msg} (column {column})"
    if end is None:
        raise UnreadableArray(
            line,
            f"{detail}, and where this array element ends cannot be found (an unclosed string or bracket), "
            "so the rest of the file cannot be read",
        )
    if line != start_line:
        detail += f"; the element starts at line {start_line}"
    return (BrokenElement(line, detail, False),), end, _delimiter


def _element_end(text: str, start: int) -> int | None:
    """Position of the ',' or ']' that ends the array element starting at ``start``: the first one
    outside strings and outside brackets opened after ``start`` (a stray '}' is passed over);
    ``None`` if the text ends first. See the module docstring for the limits."""
    depth, pos = 0, start
    while True:
        match = _STRUCTURE.search(text, pos)
        if match is None:
            return None
        char, pos = match.group(), match.end()
        if char == '"':
            pos = _string_end(text, pos)
            if pos is None:
                return None
        elif char in "[{":
            depth += 1
        elif char in "]}":
            if depth > 0:
                depth -= 1
            elif char == "]":
                return match.start()
        elif depth == 0:  # ','
            return match.start()


def _string_end(text: str, pos: int) -> int | None:
    """Position just past the '"' that closes the string whose content starts at ``pos``."""
    while True:
        match = _STRING_STOP.search(text, pos)
        if match is None:
            return None
        if match.group() == '"':
            return match.end()
        pos = match.end() + 1  # the escaped character cannot end the string
