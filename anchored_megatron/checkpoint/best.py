"""The best evaluated checkpoint of a run: ``eval.json`` inside a checkpoint, and the rule
(``train.keep_best``) that picks one. Torch-free.

When a save follows an evaluation of the same step, the trainer writes that step's eval record
into the checkpoint as ``eval.json`` before publication, so the manifest covers it and the record
goes wherever its weights go. The trainer keeps the best checkpoint from pruning,
``anchored-checkpoint list`` marks it, and ``anchored-convert megatron-to-hf --best`` exports it.
"""

from __future__ import annotations

import json
import math
import os

from anchored_megatron.checkpoint.dirs import LATEST, RUN_CHECKPOINTS, RUN_CONFIG, checkpoint_name, iterations
from anchored_megatron.checkpoint.errors import CheckpointError
from anchored_megatron.config.errors import ConfigError
from anchored_megatron.config.sections import KEEP_BEST_RULES

EVAL_FILE = "eval.json"
FIGURES = ("target_loss", "general_loss", "general_kl_base")  # the figures a record may hold, each a number or null


def write_eval_record(directory: str, record: dict) -> None:
    """Write ``record`` (one evaluation) as ``directory/eval.json``."""
    with open(os.path.join(directory, EVAL_FILE), "w", encoding="utf-8") as fh:
        json.dump(record, fh, sort_keys=True)
        fh.write("\n")


def read_eval_record(checkpoint_dir: str) -> dict | None:
    """The eval record kept in ``checkpoint_dir``, or None when it has none; CheckpointError naming
    the file when it is not a JSON object whose figures are numbers or null."""
    path = os.path.join(checkpoint_dir, EVAL_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: expected a JSON object (an eval record), got {type(record).__name__}")
    for key in FIGURES:
        value = record.get(key)
        if value is not None and not _is_number(value):
            raise CheckpointError(f"{path}: {key} must be a number or null, got {value!r}")
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _check_rule(rule: str) -> None:
    if rule not in KEEP_BEST_RULES:
        raise ConfigError(f"train.keep_best: unknown rule {rule!r}; known: {', '.join(KEEP_BEST_RULES)}")


def qualifies(record: dict | None, max_general_kl: float | None = None) -> bool:
    """Whether an eval record competes under the target_loss rule: a finite target loss and, with a
    bound, a finite general KL to the base at or under it."""
    if record is None or not _finite(record.get("target_loss")):
        return False
    kl = record.get("general_kl_base")
    return max_general_kl is None or (_finite(kl) and kl <= max_general_kl)


def best_checkpoint(root: str, rule: str = "target_loss", max_general_kl: float | None = None) -> str | None:
    """The complete checkpoint under ``root`` with the lowest eval target loss among those that
    qualify (see ``qualifies``); the earlier step on a tie; None when none qualifies."""
    _check_rule(rule)
    best, best_loss = None, math.inf
    for iteration in iterations(root):  # ascending: a later tie never replaces an earlier one
        path = os.path.join(root, checkpoint_name(iteration))
        record = read_eval_record(path)
        if qualifies(record, max_general_kl) and (best is None or record["target_loss"] < best_loss):
            best, best_loss = path, record["target_loss"]
    return best


def run_dir(root: str) -> str:
    """The trainer output_dir a checkpoint root belongs to (its parent when it is ``checkpoints/``)."""
    root = os.path.normpath(root)
    return os.path.dirname(root) if os.path.basename(root) == RUN_CHECKPOINTS else root


def run_rule(output_dir: str) -> tuple[str, float | None]:
    """(rule, max general KL) the run in ``output_dir`` picks its best checkpoint by: its
    ``config.yaml``'s train.keep_best and train.keep_best_max_general_kl. The lowest target loss
    without a bound when the file is absent or the run set no rule (its checkpoints can still be ranked)."""
    import yaml

    path = os.path.join(output_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return "target_loss", None
    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    train = config.get("train") if isinstance(config, dict) else None
    train = train if isinstance(train, dict) else {}
    rule, bound = train.get("keep_best") or "target_loss", train.get("keep_best_max_general_kl")
    _check_rule(rule)
    if bound is not None and not _is_number(bound):
        raise ConfigError(f"train.keep_best_max_general_kl: must be a number or null, got {bound!r} (in {path})")
    return rule, bound


def requirement(rule: str, max_general_kl: float | None) -> str:
    """What a checkpoint needs to compete under the rule, in words (for messages)."""
    _check_rule(rule)
    bound = "" if max_general_kl is None else f" and general_kl_base <= train.keep_best_max_general_kl = {max_general_kl:g}"
    return f"a finite target_loss{bound}"


def best_iteration(path: str, option: str = "--best") -> int:
    """The step of the best checkpoint of the run ``path`` names (a trainer output_dir or its
    ``checkpoints/``) under that run's rule (``run_rule``); ConfigError naming ``option`` when
    ``path`` is no run or none of its checkpoints qualifies."""
    if not os.path.isdir(path):
        raise ConfigError(f"--ckpt: {path}: no such directory")
    roots = [c for c in (path, os.path.join(path, RUN_CHECKPOINTS)) if os.path.isfile(os.path.join(c, LATEST))]
    if not roots:
        raise ConfigError(f"{option}: {path} is not a trainer output_dir (no {RUN_CHECKPOINTS}/{LATEST}); "
                          f"{option} chooses among the checkpoints of a run")
    root = roots[0]
    rule, bound = run_rule(run_dir(root))
    best = best_checkpoint(root, rule, bound)
    if best is None:
        evaluated = [n for n in iterations(root) if read_eval_record(os.path.join(root, checkpoint_name(n))) is not None]
        why = (f"none of the {len(evaluated)} evaluated checkpoints has {requirement(rule, bound)}"
               if evaluated else f"no checkpoint has eval figures (no {EVAL_FILE}: none was saved at an evaluated step)")
        raise ConfigError(f"{option}: {root}: {why}")
    return int(os.path.basename(best)[len("iter_"):])


def describe_evaluations(root: str) -> tuple[dict[int, str], int | None, str] | None:
    """For ``anchored-checkpoint list``: None when no checkpoint under ``root`` has an eval record;
    else (each iteration's eval figures as text, aligned across iterations; the iteration
    ``best_checkpoint`` picks under the run's rule, or None; one line saying the rule and its pick)."""
    records, unreadable = {}, {}
    for iteration in iterations(root):
        try:
            records[iteration] = read_eval_record(os.path.join(root, checkpoint_name(iteration)))
        except CheckpointError as exc:
            records[iteration], unreadable[iteration] = None, str(exc)
    if not unreadable and all(record is None for record in records.values()):
        return None
    cells = {n: [_figure(r.get(key)) for key in FIGURES] for n, r in records.items() if r is not None}
    widths = [max(len(row[i]) for row in cells.values()) if cells else 0 for i in range(len(FIGURES))]
    texts = {}
    for iteration in records:
        if iteration in cells:
            texts[iteration] = "  ".join(f"{key} {value.ljust(width)}" for key, value, width in zip(FIGURES, cells[iteration], widths))
        else:
            empty = f"{EVAL_FILE} unreadable" if iteration in unreadable else f"no {EVAL_FILE}"
            texts[iteration] = empty.ljust(sum(len(k) + 1 + w for k, w in zip(FIGURES, widths)) + 2 * (len(FIGURES) - 1))
    try:
        rule, bound = run_rule(run_dir(root))
        best = best_checkpoint(root, rule, bound)
    except (CheckpointError, ConfigError) as exc:
        return texts, None, f"best: not marked: {exc}"
    pick = None if best is None else int(os.path.basename(best)[len("iter_"):])
    chosen = "none" if best is None else os.path.basename(best)
    return texts, pick, f"best: {chosen} (the lowest target_loss among those with {requirement(rule, bound)})"


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
