"""The retention suite's checks against hand-written replies, and its items' stability."""

import pytest

from anchored_megatron.eval import retention
from anchored_megatron.eval.retention import passes

CASES = [
    ({"rule": "uppercase"}, "THE OCEAN IS DEEP AND BLUE.", "The ocean is deep."),
    ({"rule": "lowercase"}, "the ocean is deep and blue.", "the Ocean is deep."),
    ({"rule": "no_commas"}, "Rain falls. It is calm.", "Rain falls, and it is calm."),
    ({"rule": "ending", "text": "That is all."}, "Snow is cold. That is all.", "That is all. Snow is cold."),
    ({"rule": "keyword", "text": "blue"}, "The Blue sea.", "The bluest sea."),
    ({"rule": "json_keys", "keys": ["name", "color"]}, '```json\n{"name": "sky", "color": "blue"}\n```', '{"name": "sky"}'),
    ({"rule": "json_keys", "keys": ["name", "color"]}, '{"color": 1, "name": 2}', "name: sky, color: blue"),
    ({"rule": "bullets", "count": 2}, "- bread\n* milk", "- bread\n- milk\n- eggs"),
    ({"rule": "bullets", "count": 2}, "  - bread\n\n  - milk  ", "Here: bread, milk"),
    ({"rule": "max_words", "count": 5}, "one two three four five", "one two three four five six"),
    ({"rule": "quoted"}, '"The moon is bright."', '"The moon" is bright.'),
    ({"answers": ["7", "seven"]}, "There are Seven days in a week.", "There are 17 days."),
    ({"answers": ["Mexico City"]}, "The capital is mexico city.", "The capital is Mexico."),
    ({"answers": ["4"]}, "2 plus 2 is 4.", "It is 14 or 40."),
    ({"final_number": "8"}, "16 - 8 = 8", "16 - 8 = 12"),
    ({"final_number": "8"}, "The answer is 8.", "8 and 8 make 16"),
]


@pytest.mark.parametrize("check, good, bad", CASES)
def test_each_check_accepts_what_meets_it_and_refuses_what_does_not(check, good, bad):
    assert passes(check, good)
    assert not passes(check, bad)


def test_an_unknown_check_is_refused():
    with pytest.raises(ValueError, match="unknown retention check"):
        passes({"rule": "haiku"}, "x")


def test_the_candidates_are_fixed_by_the_version_and_the_halves_disjoint():
    first, second = retention.candidates(), retention.candidates()
    assert first == second and len({item["id"] for item in first}) == len(first) >= 500
    # Every arithmetic item's accepted answer is its value, computed here independently.
    for item in first:
        if item["id"].startswith("arithmetic-"):
            words = item["prompt"].split()
            x, op, y = int(words[2]), words[3], int(words[4].rstrip("?"))
            assert item["check"] == {"final_number": str({"plus": x + y, "minus": x - y, "times": x * y}[op])}
    asked = {item["prompt"] for item in first}
    evaluation, replay = retention.general_prompts(exclude=asked)
    assert evaluation and replay and not set(evaluation) & set(replay) and not (set(evaluation) | set(replay)) & asked
