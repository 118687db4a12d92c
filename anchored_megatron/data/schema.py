"""The shape of an SFT record, checked on the decoded value alone (no file, no location).

Two schemas: ``{"prompt", "response"[, "system"]}`` and
``{"messages": [{"role": system|user|assistant, "content": str}, ...]}``. ``to_messages`` turns
either into a list of ``{"role", "content"}`` or raises ``SchemaError`` saying what is wrong.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
FIELDS = ("prompt", "response", "system", "messages")  # the top-level fields a record is read from

# Problem kinds, also the keys of the skip counts.
MISSING_FIELD = "missing field"
BAD_FIELD = "invalid field"
EMPTY_RESPONSE = "empty response"


class SchemaError(ValueError):
    """A record that does not fit either schema: ``kind`` is one of the problem kinds above."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def to_messages(record) -> list[dict]:
    """Normalise one decoded record to a list of ``{"role", "content"}``."""
    if not isinstance(record, dict):
        raise SchemaError(BAD_FIELD, f"expected an object with 'prompt'/'response' or 'messages', got {_type_name(record)}")
    if record.get("messages") is not None:
        return _check_messages(record["messages"])
    if "prompt" not in record and "response" not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise SchemaError(MISSING_FIELD, f"expected 'prompt' and 'response', or 'messages' (fields present: {keys})")
    for name in ("prompt", "response"):
        if record.get(name) is None:  # absent, JSON null, or a Parquet null
            raise SchemaError(MISSING_FIELD, f"'{name}'")
        if not isinstance(record[name], str):
            raise SchemaError(BAD_FIELD, f"'{name}' must be a string, got {_type_name(record[name])}")
    if not record["response"].strip():
        raise SchemaError(EMPTY_RESPONSE, "'response' is empty")
    messages = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise SchemaError(BAD_FIELD, f"'system' must be a string, got {_type_name(system)}")
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return messages


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _type_name(messages)
        raise SchemaError(BAD_FIELD, f"'messages' must be a non-empty list, got {got}")
    normalised = []
    for i, message in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(message, dict):
            raise SchemaError(BAD_FIELD, f"'{key}' must be an object, got {_type_name(message)}")
        for name in ("role", "content"):
            if message.get(name) is None:
                raise SchemaError(MISSING_FIELD, f"'{key}.{name}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise SchemaError(BAD_FIELD, f"'{key}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise SchemaError(BAD_FIELD, f"'{key}.content' must be a string, got {_type_name(content)}")
        if role == "assistant" and not content.strip():
            raise SchemaError(EMPTY_RESPONSE, f"'{key}.content' (assistant) is empty")
        normalised.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in normalised):
        raise SchemaError(EMPTY_RESPONSE, "no assistant message")
    return normalised


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__
