"""Place tokenised documents into fixed-length sequences.

Packing is best-fit decreasing (longest documents first, each into the open sequence
with the least room that still fits it); it is deterministic and typically fills
>95% of positions for SFT-length documents. Padding mode gives each document its
own sequence.
"""

from __future__ import annotations

import numpy as np


def pack_best_fit(lengths: np.ndarray, seq_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= seq_length."""
    if len(lengths) and int(lengths.max()) > seq_length:
        raise ValueError(f"a document of {int(lengths.max())} tokens does not fit seq_length={seq_length}")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    # open_bins[r] holds the bins with exactly r free positions; has_room[r] says it is non-empty.
    open_bins: list[list[int]] = [[] for _ in range(seq_length + 1)]
    has_room = np.zeros(seq_length + 1, dtype=bool)
    for doc in order.tolist():
        length = int(lengths[doc])
        candidates = has_room[length:]
        offset = int(candidates.argmax())
        if candidates[offset]:
            room = length + offset
            target = open_bins[room].pop()
            if not open_bins[room]:
                has_room[room] = False
            bins[target].append(doc)
        else:
            room = seq_length
            target = len(bins)
            bins.append([doc])
        left = room - length
        if left > 0:
            open_bins[left].append(target)
            has_room[left] = True
    return bins


def one_per_sequence(num_docs: int) -> list[list[int]]:
    return [[d] for d in range(num_docs)]


def materialize(
    bins: list[list[int]],
    doc_offsets: np.ndarray,
    flat_tokens: np.ndarray,
    flat_trained: np.ndarray,
    seq_length: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Copy documents into [num_sequences, seq_length] arrays (vectorised).

    Returns ``tokens`` (int32, pad_id where empty), ``trained`` (uint8: the token is a
    response token), ``doc_lengths`` (the documents' lengths, sequence by sequence) and
    ``seq_offsets`` (where each sequence's run starts in doc_lengths).
    """
    num_seqs = len(bins)
    doc_order = np.fromiter((d for b in bins for d in b), dtype=np.int64)
    docs_per_seq = np.fromiter((len(b) for b in bins), dtype=np.int64, count=num_seqs)
    lengths = (doc_offsets[1:] - doc_offsets[:-1])[doc_order]
    seq_of_doc = np.repeat(np.arange(num_seqs), docs_per_seq)
    seq_offsets = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(docs_per_seq, out=seq_offsets[1:])
    # Column where each document starts inside its sequence: running length within the sequence.
    running = np.cumsum(lengths) - lengths
    column = running - np.repeat(running[seq_offsets[:-1]], docs_per_seq) if num_seqs else running
    dst_start = seq_of_doc * seq_length + column
    src_start = doc_offsets[:-1][doc_order]
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    src = np.repeat(src_start, lengths) + within
    dst = np.repeat(dst_start, lengths) + within
    tokens = np.full(num_seqs * seq_length, pad_id, dtype=np.int32)
    trained = np.zeros(num_seqs * seq_length, dtype=np.uint8)
    tokens[dst] = flat_tokens[src]
    trained[dst] = flat_trained[src]
    return {
        "tokens": tokens.reshape(num_seqs, seq_length),
        "trained": trained.reshape(num_seqs, seq_length),
        "doc_lengths": lengths.astype(np.int32),
        "seq_offsets": seq_offsets,
    }
