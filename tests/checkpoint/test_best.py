"""The best evaluated checkpoint: eval.json inside a checkpoint, the target_loss rule with its
general-KL bound, pruning that spares it, ``anchored-checkpoint list`` and ``megatron-to-hf --best``.

The checkpoints here are folders as a save publishes them (files, then eval.json, then the
manifest over both, then ``latest``), without tensors, except for the one export test.
"""

import json
import math
import os

import pytest
import yaml

from anchored_megatron.checkpoint import CheckpointError, manifest
from anchored_megatron.checkpoint.best import (
    best_checkpoint, best_iteration, read_eval_record, run_rule, write_eval_record,
)
from anchored_megatron.checkpoint.cli import main as checkpoint_cli
from anchored_megatron.checkpoint.trainer_io import prune
from anchored_megatron.config import ConfigError


def evaluation(step, target=None, general=None, kl=None) -> dict:
    return {"step": step, "record": "eval", "target_loss": target, "target_tokens": 40,
            "general_loss": general, "general_kl_base": kl, "general_tokens": 30, "eval_time_s": 0.5}


def publish(root, step, record=None, eval_text=None):
    """A complete checkpoint of ``step`` under ``root``, named by ``latest`` (as a save leaves it)."""
    path = root / f"iter_{step:07d}"
    path.mkdir()
    (path / "weights.bin").write_bytes(f"weights of step {step}".encode())
    if record is not None:
        write_eval_record(str(path), record)
    if eval_text is not None:
        (path / "eval.json").write_text(eval_text)
    manifest.write_manifest(str(path), manifest.hash_entries(str(path), manifest.list_files(str(path))))
    (root / "latest").write_text(f"iter_{step:07d}\n")
    return str(path)


def write_run_config(run, keep_best="target_loss", bound=None):
    (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "train": {
        "keep_checkpoints": 2, "keep_best": keep_best, "keep_best_max_general_kl": bound}}))


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "run" / "checkpoints"
    path.mkdir(parents=True)
    return path


# ---- eval.json ---------------------------------------------------------------------------------
def test_an_eval_record_is_plain_json_with_sorted_keys_and_reads_back(tmp_path):
    record = evaluation(12, target=1.23, kl=0.034)
    write_eval_record(str(tmp_path), record)
    assert (tmp_path / "eval.json").read_text() == json.dumps(record, sort_keys=True) + "\n"
    assert read_eval_record(str(tmp_path)) == record


def test_a_checkpoint_without_eval_json_has_no_record(tmp_path):
    assert read_eval_record(str(tmp_path)) is None


@pytest.mark.parametrize("text, problem", [
    ("{\"target_loss\": 1.0", "unreadable (JSONDecodeError"),
    ("[1.0]", "expected a JSON object (an eval record), got list"),
    ("{\"target_loss\": \"low\"}", "target_loss must be a number or null, got 'low'"),
    ("{\"general_kl_base\": true}", "general_kl_base must be a number or null, got True"),
])
def test_a_bad_eval_json_is_named(root, text, problem):
    publish(root, 2, evaluation(2, target=1.0))
    path = publish(root, 4, eval_text=text)
    with pytest.raises(CheckpointError) as info:
        best_checkpoint(str(root))
    assert str(info.value).startswith(f"{os.path.join(path, 'eval.json')}: {problem}")


# ---- the target_loss rule ----------------------------------------------------------------------
def test_the_lowest_target_loss_wins(root):
    for step, loss in ((2, 1.5), (4, 1.2), (6, 1.3), (8, 1.25)):
        publish(root, step, evaluation(step, target=loss))
    assert best_checkpoint(str(root)) == str(root / "iter_0000004")


def test_a_tie_goes_to_the_earlier_step(root):
    for step, loss in ((2, 1.4), (4, 1.2), (6, 1.2), (8, 1.2)):
        publish(root, step, evaluation(step, target=loss))
    assert best_checkpoint(str(root), "target_loss") == str(root / "iter_0000004")


def test_the_general_kl_bound_filters_inclusively(root):
    publish(root, 2, evaluation(2, target=1.0, kl=0.09))
    publish(root, 4, evaluation(4, target=1.2, kl=0.04))
    publish(root, 6, evaluation(6, target=1.1))  # no general figures: cannot meet a bound
    publish(root, 8, evaluation(8, target=1.15, kl=math.nan))
    assert best_checkpoint(str(root)) == str(root / "iter_0000002")
    assert best_checkpoint(str(root), max_general_kl=0.05) == str(root / "iter_0000004")
    assert best_checkpoint(str(root), max_general_kl=0.04) == str(root / "iter_0000004")
    assert best_checkpoint(str(root), max_general_kl=0.1) == str(root / "iter_0000002")
    assert best_checkpoint(str(root), max_general_kl=0.01) is None


def test_no_finite_target_loss_means_no_best(root):
    publish(root, 2)
    publish(root, 4, evaluation(4, general=2.0, kl=0.01))
    publish(root, 6, evaluation(6, target=math.nan))
    publish(root, 8, evaluation(8, target=math.inf))
    publish(root, 10, {"step": 10, "record": "eval"})
    assert best_checkpoint(str(root)) is None


def test_a_save_in_progress_never_competes(root):
    publish(root, 2, evaluation(2, target=1.5))
    (root / "iter_0000004.tmp").mkdir()
    write_eval_record(str(root / "iter_0000004.tmp"), evaluation(4, target=0.1))
    assert best_checkpoint(str(root)) == str(root / "iter_0000002")


def test_an_unknown_rule_is_refused_by_its_option(root):
    publish(root, 2, evaluation(2, target=1.5))
    with pytest.raises(ConfigError, match=r"^train.keep_best: unknown rule 'general_loss'; known: target_loss$"):
        best_checkpoint(str(root), "general_loss")


# ---- the run's rule, from its config.yaml ------------------------------------------------------
def test_the_rule_comes_from_the_runs_config(tmp_path):
    assert run_rule(str(tmp_path)) == ("target_loss", None)  # no config.yaml
    write_run_config(tmp_path, keep_best="target_loss", bound=0.05)
    assert run_rule(str(tmp_path)) == ("target_loss", 0.05)
    write_run_config(tmp_path, keep_best=None)
    assert run_rule(str(tmp_path)) == ("target_loss", None)
    write_run_config(tmp_path, keep_best="accuracy")
    with pytest.raises(ConfigError, match=r"^train.keep_best: unknown rule 'accuracy'"):
        run_rule(str(tmp_path))


# ---- pruning -----------------------------------------------------------------------------------
def test_prune_keeps_the_protected_checkpoint_besides_the_newest(root):
    for step in (2, 4, 6, 8, 10):
        publish(root, step)
    (root / "iter_0000012.tmp").mkdir()
    prune(str(root), keep=2, protect=(str(root / "iter_0000004"),))
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000008", "iter_0000010", "latest"]
    prune(str(root), keep=2)
    assert sorted(os.listdir(root)) == ["iter_0000008", "iter_0000010", "latest"]


def test_prune_keeps_latest_and_a_protected_one_among_the_newest_counts_once(root):
    for step in (2, 4, 6):
        publish(root, step)
    (root / "latest").write_text("iter_0000002\n")
    prune(str(root), keep=1, protect=(str(root / "iter_0000006"),))
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000006", "latest"]


# ---- anchored-checkpoint list ------------------------------------------------------------------
def test_list_shows_the_eval_figures_and_marks_the_best_under_the_runs_bound(root, capsys):
    write_run_config(root.parent, bound=0.05)
    publish(root, 2, evaluation(2, target=1.0, kl=0.09))
    publish(root, 4, evaluation(4, target=1.25, general=2.5, kl=0.04))
    publish(root, 6)
    assert checkpoint_cli(["list", str(root.parent)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(root),
        "  iter_0000002                    target_loss 1.0000  general_loss n/a     general_kl_base 0.0900  verified",
        "  iter_0000004            (best)  target_loss 1.2500  general_loss 2.5000  general_kl_base 0.0400  verified",
        "  iter_0000006  (latest)          no eval.json                                                     verified",
        "best: iter_0000004 (the lowest target_loss among those with a finite target_loss and "
        "general_kl_base <= train.keep_best_max_general_kl = 0.05)",
    ]


def test_list_without_eval_records_is_unchanged(root, capsys):
    publish(root, 2)
    publish(root, 4)
    assert checkpoint_cli(["list", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(root), "  iter_0000002            verified", "  iter_0000004  (latest)  verified",
    ]


def test_list_names_an_unreadable_eval_json_and_marks_no_best(root, capsys):
    publish(root, 2, evaluation(2, target=1.0))
    path = publish(root, 4, eval_text="{")
    assert checkpoint_cli(["list", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == [
        "  iter_0000002                    target_loss 1.0000  general_loss n/a  general_kl_base n/a  verified",
        "  iter_0000004  (latest)          eval.json unreadable                                       verified",
    ]
    assert lines[3].startswith(f"best: not marked: {os.path.join(path, 'eval.json')}: unreadable (JSONDecodeError")


# ---- megatron-to-hf --best ---------------------------------------------------------------------
def test_best_iteration_follows_the_runs_rule(root):
    publish(root, 2, evaluation(2, target=1.0, kl=0.09))
    publish(root, 4, evaluation(4, target=1.2, kl=0.04))
    publish(root, 6)
    for path in (root.parent, root):
        assert best_iteration(str(path)) == 2
    write_run_config(root.parent, bound=0.05)
    assert best_iteration(str(root.parent)) == 4
    write_run_config(root.parent, bound=0.01)
    with pytest.raises(ConfigError) as info:
        best_iteration(str(root.parent))
    assert str(info.value) == (f"--best: {root}: none of the 2 evaluated checkpoints has a finite target_loss "
                               "and general_kl_base <= train.keep_best_max_general_kl = 0.01")


def test_best_is_refused_on_a_single_checkpoint(root):
    path = publish(root, 2, evaluation(2, target=1.0))
    with pytest.raises(ConfigError, match=r"^--best: .*iter_0000002 is not a trainer output_dir \(no checkpoints/latest\)"):
        best_iteration(path)


def test_export_best_without_eval_figures_is_one_line_naming_best(root, tmp_path, capsys):
    from anchored_megatron.convert.cli import main as convert_cli

    publish(root, 2)
    publish(root, 4)
    assert convert_cli(["megatron-to-hf", "--ckpt", str(root.parent), "--best", "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 2
    assert capsys.readouterr().err == (
        f"anchored-convert: error: --best: {root}: no checkpoint has eval figures (no eval.json: none was saved at an evaluated step)\n"
    )
    assert not os.path.exists(tmp_path / "hf")


def test_best_and_iteration_together_are_refused(root, tmp_path, capsys):
    from anchored_megatron.convert.cli import main as convert_cli

    publish(root, 2, evaluation(2, target=1.0))
    with pytest.raises(SystemExit) as info:
        convert_cli(["megatron-to-hf", "--ckpt", str(root.parent), "--best", "--iteration", "2",
                     "--out", str(tmp_path / "hf"), "--dtype", "fp32"])
    assert info.value.code == 2
    assert "argument --iteration: not allowed with argument --best" in capsys.readouterr().err


def test_export_best_writes_the_weights_of_the_best_step(root, tmp_path, capsys):
    """Two converted tiny models as the run's checkpoints 2 and 4: --best exports step 2's weights,
    compared with the HF model it was converted from (the fp32 round trip is exact)."""
    from safetensors.torch import load_file

    from anchored_megatron.convert import hf_to_megatron
    from anchored_megatron.convert.cli import main as convert_cli
    from tests.convert.helpers import make_hf_model

    sources = {}
    for step, seed, loss in ((2, 0, 1.1), (4, 1, 1.3)):
        sources[step] = make_hf_model("llama", str(tmp_path / f"hf{step}"), seed=seed, num_hidden_layers=1)
        path = root / f"iter_{step:07d}"
        hf_to_megatron(sources[step], str(path), "fp32", show_progress=False)
        write_eval_record(str(path), evaluation(step, target=loss))  # then the manifest, as a save does
        manifest.write_manifest(str(path), manifest.hash_entries(str(path), manifest.list_files(str(path))))
    (root / "latest").write_text("iter_0000004\n")
    out = tmp_path / "export"
    assert convert_cli(["megatron-to-hf", "--ckpt", str(root.parent), "--best", "--out", str(out), "--dtype", "fp32", "--no-progress"]) == 0
    assert f"from {root / 'iter_0000002'}:" in capsys.readouterr().out
    exported, source = load_file(str(out / "model.safetensors")), load_file(os.path.join(sources[2], "model.safetensors"))
    assert sorted(exported) == sorted(source)
    assert all((exported[k] == source[k]).all() for k in source)
