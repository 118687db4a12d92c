"""What a user sees when their input is bad: one line naming the file, exit code 2, no traceback,
also from several ranks under torchrun."""

import os
import shutil
import subprocess
import sys

from tests.training.conftest import run_config

MESSAGE = "empty response: 'response' is empty (set data.on_bad_record: skip to skip such records)"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_file(tiny_run, tmp_path, **overrides):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_run, tmp_path / "out", **overrides)))
    return str(path)


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _bad_data(tmp_path, tiny_run):
    bad = tmp_path / "bad.jsonl"
    lines = open(tiny_run["data"]).read().splitlines()
    lines[2] = '{"prompt": "a", "response": ""}'
    bad.write_text("\n".join(lines) + "\n")
    return str(bad)


def test_a_data_error_is_one_line_with_the_file_and_line(tiny_run, tmp_path):
    bad = _bad_data(tmp_path, tiny_run)
    config = _config_file(tiny_run, tmp_path, data__paths=[bad], data__cache_dir=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "anchored_megatron.train", "--config", config],
                            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"anchored-sft: error: {bad}:3: {MESSAGE}"], result.stderr


def test_under_torchrun_the_message_is_printed_once(tiny_run, tmp_path):
    bad = _bad_data(tmp_path, tiny_run)
    config = _config_file(tiny_run, tmp_path, data__paths=[bad], data__cache_dir=str(tmp_path / "cache"), parallel__tp=2)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "anchored_megatron.train", "--config", config],
                            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("anchored-sft:")]
    assert ours == [f"anchored-sft: error: {bad}:3: {MESSAGE}"], result.stderr
    assert "anchored_megatron" not in result.stderr.replace("anchored_megatron.train FAILED", "").replace("-m anchored_megatron", "")
