"""``anchored-convert``: hf-to-megatron, megatron-to-hf, compare. Thin: parses and calls."""

from __future__ import annotations

import argparse
import sys

from anchored_megatron.convert.errors import ConvertError


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anchored-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    to_mg = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint + model_config.yaml")
    to_mg.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    to_mg.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    to_mg.add_argument("--dtype", required=True, choices=["bf16", "fp32"], help="dtype of the saved weights (explicit)")
    to_mg.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    to_mg.add_argument("--target-tp", type=int, default=None, help="refuse now if the model cannot run at this TP")
    to_mg.add_argument("--target-pp", type=int, default=None, help="refuse now if the model cannot run at this PP")
    to_mg.add_argument("--no-progress", action="store_true")

    to_hf = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint (converted or trainer) -> HF safetensors")
    to_hf.add_argument("--ckpt", required=True, help="dist checkpoint directory with model_config.yaml")
    to_hf.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    to_hf.add_argument("--dtype", required=True, choices=["bf16", "fp32"])
    to_hf.add_argument("--hf-config", default=None, help="config.json (or its directory) to start from; default: the one kept at conversion")
    to_hf.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied next to the model")
    to_hf.add_argument("--family", default=None, choices=["llama", "mistral", "qwen2", "qwen3"], help="when no HF config is known")
    to_hf.add_argument("--max-shard-size", default="5GB", type=_size)
    to_hf.add_argument("--no-progress", action="store_true")

    cmp = sub.add_parser("compare", help="max logit difference and top-1 agreement, HF vs converted (run alone or under torchrun)")
    cmp.add_argument("--hf", required=True)
    cmp.add_argument("--ckpt", required=True)
    cmp.add_argument("--tp", type=int, default=1)
    cmp.add_argument("--pp", type=int, default=1)
    cmp.add_argument("--text", default=None, help="text to tokenize with the HF directory's tokenizer (default: random tokens)")
    cmp.add_argument("--batch", type=int, default=2)
    cmp.add_argument("--seq", type=int, default=64)
    cmp.add_argument("--seed", type=int, default=0)
    return parser


def _tokens(args, vocab_size: int):
    import torch

    if args.text is not None:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.hf)(args.text, return_tensors="pt")["input_ids"]
        return ids
    return torch.randint(0, vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            from anchored_megatron.config import ParallelConfig
            from anchored_megatron.convert.hf_to_megatron import hf_to_megatron

            target = None
            if args.target_tp or args.target_pp:
                target = ParallelConfig(tp=args.target_tp or 1, pp=args.target_pp or 1)
            model = hf_to_megatron(args.hf, args.out, args.dtype, args.transformer_impl, target, not args.no_progress)
            print(f"wrote {args.out} ({model.num_layers} layers, vocab {model.vocab_size}, {args.dtype})")
        elif args.command == "megatron-to-hf":
            from anchored_megatron.convert.megatron_to_hf import megatron_to_hf

            files = megatron_to_hf(args.ckpt, args.out, args.dtype, args.hf_config, args.tokenizer, args.family,
                                   args.max_shard_size, not args.no_progress)
            print(f"wrote {args.out}: {', '.join(files)}")
        else:
            from anchored_megatron.config import ParallelConfig
            from anchored_megatron.convert.compare import run_compare
            from anchored_megatron.convert.megatron_io import load_model_config

            tokens = _tokens(args, load_model_config(args.ckpt).vocab_size)
            result = run_compare(args.hf, args.ckpt, ParallelConfig(tp=args.tp, pp=args.pp), tokens)
            if result is not None:
                print(result.summary())
    except ConvertError as exc:
        print(f"anchored-convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
