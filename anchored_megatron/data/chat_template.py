"""Turn a conversation into text pieces, each marked trained (assistant) or not.

The built-in default template (used when the tokenizer ships none and
``data.chat_template`` is unset or ``"default"``)::

    [BOS]System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}[EOS]User: ...

``[BOS]`` only when the tokenizer has one. Only ``{assistant}`` and its ``[EOS]`` are
trained. With a Jinja template (the tokenizer's own or ``data.chat_template``), the
conversation is rendered incrementally, Hugging Face style: the text an assistant turn
adds after the generation prompt is the trained span (trailing whitespace excluded),
then EOS is appended unless that span already ends with it. This needs a template
whose renderings of successive prefixes of the conversation extend each other, which
holds for the common templates (ChatML, Llama-3, Mistral, ...); others are refused.
"""

from __future__ import annotations

import functools

from anchored_megatron.config import ConfigError
from anchored_megatron.config.data import looks_like_jinja

# Pieces are (text | marker, trained). Markers stand for token ids decided at encode time.
BOS = "<<bos>>"
EOS_IF_MISSING = "<<eos-if-missing>>"
MARKERS = (BOS, EOS_IF_MISSING)

DEFAULT = "default"
_ROLE_PREFIX = {"system": "System: ", "user": "User: "}


def resolve(option: str | None, tokenizer_template: str | None) -> str:
    """The template text to use ('default' for the built-in one)."""
    if option is None:
        return tokenizer_template or DEFAULT
    if option == DEFAULT or looks_like_jinja(option):
        return option
    with open(option, encoding="utf-8") as fh:  # planning.preflight checked that it exists
        return fh.read()


def default_pieces(messages: list[dict], has_bos: bool) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = [(BOS, False)] if has_bos else []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            pieces += [("Assistant: ", False), (content, True), (EOS_IF_MISSING, True)]
        else:
            pieces.append((_ROLE_PREFIX[role] + content + "\n\n", False))
    return pieces


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"data.chat_template: invalid Jinja template: {exc}") from None


class TemplateRenderError(ValueError):
    """The template raised for this conversation (a per-record problem, e.g. bad role order)."""


def jinja_pieces(messages: list[dict], template: str, bos_token: str, eos_token: str) -> list[tuple[str, bool]]:
    from jinja2.exceptions import TemplateError

    compiled = _compile(template)

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return compiled.render(
                messages=messages[:upto], add_generation_prompt=generation_prompt,
                bos_token=bos_token, eos_token=eos_token,
            )
        except TemplateError as exc:
            raise TemplateRenderError(f"chat template refused the conversation: {exc}") from None

    pieces: list[tuple[str, bool]] = []
    done = ""  # text already turned into pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(i, True)
        full = render(i + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(
                "data.chat_template: the template's rendering of a conversation prefix is not a prefix of the next "
                "rendering, so assistant tokens cannot be located; use a prefix-stable template or 'default'"
            )
        response = full[len(prompt):]
        stripped = response.rstrip()
        pieces += [(prompt[len(done):], False), (stripped, True), (EOS_IF_MISSING, True)]
        # The whitespace after the response (e.g. a newline after <|im_end|>) stays untrained.
        done = full[: len(full) - (len(response) - len(stripped))]
    full = render(len(messages), False)
    if not full.startswith(done):
        raise ConfigError("data.chat_template: the template's full rendering does not extend its rendering up to the last assistant turn")
    pieces.append((full[len(done):], False))
    return [(text, trained) for text, trained in pieces if text]


def conversation_pieces(messages: list[dict], template: str, tokenizer) -> list[tuple[str, bool]]:
    if template == DEFAULT:
        return default_pieces(messages, tokenizer.bos_id is not None)
    return jinja_pieces(messages, template, tokenizer.bos_token, tokenizer.eos_token)
