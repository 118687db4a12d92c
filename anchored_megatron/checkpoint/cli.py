"""``anchored-checkpoint``: list a run's checkpoints; point ``latest`` at one of them."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anchored-checkpoint",
        description="Inspect and repoint a run's checkpoints (output_dir/checkpoints). A run resumes from the one 'latest' names.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser(
        "list", help="every checkpoint, which one 'latest' names, its eval figures (eval.json) and the best one under "
                     "the run's train.keep_best rule, and whether its files verify")
    use = commands.add_parser("use", help="verify ITERATION, then point 'latest' at it: the next start resumes from there")
    for command in (listing, use):
        command.add_argument("output_dir", help="the run's output_dir (or its checkpoints/ folder)")
        command.add_argument("--sizes-only", action="store_true", help="compare file sizes only, skip the checksums")
    use.add_argument("iteration", type=int, help="the checkpoint's step number (iter_N)")
    args = parser.parse_args(argv)

    from anchored_megatron.checkpoint import trainer_io as ckpt
    from anchored_megatron.checkpoint.best import describe_evaluations

    try:
        root = ckpt.find_root(args.output_dir)
        if args.command == "list":
            print(root)
            evaluations = describe_evaluations(root)
            for iteration, is_latest, status in ckpt.describe_checkpoints(root, checksums=not args.sizes_only):
                marks = "  (latest)" if is_latest else " " * 10
                if evaluations is not None:
                    figures, best, _ = evaluations
                    marks += ("  (best)" if iteration == best else " " * 8) + "  " + figures.get(iteration, "")
                print(f"  {ckpt.checkpoint_name(iteration)}{marks}  {status}")
            if evaluations is not None:
                print(evaluations[2])
            return 0
        verified = ckpt.use_checkpoint(root, args.iteration, checksums=not args.sizes_only)
    except ckpt.CheckpointError as exc:
        print(f"anchored-checkpoint: {exc}", file=sys.stderr)
        return 1
    how = "verified" if verified else "not verified: written before manifests"
    print(f"{root}/{ckpt.LATEST} -> {ckpt.checkpoint_name(args.iteration)} ({how}); the next start resumes from step {args.iteration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
