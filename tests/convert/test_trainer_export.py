"""A converted model trained by the trainer exports with its source config.json, and every
``--ckpt`` takes a trainer output_dir (newest checkpoint, or ``--iteration N``).

One short run serves all tests: HF Qwen3 -> Megatron -> 2 steps (from the converted
checkpoint) -> resumed for 2 more with no student.checkpoint (so the HF config can only come
through the run's own checkpoints) -> checkpoints at steps 2 and 4.
"""

import dataclasses
import filecmp
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from anchored_megatron.checkpoint.model_config import load_model_config
from anchored_megatron.convert import hf_to_megatron, megatron_to_hf
from anchored_megatron.convert.cli import main as cli_main
from tests.convert.helpers import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "alpha beta gamma delta red blue green one two three four five six seven".split()


def train_then_resume(first: dict, second: dict) -> None:
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.training.trainer import train

    train(build(RunConfig, first))
    train(build(RunConfig, second))


def _source_model(hf_dir: str) -> str:
    """A tiny Qwen3 whose config.json holds what a synthesised one cannot know."""
    make_hf_model("qwen3", hf_dir, num_hidden_layers=2, vocab_size=128, bos_token_id=1, eos_token_id=[2, 3],
                  pad_token_id=0, max_window_layers=1, layer_types=["full_attention", "full_attention"])
    path = os.path.join(hf_dir, "config.json")
    with open(path) as fh:
        config = json.load(fh)
    # As Qwen2.5's configs do: a window size recorded although use_sliding_window is false.
    config["sliding_window"] = 4096
    with open(path, "w") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return hf_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ranks):
    from anchored_megatron.data.train_tokenizer import main as train_tokenizer

    root = tmp_path_factory.mktemp("trained")
    hf_dir = _source_model(str(root / "hf"))
    hf_to_megatron(hf_dir, str(root / "mg"), "fp32", show_progress=False)
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)) + "\nUser: Assistant: System:\n")
    assert train_tokenizer(["--input", str(corpus), "--vocab-size", "100", "--output", str(root / "tok")]) == 0
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.sample(WORDS, 3)), "response": " ".join(rng.sample(WORDS, 4))}) + "\n"
                            for _ in range(64)))
    out = root / "run"
    first = {
        "output_dir": str(out), "seed": 3,
        "student": {"checkpoint": str(root / "mg")},
        "data": {"paths": [str(data)], "tokenizer": str(root / "tok"), "cache_dir": str(root / "cache")},
        "anchor": {"objective": "sft", "outer_iterations": 1, "epochs_per_iteration": 2},
        "optim": {"lr": 1e-2},
        "train": {"micro_batch_size": 1, "global_batch_size": 4, "max_steps": 2, "save_interval": 2,
                  "keep_checkpoints": 5, "progress_bar": False, "tensorboard": False},
    }
    second = {**first, "student": {"checkpoint": None},
              "model": dataclasses.asdict(load_model_config(str(root / "mg"))),
              "train": {**first["train"], "max_steps": 4}}
    ranks(train_then_resume, 1, first, second, timeout=600)
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_0000002", "iter_0000004", "latest"]
    return {"hf": hf_dir, "out": str(out), "checkpoints": str(out / "checkpoints")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``anchored-convert`` in a fresh process, as a user starts it (no torchrun variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "anchored_megatron.convert.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _tensors(model_dir) -> dict:
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _same_tensors(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_output_exports_its_newest_checkpoint_with_the_source_config(trained, tmp_path):
    done = _cli("megatron-to-hf", "--ckpt", trained["out"], "--out", str(tmp_path / "hf"), "--dtype", "bf16")
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr  # no progress bar in a pipe
    newest = os.path.join(trained["checkpoints"], "iter_0000004")
    assert f"from {newest}:" in done.stdout
    for checkpoint in ("iter_0000002", "iter_0000004"):  # kept byte for byte through both runs
        assert filecmp.cmp(os.path.join(trained["hf"], "config.json"), os.path.join(trained["checkpoints"], checkpoint, "hf_config.json"), shallow=False)
    megatron_to_hf(newest, str(tmp_path / "explicit"), "bf16", show_progress=False)
    assert _same_tensors(_tensors(tmp_path / "hf"), _tensors(tmp_path / "explicit"))
    with open(os.path.join(trained["hf"], "config.json")) as fh:
        source_text = fh.read()
    with open(tmp_path / "hf" / "config.json") as fh:
        exported_text = fh.read()
    source, exported = json.loads(source_text), json.loads(exported_text)
    assert source["eos_token_id"] == [2, 3] and source["sliding_window"] == 4096 and "layer_types" in source
    assert (source.pop("dtype"), exported.pop("dtype")) == ("float32", "bfloat16")
    assert exported == source
    changed = [(a, b) for a, b in zip(source_text.splitlines(), exported_text.splitlines()) if a != b]
    assert len(source_text.splitlines()) == len(exported_text.splitlines())
    assert changed == [('  "dtype": "float32",', '  "dtype": "bfloat16",')]


def test_iteration_picks_a_checkpoint_and_an_unknown_one_is_refused(trained, tmp_path, capsys):
    args = ["--dtype", "fp32", "--no-progress"]
    assert cli_main(["megatron-to-hf", "--ckpt", trained["out"], "--iteration", "2", "--out", str(tmp_path / "two"), *args]) == 0
    megatron_to_hf(os.path.join(trained["checkpoints"], "iter_0000002"), str(tmp_path / "explicit"), "fp32", show_progress=False)
    assert _same_tensors(_tensors(tmp_path / "two"), _tensors(tmp_path / "explicit"))
    megatron_to_hf(trained["out"], str(tmp_path / "four"), "fp32", show_progress=False)
    assert not _same_tensors(_tensors(tmp_path / "two"), _tensors(tmp_path / "four"))
    capsys.readouterr()
    assert cli_main(["megatron-to-hf", "--ckpt", trained["out"], "--iteration", "3", "--out", str(tmp_path / "three"), *args]) == 2
    assert capsys.readouterr().err == (
        f"anchored-convert: error: --ckpt: {trained['checkpoints']} holds no checkpoint of iteration 3 (available iterations: 2, 4)\n"
    )
    assert not os.path.exists(tmp_path / "three")


def test_compare_alone_runs_while_port_29500_is_taken(trained, tmp_path):
    megatron_to_hf(trained["out"], str(tmp_path / "hf"), "fp32", show_progress=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        try:
            taken.bind(("127.0.0.1", 29500))
            taken.listen()
        except OSError:
            pass  # already held by another process: the situation this test needs
        done = _cli("compare", "--hf", str(tmp_path / "hf"), "--ckpt", trained["out"], "--batch", "1", "--seq", "16")
    assert done.returncode == 0, done.stderr
    diff = float(done.stdout.split("=")[1].split()[0])
    assert diff < 1e-4 and "top-1 agreement = 100.00%" in done.stdout, done.stdout
    assert done.stderr == "", done.stderr  # no third-party warnings, no progress frames in a pipe
