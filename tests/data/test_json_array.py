"""The JSON array reader streams: it reads a chunk past the element it yields, never the whole
file, and where the chunks end never changes what it reads."""

import io
import json

import pytest

from anchored_megatron.data.json_array import BrokenElement, Element, UnreadableArray, iter_elements
from tests.data.conftest import prompt_records


class BoundedStream(io.StringIO):
    """A text stream that counts the characters read and raises once more than ``limit`` are asked for."""

    def __init__(self, text: str, limit: int | None = None):
        super().__init__(text)
        self.limit, self.chars_read = limit, 0

    def read(self, size=-1):
        if self.limit is not None and (size < 0 or self.chars_read + size > self.limit):
            raise AssertionError(f"read past character {self.limit}")
        chunk = super().read(size)
        self.chars_read += len(chunk)
        return chunk


def read_all(text: str, chunk_chars: int) -> list:
    items = []
    try:
        items.extend(iter_elements(io.StringIO(text), chunk_chars))
    except UnreadableArray as exc:
        items.append(("unreadable", exc.line, exc.reason))
    return items


def element_starts(text: str) -> list[tuple[int, int]]:
    """(offset, line) where each element of a `json.dumps(indent=1)` array starts: lines that are ' {'."""
    starts, offset = [], 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if line.rstrip("\r\n") == " {":
            starts.append((offset + 1, number))
        offset += len(line)
    return starts


def test_first_element_comes_before_the_rest_is_read():
    text = json.dumps(prompt_records(2000, seed=1), indent=1)
    elements = iter_elements(BoundedStream(text, limit=300), chunk_chars=100)
    first = next(elements)
    assert first == Element(2, json.loads(text)[0])


def test_reads_at_most_a_chunk_past_each_element():
    records = prompt_records(500, seed=2)
    text = json.dumps(records, indent=1)
    starts = [offset for offset, _ in element_starts(text)]
    ends = starts[1:] + [len(text)]  # an element ends before the next one starts
    longest = max(end - start for start, end in zip(starts, ends))
    # The window grows by a chunk, or by as much as it holds where one element is longer than a chunk.
    for chunk in (64, 4 * longest):
        stream = BoundedStream(text)
        for index, element in enumerate(iter_elements(stream, chunk_chars=chunk)):
            assert element.value == records[index]
            assert stream.chars_read <= ends[index] + max(chunk, longest), (chunk, index, stream.chars_read, ends[index])
        assert index == len(records) - 1


def test_values_and_lines_match_the_json_module():
    records = prompt_records(30, seed=3) + [{"prompt": 'say "hi" \\ [x], {y}', "response": "é ✓"}]
    text = json.dumps(records, indent=1, ensure_ascii=False)
    expected = [Element(line, value) for (_, line), value in zip(element_starts(text), json.loads(text))]
    assert len(expected) == len(records)
    for chunk in (1, 2, 3, 5, 8, 13, 1 << 20):
        assert read_all(text, chunk) == expected, chunk


# Arrays with every kind of broken element; the chunk size must not change what is read.
TEXTS = {
    "scalars": '[1, 1e5, -2.5E-3, null, true, false, "x", [1, 2], {}]',
    "broken_colon": '[\n{"a": "b"},\n{"prompt" "x", "response": "y"},\n{"c": "d"}\n]\n',
    "missing_comma": '[\n{"a": 1}\n{"b": 2},\n{"c": 3}\n]',
    "trailing_comma": '[{"a": 1},\n]',
    "stray_brace": '[\n{"a": 1}},\n{"b": 2}\n]',
    "nested_close": '[\n{"a": [1, 2}, 3]},\n{"b": 2}\n]',
    "bad_byte": '[\n{"a": "x"},\n{"a": "\udcff\udcfe"},\n{"b": "y"}\n]',
    "crlf_bom": '\ufeff[\r\n {"a": 1},\r\n {"b": 2}\r\n]\r\n',
    "one_line": '[{"a": "x,]"}, {"b": "\\"]"}, {"c": 3}]',
    "unclosed_string": '[\n{"a": 1},\n{"a": "x, "b": 2},\n{"c": 3}\n]\n',
    "not_closed": '[\n{"a": 1},\n{"b": 2}\n',
    "text_after": '[\n{"a": 1}\n]\n{"b": 2}\n',
    "empty": " [ \n ] ",
}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chunk_boundaries_do_not_change_what_is_read(name):
    text = TEXTS[name]
    whole = read_all(text, len(text) + 1)
    for chunk in range(1, len(text) + 1):
        assert read_all(text, chunk) == whole, chunk


def test_broken_elements_are_reported_and_reading_resumes():
    assert read_all(TEXTS["broken_colon"], 4) == [
        Element(2, {"a": "b"}),
        BrokenElement(3, "Expecting ':' delimiter (column 11)", False),
        Element(4, {"c": "d"}),
    ]
    assert read_all(TEXTS["missing_comma"], 4) == [
        Element(2, {"a": 1}),
        BrokenElement(3, "Expecting ',' delimiter (column 1)", False),
        Element(4, {"c": 3}),
    ]
    assert read_all(TEXTS["bad_byte"], 4) == [
        Element(2, {"a": "x"}),
        BrokenElement(3, "invalid byte 0xff in the record", True),
        Element(4, {"b": "y"}),
    ]


def test_error_on_a_later_line_of_an_element_names_both_lines():
    text = '[\n{"a": 1},\n{\n "prompt": "x",\n "response" "y"\n},\n{"c": 3}\n]'
    assert read_all(text, 3)[1] == BrokenElement(5, "Expecting ':' delimiter (column 13); the element starts at line 3", False)


def test_column_counts_from_the_start_of_a_long_line():
    # One line much longer than a chunk: the column of the error is still counted from the line's start.
    good = ", ".join(json.dumps(r) for r in prompt_records(50, seed=4))
    text = "[" + good + ', {"a" 1}]'
    column = text.rindex("1}]") + 1
    assert read_all(text, 16)[-1] == BrokenElement(1, f"Expecting ':' delimiter (column {column})", False)


@pytest.mark.parametrize(
    "name, line, reason",
    [
        ("unclosed_string", 3, "Expecting ',' delimiter (column 12), and where this array element ends cannot be found"),
        ("not_closed", 4, "the JSON array is not closed"),
        ("text_after", 4, "text after the end of the JSON array"),
    ],
)
def test_where_reading_cannot_go_on(name, line, reason):
    last = read_all(TEXTS[name], 5)[-1]
    assert last[:2] == ("unreadable", line) and last[2].startswith(reason), last
