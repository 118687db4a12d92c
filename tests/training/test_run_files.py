"""config.yaml and train.log next to a run."""

import io
import sys

import yaml

from anchored_megatron.training.run_files import TrainLog, write_run_config


def test_config_yaml_holds_the_config_and_a_changed_start_keeps_the_previous_one(tmp_path):
    first = {"optim": {"lr": 0.001, "min_lr": 0.0}, "train": {"log_interval": 1}, "data": {"paths": ["a.jsonl"]}}
    assert write_run_config(str(tmp_path), first) is None
    assert write_run_config(str(tmp_path), first) is None  # an unchanged resume rotates nothing
    second = {"optim": {"lr": 0.002, "min_lr": 0.0}, "train": {"log_interval": 1}, "data": {"paths": ["a.jsonl", "b.jsonl"]}}
    note = write_run_config(str(tmp_path), second)
    assert note == "config changed since the previous start (data.paths, optim.lr); the previous one is kept as config.yaml.1"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == second
    assert yaml.safe_load((tmp_path / "config.yaml.1").read_text()) == first
    write_run_config(str(tmp_path), first)
    assert yaml.safe_load((tmp_path / "config.yaml.2").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "config.yaml.1", "config.yaml.2"]


def test_train_log_copies_what_is_printed_inside_and_is_appended_to(tmp_path, monkeypatch):
    for text in ("first\n", "second\n"):
        console = io.StringIO()
        monkeypatch.setattr(sys, "stdout", console)
        log = TrainLog(str(tmp_path))
        print("outside")
        with log.copying():
            print(text, end="")
        print("after")
        log.close()
        assert console.getvalue() == f"outside\n{text}after\n"
        assert sys.stdout is console
    assert (tmp_path / "train.log").read_text() == "first\nsecond\n"
