"""Run ``python -m anchored_megatron.train`` the way a user does, in a subprocess: what it prints
to stdout and stderr is what a user sees (pytest's own warning filters do not apply there)."""

import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = [sys.executable, "-m", "anchored_megatron.train"]


def write_config(path, cfg: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, **extra)
    return env


def run_train(config_path: str, *overrides: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, "--config", config_path, *overrides], cwd=ROOT, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)
