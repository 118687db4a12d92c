"""Records -> tokenised documents with per-token "trained" flags, applying the bad-record policy."""

from __future__ import annotations

import collections
from array import array
from dataclasses import dataclass, field

import numpy as np

from anchored_megatron.data import chat_template
from anchored_megatron.data.records import BadRecord, DataError, Location, iter_messages
from anchored_megatron.data.schema import BAD_FIELD

_CHUNK = 512  # records tokenised per encode_batch call
TOO_LONG = "longer than seq_length"  # a problem kind, as those of records.py and schema.py


@dataclass
class TokenizedDocs:
    flat_tokens: np.ndarray  # int32, all documents back to back
    flat_trained: np.ndarray  # uint8, 1 = response token (its prediction is trained)
    doc_offsets: np.ndarray  # int64 [num_docs + 1]
    doc_file: np.ndarray  # int32 [num_docs], index into the file list
    records_per_file: list[int] = field(default_factory=list)
    skipped_per_file: list[int] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)  # problem kind -> count
    truncated: int = 0

    @property
    def num_docs(self) -> int:
        return len(self.doc_file)


class _Policy:
    def __init__(self, on_bad_record: str):
        self.skip = on_bad_record == "skip"
        self.counts: collections.Counter = collections.Counter()

    def reject(self, bad: BadRecord) -> None:
        if not self.skip:
            raise DataError(f"{bad.message()} (set data.on_bad_record: skip to skip such records)")
        self.counts[bad.kind] += 1


def tokenize_files(paths: list[str], tokenizer, template: str, seq_length: int, on_bad_record: str, truncate: bool, progress=None) -> TokenizedDocs:
    policy = _Policy(on_bad_record)
    tokens, trained = array("i"), array("B")
    offsets, doc_file = [0], array("i")
    records_per_file, skipped_per_file = [], []
    truncated = 0
    for file_index, path in enumerate(paths):
        records = skipped_before = 0
        skipped_before = sum(policy.counts.values())
        chunk: list[tuple[Location, list]] = []

        def flush():
            nonlocal truncated
            for location, doc_tokens, doc_trained in _tokenize_chunk(chunk, tokenizer):
                if len(doc_tokens) > seq_length:
                    if not truncate:
                        policy.reject(BadRecord(location, TOO_LONG, f"{len(doc_tokens)} tokens > seq_length {seq_length} (data.truncate: true cuts long samples)"))
                        continue
                    doc_tokens, doc_trained = doc_tokens[:seq_length], doc_trained[:seq_length]
                    # The first token is never a target, so it needs a trained token after it.
                    if not any(doc_trained[1:]):
                        policy.reject(BadRecord(location, TOO_LONG, f"no response token within the first {seq_length} tokens after truncation"))
                        continue
                    truncated += 1
                tokens.extend(doc_tokens)
                trained.extend(doc_trained)
                offsets.append(len(tokens))
                doc_file.append(file_index)
            chunk.clear()

        for item in iter_messages(path):
            records += 1
            if progress is not None:
                progress.update(1)
            if isinstance(item, BadRecord):
                policy.reject(item)
                continue
            location, messages = item
            try:
                pieces = chat_template.conversation_pieces(messages, template, tokenizer)
            except chat_template.TemplateRenderError as exc:
                policy.reject(BadRecord(location, BAD_FIELD, str(exc)))
                continue
            chunk.append((location, pieces))
            if len(chunk) >= _CHUNK:
                flush()
        flush()
        records_per_file.append(records)
        skipped_per_file.append(sum(policy.counts.values()) - skipped_before)
    return TokenizedDocs(
        flat_tokens=np.frombuffer(tokens, dtype=np.int32).copy() if len(tokens) else np.zeros(0, np.int32),
        flat_trained=np.frombuffer(trained, dtype=np.uint8).copy() if len(trained) else np.zeros(0, np.uint8),
        doc_offsets=np.asarray(offsets, dtype=np.int64),
        doc_file=np.frombuffer(doc_file, dtype=np.int32).copy() if len(doc_file) else np.zeros(0, np.int32),
        records_per_file=records_per_file,
        skipped_per_file=skipped_per_file,
        skipped=policy.counts,
        truncated=truncated,
    )


def _tokenize_chunk(chunk, tokenizer):
    """Encode every text piece of the chunk in one batch, then reassemble each document."""
    texts = [text for _, pieces in chunk for text, _ in pieces if text not in chat_template.MARKERS]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    for location, pieces in chunk:
        doc_tokens: list[int] = []
        doc_trained: list[int] = []
        for text, is_trained in pieces:
            if text == chat_template.BOS:
                ids = [bos]
            elif text == chat_template.EOS_IF_MISSING:
                ids = [] if doc_tokens and doc_tokens[-1] == eos else [eos]
            else:
                ids = next(encoded)
            doc_tokens.extend(ids)
            doc_trained.extend([int(is_trained)] * len(ids))
        yield location, doc_tokens, doc_trained
