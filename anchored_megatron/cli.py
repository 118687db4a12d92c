"""The ``anchored-*`` commands: parse, then call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input or files (config, data, tokenizer, checkpoints) whose message
    names the option, file or line and says what to do: printed as is, never as a traceback."""
    from anchored_megatron.checkpoint import CheckpointError
    from anchored_megatron.config import ConfigError
    from anchored_megatron.data.records import DataError
    from anchored_megatron.data.tokenizer import TokenizerError
    from anchored_megatron.platform.run_lock import OutputDirInUse
    from anchored_megatron.platform.shared_storage import SharedStorageError

    return ConfigError, DataError, TokenizerError, CheckpointError, OutputDirInUse, SharedStorageError


def _report(prog: str, kind: str, exc: BaseException) -> int:
    # Every rank of a launch meets the same bad input and raises the same message: one copy is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {kind}: {exc}", file=sys.stderr, flush=True)
    return 2


def _start_up() -> None:
    """What every process of a command does first: the launcher watchdog, the warning filters,
    the persistent compile cache."""
    launcher = os.getppid()  # before the imports below, which take seconds
    from anchored_megatron.platform import compile_cache, supervision, warnings_filter

    warnings_filter.install()
    supervision.exit_with_launcher(launcher)
    compile_cache.use_persistent_cache()


def train_main(argv: list[str] | None = None) -> int:
    _start_up()
    parser = argparse.ArgumentParser(
        prog="anchored-sft",
        description="Anchored Learning (or an SFT baseline) on Megatron-Core. Launch with torchrun for several ranks.",
    )
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print the layout and memory estimate, exit")
    parser.add_argument("--world-size", type=int, help="with --dry-run: plan for N ranks (default $WORLD_SIZE, else tp x pp)")
    parser.add_argument("--skip-file-checks", action="store_true", help="with --dry-run: plan before the data/checkpoint files exist")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2 anchor.alpha=0.3")
    args = parser.parse_args(argv)

    from anchored_megatron.config import ConfigError, load_run_config
    from anchored_megatron.platform.collective_timeout import CollectiveTimeout

    try:
        cfg = load_run_config(args.config, args.overrides)
        if args.dry_run:
            from anchored_megatron.planning import dry_run

            print(dry_run(cfg, world_size=args.world_size, check_files=not args.skip_file_checks))
            return 0
        from anchored_megatron.training.trainer import train

        train(cfg)
    except ConfigError as exc:
        return _report("anchored-sft", "config error", exc)
    except _user_errors() as exc:
        return _report("anchored-sft", "error", exc)
    except CollectiveTimeout as exc:  # said by every rank that waited: the rank that stopped may be rank 0
        print(f"anchored-sft: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
