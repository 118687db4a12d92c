"""``anchored-merge``: weight-space interpolation of two Megatron checkpoints (WiSE-FT).

    out = (1 - ratio) * base + ratio * finetuned

for every model tensor, in float32, written in the fine-tuned checkpoint's dtype. The inputs
are converted or trainer checkpoints of one architecture at any TP/PP layout (dist_checkpointing
stores global tensors); they are read one layer at a time, so host memory holds the output
checkpoint plus one layer of each input, as in conversion. Padded vocabulary rows are dropped:
the output is laid out like a converted checkpoint and loads at any layout, as a student or a
reference, or exports to Hugging Face (the fine-tuned checkpoint's HF config travels with it).
"""

from __future__ import annotations

import argparse
import itertools
import numbers
import os
import sys

import torch

from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir
from anchored_megatron.checkpoint.errors import CheckpointError
from anchored_megatron.checkpoint.model_config import kept_hf_config_file, load_model_config
from anchored_megatron.checkpoint.weights import save_weights_state, single_process_group
from anchored_megatron.config import ConfigError, ModelConfig
from anchored_megatron.convert.dist_entries import entry_name, extra_state_objects, load_entries, sharded_tensor, stored_shapes
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.hf_to_megatron import check_empty_output, owned
from anchored_megatron.convert.mapping import is_vocab_key, rules
from anchored_megatron.convert.megatron_to_hf import ARCH_FIELDS, check_shapes, stored_dtype
from anchored_megatron.convert.progress import progress_bar


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
        raise ConvertError(f"--ratio: must be a number in [0, 1] (0 = base, 1 = finetuned), got {ratio!r}")
    return float(ratio)


def _check_same_architecture(base_dir: str, base: ModelConfig, finetuned_dir: str, finetuned: ModelConfig) -> None:
    differing = [f"{f}: {getattr(base, f)!r} vs {getattr(finetuned, f)!r}" for f in ARCH_FIELDS if getattr(base, f) != getattr(finetuned, f)]
    if differing:
        raise ConvertError(f"--finetuned {finetuned_dir}: not the architecture of --base {base_dir}: " + "; ".join(differing))


def merge_checkpoints(base: str, finetuned: str, out_dir: str, ratio: float, show_progress: bool = True,
                      base_iteration: int | None = None, finetuned_iteration: int | None = None) -> ModelConfig:
    """Write the interpolation of ``base`` and ``finetuned`` (checkpoint directories or trainer
    output_dirs: their newest checkpoint, or the one at ``*_iteration``) to ``out_dir``;
    returns the ModelConfig written next to it."""
    ratio = check_ratio(ratio)
    base_dir = resolve_checkpoint_dir(base, "--base", base_iteration)
    finetuned_dir = resolve_checkpoint_dir(finetuned, "--finetuned", finetuned_iteration)
    check_empty_output(out_dir)
    base_model, model = load_model_config(base_dir, "--base"), load_model_config(finetuned_dir, "--finetuned")
    _check_same_architecture(base_dir, base_model, finetuned_dir, model)
    all_rules = rules(model)
    groups = [[r for r in all_rules if r.layer is None]] + [[r for r in all_rules if r.layer == i] for i in range(model.num_layers)]
    entries = {}
    with single_process_group():
        shapes = {}
        for ckpt in (base_dir, finetuned_dir):
            shapes[ckpt] = stored_shapes(ckpt)
            check_shapes(ckpt, model, shapes[ckpt])
        base_dtype, out_dtype = stored_dtype(base_dir), stored_dtype(finetuned_dir)
        for group in itertools.chain(groups[:1], progress_bar(groups[1:], "merge", "layer", show_progress)):
            base_tensors = load_entries(base_dir, group, model, shapes[base_dir], dtype=base_dtype)
            finetuned_tensors = load_entries(finetuned_dir, group, model, shapes[finetuned_dir], dtype=out_dtype)
            for rule in group:
                a, b = base_tensors.pop(rule).float(), finetuned_tensors.pop(rule).float()
                if is_vocab_key(rule.key):
                    a, b = a[: model.vocab_size], b[: model.vocab_size]
                merged = torch.lerp(a, b, ratio)  # exactly a at 0 and b at 1
                entries[entry_name(rule)] = sharded_tensor(rule, owned(merged.to(out_dtype)), model.num_layers)
        for layer in range(model.num_layers):
            entries.update(extra_state_objects(layer, model))
        os.makedirs(out_dir, exist_ok=True)
        save_weights_state(entries, out_dir, model, hf_config_file=kept_hf_config_file(finetuned_dir))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anchored-merge",
        description="WiSE-FT: out = (1 - ratio) * base + ratio * finetuned, tensor by tensor, for two Megatron checkpoints of one architecture.",
    )
    parser.add_argument("--base", required=True, help="checkpoint directory or trainer output_dir (ratio 0)")
    parser.add_argument("--finetuned", required=True, help="checkpoint directory or trainer output_dir (ratio 1)")
    parser.add_argument("--ratio", required=True, type=float, help="in [0, 1]")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument("--base-iteration", type=int, help="with an output_dir: the checkpoint saved at this step (default newest)")
    parser.add_argument("--finetuned-iteration", type=int, help="with an output_dir: the checkpoint saved at this step (default newest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal anyway)")
    args = parser.parse_args(argv)
    try:
        model = merge_checkpoints(args.base, args.finetuned, args.out, args.ratio, show_progress=not args.no_progress,
                                  base_iteration=args.base_iteration, finetuned_iteration=args.finetuned_iteration)
    except (ConvertError, ConfigError, CheckpointError) as exc:
        print(f"anchored-merge: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {model.num_layers} layers, {args.ratio:g} of the way from {args.base} to {args.finetuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
