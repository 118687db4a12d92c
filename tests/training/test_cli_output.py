"""What a user sees from ``python -m anchored_megatron.train``: a clean stderr when output is
redirected, a line per outer iteration and per saved checkpoint, a final summary, the resolved
config and a train.log next to the run, and a notice before the loss kernels compile."""

import json
import os
import re

import pytest
import yaml

from tests.training.cli import run_train, write_config
from tests.training.conftest import run_config

COMPILE_NOTICE = "compiling the anchored loss kernels"


@pytest.fixture(scope="module")
def two_starts(tiny_run, tmp_path_factory):
    """A run stopped at step 4 (train.max_steps), then resumed to the end with another log_interval;
    both on one fresh compile cache. The config gives no model: it comes from the student checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    cfg = run_config(tiny_run, out)
    del cfg["model"]
    cfg["train"]["progress_bar"] = True  # the default; no terminal here, so no bar either
    config = write_config(root / "run.yaml", cfg)
    cache = str(root / "inductor")
    # The compiled loss kernels (tests/conftest.py switches them off by default): the compile notice is tested.
    first = run_train(config, "train.max_steps=4", TORCHINDUCTOR_CACHE_DIR=cache, ANCHORED_FUSED_LOSS="1")
    assert first.returncode == 0, first.stderr
    second = run_train(config, "train.log_interval=2", TORCHINDUCTOR_CACHE_DIR=cache, ANCHORED_FUSED_LOSS="1")
    assert second.returncode == 0, second.stderr
    with open(out / "metrics.jsonl") as fh:
        losses = {r["step"]: r["loss"] for r in map(json.loads, fh)}
    return {"out": str(out), "first": first, "second": second, "losses": losses}


def test_stderr_stays_empty_when_output_is_redirected(two_starts):
    # No warning from Megatron-Core or torch, and no progress bar (stderr is not a terminal).
    assert two_starts["first"].stderr == ""
    assert two_starts["second"].stderr == ""


def _without_steps(stdout):
    """The lines besides the step lines, the compile notice and the data summary (printed only by
    the run that builds the shared data cache)."""
    return [line for line in stdout.splitlines() if not line.startswith(("step ", COMPILE_NOTICE, "data: "))]


def test_first_start_prints_its_iteration_checkpoint_and_summary(two_starts):
    out, losses = two_starts["out"], two_starts["losses"]
    lines = _without_steps(two_starts["first"].stdout)
    assert lines[0] == "outer iteration 1/2 from step 0: alpha 0.5, snapshot refreshed from the student"
    assert lines[1] == f"saved checkpoint iter_0000004 -> {out}/checkpoints/iter_0000004"
    assert re.fullmatch(rf"stopped at step 4/16 \(train\.max_steps\): 4 steps in [\d.]+ s, \d+ tok/s, "
                        rf"final loss {losses[4]:.4f}, last checkpoint {out}/checkpoints/iter_0000004", lines[2]), lines[2]
    assert len(lines) == 3
    assert [line.split()[1] for line in two_starts["first"].stdout.splitlines() if line.startswith("step ")] == ["1/16", "2/16", "3/16", "4/16"]


def test_resumed_start_prints_what_changed_and_continues_the_count(two_starts):
    out, losses = two_starts["out"], two_starts["losses"]
    lines = _without_steps(two_starts["second"].stdout)
    assert lines[0] == "config changed since the previous start (train.log_interval, train.max_steps); the previous one is kept as config.yaml.1"
    assert lines[1].startswith("resumed from ")
    assert lines[2:5] == [
        f"saved checkpoint iter_0000008 -> {out}/checkpoints/iter_0000008",
        "outer iteration 2/2 from step 8: alpha 0.5, snapshot refreshed from the student",
        f"saved checkpoint iter_0000016 -> {out}/checkpoints/iter_0000016",
    ]
    assert re.fullmatch(rf"finished at step 16/16: 12 steps \(resumed at step 4\) in [\d.]+ s, \d+ tok/s, "
                        rf"final loss {losses[16]:.4f}, last checkpoint {out}/checkpoints/iter_0000016", lines[5]), lines[5]
    assert len(lines) == 6
    steps = [line.split()[1] for line in two_starts["second"].stdout.splitlines() if line.startswith("step ")]
    assert steps == [f"{s}/16" for s in range(6, 17, 2)]


def test_train_log_holds_every_line_of_both_starts(two_starts):
    with open(os.path.join(two_starts["out"], "train.log")) as fh:
        assert fh.read() == two_starts["first"].stdout + two_starts["second"].stdout


def test_config_yaml_is_the_resolved_config_and_the_previous_start_is_kept(tiny_run, two_starts):
    def load(name):
        with open(os.path.join(two_starts["out"], name)) as fh:
            return yaml.safe_load(fh)

    with open(os.path.join(tiny_run["base"], "model_config.yaml")) as fh:
        checkpoint_model = yaml.safe_load(fh)
    current, previous = load("config.yaml"), load("config.yaml.1")
    assert current["model"] == checkpoint_model == previous["model"]
    assert (current["train"]["log_interval"], current["train"]["max_steps"]) == (2, None)
    assert (previous["train"]["log_interval"], previous["train"]["max_steps"]) == (1, 4)
    assert {k: v for k, v in current.items() if k != "train"} == {k: v for k, v in previous.items() if k != "train"}
    assert current["output_dir"] == two_starts["out"] and current["anchor"]["alpha"] == 0.5


def test_compile_notice_comes_before_a_cold_compile_only(two_starts):
    first = two_starts["first"].stdout.splitlines()
    notices = [i for i, line in enumerate(first) if line.startswith(COMPILE_NOTICE)]
    assert len(notices) == 1 and first[notices[0] + 1].startswith("step 1/16 ")
    assert COMPILE_NOTICE not in two_starts["second"].stdout
