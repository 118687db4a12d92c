"""Tokenizers: a sentencepiece model file or a Hugging Face ``tokenizer.json`` directory.

Both load without network or ``transformers``; both expose the same small surface
(``vocab_size``, ``eos_id``, ``pad_id``, ``bos_id``, ``encode``, ``decode``,
``fingerprint``). Encoding never adds special tokens: templates place them.
"""

from __future__ import annotations

import hashlib
import json
import os


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or lacks what training needs (an EOS token)."""


class Tokenizer:
    """Common surface. ``fingerprint`` identifies vocabulary + special ids: equal
    fingerprints mean the same ids for the same pieces (student/reference check)."""

    path: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    bos_token: str = ""
    eos_token: str = ""
    chat_template: str | None = None  # the tokenizer's own Jinja template, if it ships one
    source_files: tuple[str, ...] = ()  # files whose bytes define the encoding (for cache keys)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def _pieces(self) -> list[str | None]:
        raise NotImplementedError

    def _make_fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps({"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}).encode())
        for piece in self._pieces():
            digest.update(b"\x00" if piece is None else piece.encode("utf-8", "surrogatepass") + b"\x01")
        return f"v{self.vocab_size}-{digest.hexdigest()[:24]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, fingerprint={self.fingerprint})"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"tokenizer {path}: not a sentencepiece model: {exc}") from None
        self.source_files = (path,)
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"tokenizer {path}: sentencepiece model has no EOS piece (train it with eos_id >= 0)")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        # Padding positions are never trained nor attended to by real tokens; EOS is a safe filler.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.eos_token = self._sp.id_to_piece(self.eos_id)
        self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        self.fingerprint = self._make_fingerprint()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _pieces(self):
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


def _token_text(value) -> str | None:
    # tokenizer_config.json stores specials as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A directory with ``tokenizer.json`` (+ optional ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``chat_template.jinja``), as ``save_pretrained`` writes."""

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = directory
        file = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = RustTokenizer.from_file(file)
        except Exception as exc:  # noqa: BLE001 - the Rust loader raises a bare Exception
            raise TokenizerError(f"tokenizer {file}: cannot load: {exc}") from None
        config = self._read_json("tokenizer_config.json")
        specials = self._read_json("special_tokens_map.json")
        self.source_files = (file,)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def special_id(name: str) -> tuple[str, int | None]:
            text = _token_text(config.get(name)) or _token_text(specials.get(name))
            if not text:
                return "", None
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise TokenizerError(f"tokenizer {directory}: {name} {text!r} is not in the vocabulary")
            return text, token_id

        self.eos_token, eos_id = special_id("eos_token")
        if eos_id is None:
            raise TokenizerError(f"tokenizer {directory}: no eos_token (set it in tokenizer_config.json)")
        self.eos_id = eos_id
        self.bos_token, self.bos_id = special_id("bos_token")
        _, pad_id = special_id("pad_token")
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.chat_template = self._find_chat_template(config)
        self.fingerprint = self._make_fingerprint()

    def _read_json(self, name: str) -> dict:
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            return {}
        try:
            with open(file, encoding="utf-8") as fh:
                return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"tokenizer {file}: invalid JSON: {exc}") from None

    def _find_chat_template(self, config: dict) -> str | None:
        file = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as fh:
                return fh.read()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _pieces(self):
        return [self._tok.id_to_token(i) for i in range(self.vocab_size)]


def load_tokenizer(path: str) -> Tokenizer:
    """A sentencepiece ``.model`` file, a ``tokenizer.json`` file, or a directory holding either."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        raise TokenizerError(f"tokenizer {path}: directory has neither tokenizer.json nor tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {path}: not found")
    if os.path.basename(path) == "tokenizer.json":
        return HFTokenizer(os.path.dirname(path) or ".")
    return SentencePieceTokenizer(path)
