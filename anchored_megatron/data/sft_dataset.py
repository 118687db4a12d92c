"""The SFT dataset the trainer reads: packed (or padded) sequences from the on-disk cache.

``build_sft_dataset`` tokenises and packs once per (data, tokenizer, layout) and caches
the result; rank 0 builds while the other ranks wait on ``barrier()``, then everyone
memory-maps the same files. A rank that cannot see rank 0's cache (another node, no
shared file system) builds its own copy.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from anchored_megatron.data import cache, chat_template
from anchored_megatron.config import DataConfig
from anchored_megatron.data.packing import materialize, one_per_sequence, pack_best_fit
from anchored_megatron.data.preprocess import tokenize_files
from anchored_megatron.data.files import check_data_files
from anchored_megatron.data.records import DataError

IGNORE_INDEX = -100


class SFTDataset(torch.utils.data.Dataset):
    """``ds[i]`` -> 1-D tensors of length ``seq_length``:

    - ``tokens`` int64 input ids (pad id on padding)
    - ``labels`` int64 next-token targets, -100 where not trained (prompt, document ends, padding)
    - ``loss_mask`` float32, 1.0 exactly where ``labels`` is a response token (incl. its EOS)
    - ``position_ids`` int64, restarting at 0 for each document (and for the padding run)
    - ``document_ids`` int64, 0, 1, ... per document inside the sequence, -1 on padding
    """

    def __init__(self, directory: str, seq_length: int, built_here: bool = False):
        arrays, stats = cache.read(directory)
        self.directory = directory
        self.seq_length = seq_length
        self._tokens = arrays["tokens"]
        self._trained = arrays["trained"]
        self._doc_lengths = arrays["doc_lengths"]
        self._seq_offsets = arrays["seq_offsets"]
        if self._tokens.shape[1:] != (seq_length,):
            raise DataError(f"cache {directory}: sequences of shape {self._tokens.shape[1:]}, expected ({seq_length},)")
        self.stats = dict(stats, cache="built" if built_here else "loaded", cache_path=directory)

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)})")
        size = self.seq_length
        tokens = self._tokens[index].astype(np.int64)
        trained = self._trained[index].astype(bool)
        lengths = np.asarray(self._doc_lengths[self._seq_offsets[index] : self._seq_offsets[index + 1]], dtype=np.int64)
        used = int(lengths.sum())
        document_ids = np.full(size, -1, dtype=np.int64)
        document_ids[:used] = np.repeat(np.arange(len(lengths)), lengths)
        position_ids = np.arange(size, dtype=np.int64)
        position_ids[:used] -= np.repeat(np.cumsum(lengths) - lengths, lengths)
        position_ids[used:] -= used
        # Position j predicts token j+1 only inside one document and only for response tokens.
        target_trained = np.zeros(size, dtype=bool)
        target_trained[:-1] = trained[1:] & (document_ids[1:] == document_ids[:-1]) & (document_ids[:-1] >= 0)
        labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(target_trained[:-1], tokens[1:], IGNORE_INDEX)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(target_trained.astype(np.float32)),
            "position_ids": torch.from_numpy(position_ids),
            "document_ids": torch.from_numpy(document_ids),
        }


def _repeat_by_weight(docs, weights, seed: int) -> np.ndarray:
    """Document indices for one epoch: each file's documents ``weight`` times (the
    fractional part is a seeded random subset)."""
    if weights is None:
        return np.arange(docs.num_docs)
    rng = np.random.default_rng([seed, 0x5F7])
    selected = []
    for file_index, weight in enumerate(weights):
        members = np.flatnonzero(docs.doc_file == file_index)
        whole, fraction = int(weight), float(weight) - int(weight)
        selected += [members] * whole
        extra = int(round(fraction * len(members)))
        if extra:
            selected.append(np.sort(rng.choice(members, size=extra, replace=False)))
    return np.concatenate(selected) if selected else np.zeros(0, dtype=np.int64)


def _trained_targets(docs, selection: np.ndarray) -> int:
    """Loss-bearing positions: trained tokens that have a predecessor in their document."""
    starts = docs.doc_offsets[:-1]
    per_doc = np.add.reduceat(docs.flat_trained.astype(np.int64), starts) - docs.flat_trained[starts]
    return int(per_doc[selection].sum())


def _build(cfg: DataConfig, tokenizer, template: str, seq_length: int, seed: int, directory: str) -> None:
    start = time.perf_counter()
    progress = None
    try:
        from tqdm import tqdm

        progress = tqdm(desc="tokenising SFT records", unit="rec", disable=None, file=sys.stderr)
    except ImportError:
        pass
    try:
        docs = tokenize_files(cfg.paths, tokenizer, template, seq_length, cfg.on_bad_record, cfg.truncate, progress)
    finally:
        if progress is not None:
            progress.close()
    selection = _repeat_by_weight(docs, cfg.weights, seed)
    if len(selection) == 0:
        raise DataError(f"data.paths: no usable records in {', '.join(cfg.paths)} (skipped: {dict(docs.skipped)})")
    doc_lengths = (docs.doc_offsets[1:] - docs.doc_offsets[:-1])[selection]
    bins = pack_best_fit(doc_lengths, seq_length) if cfg.packing else one_per_sequence(len(selection))
    bins = [[int(selection[i]) for i in b] for b in bins]
    arrays = materialize(bins, docs.doc_offsets, docs.flat_tokens, docs.flat_trained, seq_length, tokenizer.pad_id)
    num_tokens = int(arrays["doc_lengths"].sum())
    stats = {
        "num_records": int(sum(docs.records_per_file)),
        "num_documents": int(len(selection)),
        "num_sequences": len(bins),
        "seq_length": seq_length,
        "packing": cfg.packing,
        "num_tokens": num_tokens,
        "num_trained_tokens": _trained_targets(docs, selection),
        "fill_ratio": num_tokens / max(1, len(bins) * seq_length),
        "num_skipped": int(sum(docs.skipped.values())),
        "skipped": dict(docs.skipped),
        "num_truncated": docs.truncated,
        "files": {
            path: {"records": docs.records_per_file[i], "skipped": docs.skipped_per_file[i], "documents": int((docs.doc_file[selection] == i).sum())}
            for i, path in enumerate(cfg.paths)
        },
        "tokenizer": tokenizer.fingerprint,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    cache.write(directory, arrays, stats)
    print(summary_line(stats), flush=True)


def summary_line(stats: dict) -> str:
    line = (
        f"data: {stats['num_records']} records from {len(stats['files'])} file(s) -> {stats['num_documents']} documents "
        f"in {stats['num_sequences']} sequences of {stats['seq_length']} tokens "
        f"({'packed' if stats['packing'] else 'padded'}, fill {100 * stats['fill_ratio']:.1f}%)"
    )
    if stats["num_skipped"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(stats["skipped"].items()))
        line += f"; skipped {stats['num_skipped']} bad records: {kinds}"
    if stats["num_truncated"]:
        line += f"; truncated {stats['num_truncated']} to seq_length"
    return line


def build_sft_dataset(
    cfg: DataConfig,
    tokenizer,
    seq_length: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    wait_timeout_s: float = 3600.0,
) -> SFTDataset:
    """Tokenise + pack ``cfg.paths`` (or reuse the cache) and return the dataset.

    Every rank must call this. With ``world_size > 1``, rank 0 builds and the others
    block in ``barrier()`` (without one they poll the cache directory). A build error
    on rank 0 is raised on every rank, with the same message.
    """
    check_data_files(cfg)
    if not isinstance(seq_length, int) or seq_length < 2:
        raise ValueError(f"seq_length must be an integer >= 2, got {seq_length!r}")
    template = chat_template.resolve(cfg.chat_template, tokenizer.chat_template)
    directory = os.path.join(cfg.resolved_cache_dir(), "sft-" + cache.cache_key(cfg, tokenizer, template, seq_length, seed))
    error_file = cache.error_file(directory)
    started = time.time()
    built_here = False
    if rank == 0:
        failure = None
        if not cache.exists(directory):
            try:
                if os.path.exists(error_file):
                    os.remove(error_file)
                _build(cfg, tokenizer, template, seq_length, seed, directory)
                built_here = True
            except Exception as exc:  # noqa: BLE001 - the other ranks must learn about any failure
                failure = exc
                os.makedirs(os.path.dirname(error_file), exist_ok=True)
                with open(error_file, "w") as fh:
                    fh.write(str(exc))
        if barrier is not None and world_size > 1:
            barrier()
        if failure is not None:
            raise failure
    else:
        if barrier is not None:
            barrier()
        else:
            _wait_for(directory, error_file, started, wait_timeout_s)
        if os.path.exists(error_file) and os.path.getmtime(error_file) >= started - 1 and not cache.exists(directory):
            with open(error_file) as fh:
                raise DataError(f"rank 0 failed to build the SFT data cache: {fh.read()}")
        if not cache.exists(directory):  # rank 0's cache is not visible here (no shared file system)
            _build(cfg, tokenizer, template, seq_length, seed, directory)
            built_here = True
    return SFTDataset(directory, seq_length, built_here=built_here)


def _wait_for(directory: str, error_file: str, started: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cache.exists(directory):
            return
        if os.path.exists(error_file) and os.path.getmtime(error_file) >= started - 1:
            return
        time.sleep(0.5)
    raise DataError(f"timed out after {timeout_s:.0f}s waiting for rank 0 to build the SFT data cache {directory}")
