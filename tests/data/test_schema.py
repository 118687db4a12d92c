"""The two record schemas, checked on decoded values: what each good record becomes and what each bad one is called."""

import pytest

from anchored_megatron.data.schema import SchemaError, to_messages


def test_prompt_response_becomes_user_and_assistant():
    assert to_messages({"prompt": "2+2?", "response": "4"}) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_system_comes_first_and_extra_fields_are_ignored():
    assert to_messages({"prompt": "", "response": "4", "system": "be brief", "id": 7}) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "4"},
    ]


def test_messages_keep_role_and_content_only():
    record = {"messages": [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "hello"}], "prompt": 3}
    assert to_messages(record) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "record, kind, detail",
    [
        (None, "invalid field", "expected an object with 'prompt'/'response' or 'messages', got null"),
        ([1], "invalid field", "expected an object with 'prompt'/'response' or 'messages', got list"),
        ({}, "missing field", "expected 'prompt' and 'response', or 'messages' (fields present: none)"),
        ({"text": "a", "id": 1}, "missing field", "expected 'prompt' and 'response', or 'messages' (fields present: id, text)"),
        ({"prompt": "a"}, "missing field", "'response'"),
        ({"response": "a"}, "missing field", "'prompt'"),
        ({"prompt": "a", "response": None}, "missing field", "'response'"),
        ({"prompt": 1, "response": "a"}, "invalid field", "'prompt' must be a string, got int"),
        ({"prompt": "a", "response": ["b"]}, "invalid field", "'response' must be a string, got list"),
        ({"prompt": "a", "response": "b", "system": 3}, "invalid field", "'system' must be a string, got int"),
        ({"prompt": "a", "response": " \n"}, "empty response", "'response' is empty"),
        ({"messages": []}, "invalid field", "'messages' must be a non-empty list, got an empty list"),
        ({"messages": "hi"}, "invalid field", "'messages' must be a non-empty list, got str"),
        ({"messages": [1]}, "invalid field", "'messages[0]' must be an object, got int"),
        ({"messages": [{"role": "user"}]}, "missing field", "'messages[0].content'"),
        ({"messages": [{"content": "a"}]}, "missing field", "'messages[0].role'"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "invalid field", "'messages[0].role' must be one of system, user, assistant, got 'bot'"),
        ({"messages": [{"role": "assistant", "content": 5}]}, "invalid field", "'messages[0].content' must be a string, got int"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
            "empty response",
            "'messages[1].content' (assistant) is empty",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "empty response", "no assistant message"),
    ],
)
def test_bad_record_is_named(record, kind, detail):
    with pytest.raises(SchemaError) as info:
        to_messages(record)
    assert (info.value.kind, info.value.detail) == (kind, detail)
