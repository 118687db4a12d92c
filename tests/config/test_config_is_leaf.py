"""config/ is the bottom layer: validating a whole run (student and reference checkpoints, data,
tokenizer and output directory set, all existing) loads neither torch nor any other package of
ours, because the checks that read files live in planning.preflight."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import yaml

from anchored_megatron.config import PRESETS, ModelConfig
from tests.conftest import write_word_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import json, sys

    from anchored_megatron.config import ConfigError, load_run_config
    from anchored_megatron.config.validate import validate_run

    cfg = load_run_config(None, json.loads(sys.argv[1]))
    try:
        validate_run(cfg, 2)
        error = None
    except ConfigError as exc:
        error = str(exc)
    ours = sorted(name for name in sys.modules if name.startswith("anchored_megatron.") and name.split(".")[1] != "config")
    print(json.dumps({"error": error, "torch": "torch" in sys.modules, "ours": ours}))
""")


def _checkpoint(path):
    """What the config layer would take for a converted checkpoint: metadata.json + model_config.yaml."""
    path.mkdir()
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (path / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(ModelConfig(**PRESETS["tiny"]))))
    return str(path)


def test_validating_a_run_imports_neither_torch_nor_another_package_of_ours(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    args = [f"output_dir={tmp_path / 'out'}", "model.preset=tiny", "train.global_batch_size=2",
            f"student.checkpoint={_checkpoint(tmp_path / 'base')}", f"reference.checkpoint={_checkpoint(tmp_path / 'teacher')}",
            f"data.paths=[{data}]", f"data.tokenizer={write_word_tokenizer(tmp_path / 'tok')}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"error": None, "torch": False, "ours": []}
