"""Reading and writing Hugging Face checkpoints as safetensors, one tensor at a time.

Reading validates the whole checkpoint from the safetensors headers (cheap) before any
tensor is loaded: every expected tensor present with the expected shape, every shard
file present. Only safetensors are read; pickled ``.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from anchored_megatron.convert.errors import ConvertError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied next to an exported model when a tokenizer directory is given.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
# Non-parameter buffers some older checkpoints carry; safe to ignore.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: str, option: str = "") -> dict:
    """A JSON file as a dict (keys in file order); errors name ``option`` (if any) and the file."""
    where = f"{option} {path}" if option else path
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConvertError(f"{where}: not found") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{where}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConvertError(f"{path}: not found (expected a Hugging Face model directory)")
    return read_json(path)


class HFReader:
    """Lazy access to the tensors of an HF safetensors checkpoint."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index_path = os.path.join(self.model_dir, INDEX_NAME)
        single_path = os.path.join(self.model_dir, SINGLE_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConvertError(f"{index_path}: not a safetensors index ({exc})") from None
            missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(self.model_dir, f))})
            if missing:
                raise ConvertError(f"{index_path}: shard files missing from {self.model_dir}: {', '.join(missing)}")
            return dict(weight_map)
        if os.path.exists(single_path):
            from safetensors import safe_open

            with safe_open(single_path, framework="pt") as fh:
                return {name: SINGLE_NAME for name in fh.keys()}
        pickled = [f for f in sorted(os.listdir(self.model_dir)) if f.endswith((".bin", ".pt", ".pth"))]
        if pickled:
            raise ConvertError(
                f"{self.model_dir}: only safetensors checkpoints are read (found pickled {', '.join(pickled[:3])}); "
                "re-save it with save_pretrained(safe_serialization=True)"
            )
        raise ConvertError(f"{self.model_dir}: no {SINGLE_NAME} or {INDEX_NAME}")

    def _handle(self, filename: str):
        if filename not in self._handles:
            from safetensors import safe_open

            self._handles[filename] = safe_open(os.path.join(self.model_dir, filename), framework="pt")
        return self._handles[filename]

    def validate(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        """Every expected tensor present with its shape; nothing unknown. Reads headers only."""
        absent = [n for n in expected if n not in self.weight_map]
        if absent:
            raise ConvertError(f"{self.model_dir}: checkpoint is missing {len(absent)} tensors, e.g. {', '.join(absent[:5])}")
        unknown = [n for n in self.weight_map if n not in expected and n not in optional and not n.endswith(_IGNORABLE_SUFFIXES)]
        if unknown:
            raise ConvertError(f"{self.model_dir}: unexpected tensors for this config, e.g. {', '.join(sorted(unknown)[:5])}")
        for name, shape in expected.items():
            filename = self.weight_map[name]
            handle = self._handle(filename)
            if name not in handle.keys():
                raise ConvertError(f"{os.path.join(self.model_dir, filename)}: partial shard, tensor {name} listed in the index is absent")
            found = tuple(handle.get_slice(name).get_shape())
            if found != tuple(shape):
                raise ConvertError(f"{os.path.join(self.model_dir, filename)}: tensor {name} has shape {list(found)}, config implies {list(shape)}")

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def dtype_of(self, name: str) -> str:
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def close(self) -> None:
        self._handles.clear()


class HFShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` as they arrive."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        path = os.path.join(self.out_dir, f".partial-{len(self._written):05d}.safetensors")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as transformers expects (+ index when several); returns file names."""
        self.flush()
        if len(self._written) == 1:
            os.replace(self._written[0][0], os.path.join(self.out_dir, SINGLE_NAME))
            return [SINGLE_NAME]
        weight_map, names = {}, []
        count = len(self._written)
        for i, (path, tensors) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, os.path.join(self.out_dir, final))
            names.append(final)
            weight_map.update({t: final for t in tensors})
        with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
        return names + [INDEX_NAME]


def copy_tokenizer(src_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    if not copied:
        raise ConvertError(f"--tokenizer {src_dir}: no tokenizer files found (looked for {', '.join(TOKENIZER_FILES)})")
    return copied
