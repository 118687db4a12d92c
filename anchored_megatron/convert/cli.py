"""``anchored-convert``: hf-to-megatron, megatron-to-hf, compare. Thin: parses and calls.

A Megatron checkpoint given to --ckpt is a checkpoint directory (converted, or one
iter_N of a training run) or a trainer output_dir, whose newest checkpoint is used
unless --iteration names another or --best asks for the best evaluated one.
"""

from __future__ import annotations

import argparse
import sys

from anchored_megatron.convert.errors import ConvertError

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"]
RANDOM_TOKENS = {"batch": 2, "seq": 64, "seed": 0}  # compare's defaults when no --text is given


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="PATH",
                        help="Megatron checkpoint: a checkpoint directory (converted, or one iter_N of a run), "
                             "or a trainer output_dir, read at its newest checkpoint (checkpoints/latest); required")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, default=None, metavar="N",
                       help="with a trainer output_dir: the checkpoint saved at training step N (iter_000000N) "
                            "instead of the newest (default: the newest)")
    which.add_argument("--best", action="store_true",
                       help="with a trainer output_dir: the checkpoint with the lowest eval target_loss (its eval.json), "
                            "under the run's train.keep_best_max_general_kl bound if its config.yaml sets one; "
                            "not with --iteration")


def _checkpoint(args) -> str:
    """The checkpoint directory --ckpt names, at --iteration or at the --best step."""
    from anchored_megatron.checkpoint.best import best_iteration
    from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir

    iteration = best_iteration(args.ckpt, "--best") if args.best else args.iteration
    return resolve_checkpoint_dir(args.ckpt, "--ckpt", iteration)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anchored-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    no_progress = "no progress bars, even on a terminal (default: bars on a terminal only)"

    to_mg = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint + model_config.yaml")
    to_mg.add_argument("--hf", required=True, metavar="DIR",
                       help="HF model directory: config.json and safetensors (model.safetensors, or an index and its shards); required")
    to_mg.add_argument("--out", required=True, metavar="DIR",
                       help="output directory (absent or empty): the dist checkpoint, model_config.yaml and a copy of "
                            "config.json (hf_config.json) that export gives back; required")
    to_mg.add_argument("--dtype", required=True, choices=["bf16", "fp32"], help="dtype of the saved weights; required, never implied")
    to_mg.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                       help="layer implementation recorded in model_config.yaml; the tensors are the same for both (default: %(default)s)")
    to_mg.add_argument("--target-tp", type=int, default=None, metavar="N",
                       help="refuse now if the model cannot run at tensor-parallel size N (default: no check)")
    to_mg.add_argument("--target-pp", type=int, default=None, metavar="N",
                       help="refuse now if the model cannot run at pipeline-parallel size N (default: no check)")
    to_mg.add_argument("--target-ep", type=int, default=None, metavar="N",
                       help="MoE models: refuse now if the experts cannot be split over N expert-parallel ranks (default: no check)")
    to_mg.add_argument("--no-progress", action="store_true", help=no_progress)

    to_hf = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint (converted or trainer) -> HF safetensors + config.json")
    _add_checkpoint_options(to_hf)
    to_hf.add_argument("--out", required=True, metavar="DIR", help="output directory (absent or empty); required")
    to_hf.add_argument("--dtype", required=True, choices=["bf16", "fp32"], help="dtype of the exported weights; required, never implied")
    to_hf.add_argument("--hf-config", default=None, metavar="PATH",
                       help="config.json (or a directory holding one) to write, checked against the checkpoint, only its dtype "
                            "updated (default: the HF config kept with the checkpoint since conversion, carried through "
                            "every trainer checkpoint; if there is none, one built from model_config.yaml)")
    to_hf.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="directory whose tokenizer files are copied next to the model; a config built from "
                            "model_config.yaml takes its bos/eos/pad ids (default: no tokenizer files)")
    to_hf.add_argument("--family", default=None, choices=FAMILIES,
                       help="model family of a config built from model_config.yaml (default: for MoE models qwen3_moe "
                            "with q/k norm, else mixtral; for dense ones qwen3 with q/k norm, qwen2 with q/k/v bias, "
                            "else llama); refused if it contradicts a known HF config")
    to_hf.add_argument("--max-shard-size", default="5GB", type=_size, metavar="SIZE",
                       help="largest safetensors file, in bytes or with a KB/MB/GB suffix (default: %(default)s)")
    to_hf.add_argument("--no-progress", action="store_true", help=no_progress)

    cmp = sub.add_parser("compare", help="max logit difference and top-1 agreement, HF vs converted (alone or under torchrun)")
    cmp.add_argument("--hf", required=True, metavar="DIR", help="HF model directory, run with transformers as the reference; required")
    _add_checkpoint_options(cmp)
    cmp.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size to load the checkpoint at (default: %(default)s)")
    cmp.add_argument("--pp", type=int, default=1, metavar="N", help="pipeline-parallel size to load the checkpoint at (default: %(default)s)")
    cmp.add_argument("--ep", type=int, default=1, metavar="N",
                     help="MoE models: expert-parallel size to load the checkpoint at (default: %(default)s)")
    cmp.add_argument("--text", default=None,
                     help="text to run, tokenized with the --hf directory's tokenizer (default: random tokens, see --batch)")
    cmp.add_argument("--batch", type=int, default=None, metavar="N",
                     help=f"random tokens: number of sequences (default: {RANDOM_TOKENS['batch']}); not with --text")
    cmp.add_argument("--seq", type=int, default=None, metavar="N",
                     help=f"random tokens: sequence length (default: {RANDOM_TOKENS['seq']}); not with --text")
    cmp.add_argument("--seed", type=int, default=None, metavar="N",
                     help=f"random tokens: generator seed (default: {RANDOM_TOKENS['seed']}); not with --text")
    return parser


def _tokens(args, vocab_size: int):
    import torch

    random_options = {name: getattr(args, name) for name in RANDOM_TOKENS}
    if args.text is not None:
        given = [f"--{name}" for name, value in random_options.items() if value is not None]
        if given:
            raise ConvertError(f"{', '.join(given)}: shape random tokens; not used with --text")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.hf)(args.text, return_tensors="pt")["input_ids"]
    batch, seq, seed = (RANDOM_TOKENS[name] if value is None else value for name, value in random_options.items())
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from anchored_megatron.platform import warnings_filter

    warnings_filter.install()
    from anchored_megatron.checkpoint import CheckpointError
    from anchored_megatron.config import ConfigError

    try:
        if args.command == "hf-to-megatron":
            from anchored_megatron.config import ParallelConfig
            from anchored_megatron.convert.hf_to_megatron import hf_to_megatron

            target = None
            if args.target_tp or args.target_pp or args.target_ep:
                target = ParallelConfig(tp=args.target_tp or 1, pp=args.target_pp or 1, ep=args.target_ep or 1)
            model = hf_to_megatron(args.hf, args.out, args.dtype, args.transformer_impl, target, not args.no_progress)
            print(f"wrote {args.out} ({model.num_layers} layers, vocab {model.vocab_size}, {args.dtype})")
        elif args.command == "megatron-to-hf":
            from anchored_megatron.checkpoint.model_config import kept_hf_config_file
            from anchored_megatron.convert.megatron_to_hf import megatron_to_hf

            ckpt = _checkpoint(args)
            files = megatron_to_hf(ckpt, args.out, args.dtype, args.hf_config, args.tokenizer, args.family,
                                   args.max_shard_size, not args.no_progress)
            print(f"wrote {args.out} from {ckpt}: {', '.join(files)}")
            if args.hf_config is None and kept_hf_config_file(ckpt) is None:
                print(f"config.json: built from {ckpt}/model_config.yaml (no HF config is kept with it; --hf-config gives one)")
        else:
            from anchored_megatron.config import ParallelConfig
            from anchored_megatron.checkpoint.model_config import load_model_config
            from anchored_megatron.convert.compare import run_compare

            ckpt = _checkpoint(args)
            tokens = _tokens(args, load_model_config(ckpt).vocab_size)
            result = run_compare(args.hf, ckpt, ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep), tokens)
            if result is not None:
                print(result.summary())
    except (ConvertError, ConfigError, CheckpointError) as exc:
        print(f"anchored-convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
