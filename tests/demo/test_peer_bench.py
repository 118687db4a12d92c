"""bench/peer_bench.py in its smallest mode, as a user runs it: every engine trains on the token ids
our trainer read (checked against the trainer's own data cache, read here with numpy), the frozen-hidden
cache is hit from the second step, and the table has the columns, rows and ratios it promises."""

import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRL_MISSING = "TRL not installed: its columns are left out (pip install trl==1.16.0, or pip install -e .[peer])"


def _trl_importable() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def _digest(ids) -> str:
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()


def _table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer_bench")
    command = [sys.executable, "bench/peer_bench.py", "--quick", "--threads", "1", "--engines", "plain", "trl", "ours-tp1",
               "ours-dp2", "--rows", "sft", "distill-cache", "--work-dir", str(root / "work"), "--json", str(root / "runs.json"),
               "--output", str(root / "table.md")]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(root / "runs.json") as fh:
        runs = json.load(fh)["runs"]
    (cache,) = glob.glob(str(root / "work" / "cache" / "sft-*"))  # what our trainer tokenised and read
    arrays = {name: np.load(os.path.join(cache, f"{name}.npy")) for name in ("tokens", "trained", "doc_lengths")}
    return {"result": result, "runs": runs, "trainer_data": arrays, "table": (root / "table.md").read_text()}


@pytest.mark.distributed
def test_every_step_of_the_hf_loop_and_trl_consumed_the_sequences_our_trainer_read(bench):
    data = bench["trainer_data"]
    assert list(data["doc_lengths"]) == [256] * 8  # one record per sequence, no padding
    expected = sorted(_digest(row) for row in data["tokens"])
    peers = [run for run in bench["runs"] if run["column"] in ("plain", "trl")]
    assert {run["column"] for run in peers} == ({"plain", "trl"} if _trl_importable() else {"plain"})
    for run in peers:
        assert [sorted(step) for step in run["consumed"]] == [expected, expected], run["column"]


@pytest.mark.distributed
def test_every_engine_trained_on_the_same_response_tokens_every_step(bench):
    # A response token is trained when it has a predecessor in its sequence (each sequence is one record).
    response_tokens = int(bench["trainer_data"]["trained"][:, 1:].sum())
    assert response_tokens > 0
    for run in bench["runs"]:
        assert run["response_tokens"] == [response_tokens, response_tokens], (run["column"], run["row"])


@pytest.mark.distributed
def test_the_frozen_hidden_cache_is_filled_at_step_one_and_read_at_step_two(bench):
    cached = [run for run in bench["runs"] if run["row"] == "distill-cache"]
    assert [run["column"] for run in cached] == ["ours-tp1", "ours-dp2"]
    for run in cached:
        assert run["frozen_cached"] == [0.0, 1.0], run["column"]


@pytest.mark.distributed
def test_the_table_has_the_selected_columns_rows_and_ratios_to_the_plain_loop(bench):
    table, stdout, stderr = bench["table"], bench["result"].stdout, bench["result"].stderr
    assert stdout == table
    has_trl = _trl_importable()
    assert (TRL_MISSING in stderr) != has_trl and (TRL_MISSING in table) != has_trl
    rows = _table(table)
    assert rows[0] == ["step", "plain HF + PyTorch", *(["TRL"] if has_trl else []), "ours TP=1", "ours DP=2"]
    by_label = {row[0]: row[1:] for row in rows[2:]}
    assert list(by_label) == ["SFT", "distill, train.frozen_hidden_cache=true", "peak RSS: SFT",
                              "peak RSS: distill, train.frozen_hidden_cache=true"]
    for label in ("SFT", "peak RSS: SFT"):
        assert by_label[label][0].endswith("(1.00x)")  # the plain loop against itself
        assert all(cell.endswith("x)") for cell in by_label[label])
    # The plain loop ran no distillation here: nothing to take a ratio to, and no plain cell.
    assert by_label["distill, train.frozen_hidden_cache=true"][0] == ""
    assert all(cell.endswith(" s") for cell in by_label["distill, train.frozen_hidden_cache=true"][-2:])
    assert "machine: " in table and " cores, load average " in table and "torch " in table
    # One round of 2 steps: each engine's paired ratio is its last SFT step over the plain loop's.
    last = {run["column"]: run["step_times"][-1] for run in bench["runs"] if run["row"] == "sft"}
    labels = {"trl": "TRL", "ours-tp1": "ours TP=1", "ours-dp2": "ours DP=2"}
    expected = [f"- SFT, {labels[column]}: {last[column] / last['plain']:.2f}x" for column in labels if column in last]
    assert [line for line in table.splitlines() if line.startswith("- ")] == expected
