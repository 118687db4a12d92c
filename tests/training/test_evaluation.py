"""Evaluation during training (``eval.*``) against independent references: the eval losses equal
transformers' loss of the exported checkpoint on the same sequences, the KL to the base equals a
float64 full-vocabulary computation with the base's HF model (0 at step 0); TP=2, PP=2, DP=2 and
FSDP agree with TP=1; a resumed run's eval records equal the uninterrupted run's, once each; the
training losses are those of the same run without evaluation; keep_best keeps the checkpoint the
eval records name; bad options are refused by name."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from anchored_megatron.config import ConfigError, RunConfig, build
from tests.convert.helpers import make_hf_model

WORDS = "alpha beta gamma delta red blue green one two three four five six seven eight nine".split()
OTHER = "ten eleven twelve plus minus equals question answer yes no maybe".split()
SEQ = 64


@pytest.fixture(scope="module")
def setting(tmp_path_factory, ranks):
    """A tiny HF Llama (tied embeddings) converted to our format, a tokenizer, training data,
    held-out target data (same kind of records) and general data (other words)."""
    from anchored_megatron.convert import hf_to_megatron
    from anchored_megatron.data.train_tokenizer import main as train_tokenizer

    root = tmp_path_factory.mktemp("eval_setting")
    make_hf_model("llama", str(root / "hf"), seed=4, tie_word_embeddings=True)
    hf_to_megatron(str(root / "hf"), str(root / "base"), "fp32", show_progress=False)
    # A teacher unlike the base: with the base as its own reference the first anchored step's
    # gradient is rounding noise, which Adam would scale up to full-size, layout-dependent steps.
    make_hf_model("llama", str(root / "hf_teacher"), seed=9, tie_word_embeddings=True)
    hf_to_megatron(str(root / "hf_teacher"), str(root / "teacher"), "fp32", show_progress=False)
    rng = random.Random(1)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS + OTHER) for _ in range(8)) for _ in range(300)) + "\nUser: Assistant: System:\n")
    assert train_tokenizer(["--input", str(corpus), "--vocab-size", "100", "--output", str(root / "tok")]) == 0

    def records(words, count):
        return [{"prompt": " ".join(rng.sample(words, 3)), "response": " ".join(rng.sample(words, 4))} for _ in range(count)]

    train, target, general = records(WORDS, 48), records(WORDS, 10), records(OTHER, 9)
    target = [r for r in target if r not in train]
    for name, rows in (("train", train), ("target", target), ("general", general)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(setting, output_dir, evaluate=True, **overrides) -> dict:
    from anchored_megatron.config import merge_overrides

    root = setting
    data = {
        "output_dir": str(output_dir), "seed": 5,
        "model": {"seq_length": SEQ},
        "student": {"checkpoint": str(root / "base")},
        "reference": {"checkpoint": str(root / "teacher")},
        "data": {"paths": [str(root / "train.jsonl")], "tokenizer": str(root / "tok"), "cache_dir": str(root / "cache"), "packing": False},
        "anchor": {"objective": "anchored", "alpha": 0.5, "outer_iterations": 2, "epochs_per_iteration": 1},
        "optim": {"lr": 2e-2, "warmup_fraction": 0.0},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 4, "save_interval": 2, "keep_checkpoints": 5,
                  "progress_bar": False, "tensorboard": False},
    }
    if evaluate:
        data["eval"] = {"paths": [str(root / "target.jsonl")], "general_paths": [str(root / "general.jsonl")], "interval": 1}
    return merge_overrides(data, [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in overrides.items()])


def train_rank(cfg_dict):
    from anchored_megatron.training.trainer import train

    train(build(RunConfig, cfg_dict))


def records(output_dir, kind):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [r for r in rows if (r.get("record") == "eval") == (kind == "eval")]


@pytest.fixture(scope="module")
def single(setting, tmp_path_factory, ranks):
    """TP=1 runs with and without evaluation."""
    dirs = {name: tmp_path_factory.mktemp(f"single_{name}") for name in ("eval", "plain")}
    for name, directory in dirs.items():
        ranks(train_rank, 1, config(setting, directory, evaluate=name == "eval"))
    return dirs


# ---- independent references -----------------------------------------------------------------------
def _sequences(setting, path):
    """The tokenised held-out sequences, as the run's data section makes them."""
    from anchored_megatron.config import DataConfig
    from anchored_megatron.data import build_sft_dataset, load_tokenizer

    data = DataConfig(paths=[str(path)], tokenizer=str(setting / "tok"), cache_dir=str(setting / "cache"), packing=False)
    dataset = build_sft_dataset(data, load_tokenizer(data.tokenizer), SEQ, seed=5)
    return [dataset[i] for i in range(len(dataset))]


def _log_probs(hf_dir, sequences):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=s["tokens"][None], position_ids=s["position_ids"][None]).logits[0].double(), -1)
                for s in sequences]


def _reference_figures(trained_hf, base_hf, sequences):
    """Masked means over the response tokens: CE of the trained model, KL(p_base || p_trained)."""
    ce = kl = tokens = 0.0
    for s, trained, base in zip(sequences, _log_probs(trained_hf, sequences), _log_probs(base_hf, sequences)):
        mask = s["loss_mask"].double()
        ce += -(trained.gather(-1, s["labels"][:, None].clamp(min=0))[:, 0] * mask).sum().item()
        kl += ((base.exp() * (base - trained)).sum(-1) * mask).sum().item()
        tokens += mask.sum().item()
    return ce / tokens, kl / tokens


def test_eval_figures_equal_transformers_and_a_float64_kl_to_the_base(setting, single, tmp_path):
    from anchored_megatron.convert import megatron_to_hf

    evals = {r["step"]: r for r in records(single["eval"], "eval")}
    assert sorted(evals) == [0, 1, 2, 3, 4]
    target, general = _sequences(setting, setting / "target.jsonl"), _sequences(setting, setting / "general.jsonl")
    base_hf = str(setting / "hf")
    # Step 0: the base itself.
    assert abs(evals[0]["general_kl_base"]) <= 1e-6
    assert abs(evals[0]["target_loss"] - _reference_figures(base_hf, base_hf, target)[0]) <= 1e-4
    for step in (2, 4):
        exported = str(tmp_path / f"hf_{step}")
        megatron_to_hf(str(single["eval"]), exported, "fp32", hf_config_source=base_hf, show_progress=False, iteration=step)
        target_loss, _ = _reference_figures(exported, base_hf, target)
        general_loss, general_kl = _reference_figures(exported, base_hf, general)
        record = evals[step]
        assert abs(record["target_loss"] - target_loss) <= 1e-4, (step, record, target_loss)
        assert abs(record["general_loss"] - general_loss) <= 1e-4, (step, record, general_loss)
        assert abs(record["general_kl_base"] - general_kl) <= 1e-5 + 1e-4 * general_kl, (step, record, general_kl)
        assert general_kl > 1e-3  # the student moved: the comparison above is not 0 == 0
        assert record["target_tokens"] == sum(int(s["loss_mask"].sum()) for s in target)
        assert record["general_tokens"] == sum(int(s["loss_mask"].sum()) for s in general)


def test_evaluation_leaves_the_training_losses_unchanged(single):
    with_eval, without = records(single["eval"], "train"), records(single["plain"], "train")
    assert [r["step"] for r in with_eval] == [r["step"] for r in without] == [1, 2, 3, 4]
    for a, b in zip(with_eval, without):
        for name in ("loss", "kl_step", "kl_reference", "grad_norm"):
            assert a[name] == b[name], (a["step"], name, a[name], b[name])


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [
    dict(world=2, parallel__tp=2),
    dict(world=2, parallel__tp=2, model__fused_output_loss=False),
    dict(world=2, parallel__pp=2),
    dict(world=2),
    dict(world=2, parallel__fsdp=True),
], ids=["tp2", "tp2_unfused", "pp2", "dp2", "fsdp_dp2"])
def test_every_layout_evaluates_like_tp1(setting, single, layout, tmp_path, ranks):
    layout = dict(layout)
    world = layout.pop("world")
    ranks(train_rank, world, config(setting, tmp_path, **layout))
    mine, reference = records(tmp_path, "eval"), records(single["eval"], "eval")
    assert [r["step"] for r in mine] == [r["step"] for r in reference]
    for a, b in zip(mine, reference):
        for name in ("target_loss", "general_loss", "general_kl_base", "target_tokens", "general_tokens"):
            assert abs(a[name] - b[name]) <= 2e-5 + 1e-4 * abs(b[name]), (a["step"], name, a[name], b[name])


def test_a_resumed_run_logs_each_evaluation_once_with_the_same_figures(setting, single, tmp_path, ranks):
    source = single["eval"]
    for sub in ("checkpoints", "snapshots"):
        shutil.copytree(source / sub, tmp_path / sub)
    # As if the run had died after step 4's evaluation but before its checkpoint was published.
    shutil.copy(source / "metrics.jsonl", tmp_path / "metrics.jsonl")
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000002\n")
    ranks(train_rank, 1, config(setting, tmp_path))
    resumed, uninterrupted = records(tmp_path, "eval"), records(source, "eval")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(resumed, uninterrupted):
        for name in ("target_loss", "general_loss", "general_kl_base"):
            assert a[name] == b[name], (a["step"], name, a[name], b[name])
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3, 4]


def test_keep_best_keeps_the_checkpoint_with_the_lowest_eval_target_loss(setting, tmp_path, ranks):
    from anchored_megatron.checkpoint.dirs import iterations

    ranks(train_rank, 1, config(setting, tmp_path, optim__lr=0.2, train__keep_checkpoints=1, train__save_interval=0,
                                train__keep_best="target_loss"))
    evals = [r for r in records(tmp_path, "eval") if r["step"] > 0]
    best = min(evals, key=lambda r: (r["target_loss"], r["step"]))["step"]
    assert sorted(iterations(str(tmp_path / "checkpoints"))) == sorted({best, 4})
    with open(tmp_path / "checkpoints" / f"iter_{best:07d}" / "eval.json") as fh:
        assert json.load(fh)["target_loss"] == pytest.approx(min(r["target_loss"] for r in evals), rel=0, abs=0)


# ---- refusals ------------------------------------------------------------------------------------
def test_eval_options_without_data_or_rule_are_refused_by_name(setting, tmp_path):
    cases = [
        (dict(evaluate=False, eval__interval=5), "eval.interval"),
        (dict(evaluate=False, eval__max_sequences=4), "eval.max_sequences"),
        (dict(evaluate=False, train__keep_best="target_loss"), "train.keep_best"),
        (dict(train__keep_best="lowest"), "train.keep_best"),
        (dict(train__keep_best_max_general_kl=0.1), "train.keep_best_max_general_kl"),
        (dict(eval__interval=-1), "eval.interval"),
    ]
    for overrides, option in cases:
        cfg = build(RunConfig, config(setting, tmp_path, **overrides))
        with pytest.raises(ConfigError, match=rf"^{option.replace('.', '[.]')}:"):
            cfg.validate(1)


def test_a_missing_eval_file_is_named(setting, tmp_path):
    from anchored_megatron.planning.preflight import prepare_run

    cfg = build(RunConfig, config(setting, tmp_path, eval__general_paths=[str(tmp_path / "nowhere.jsonl")]))
    with pytest.raises(ConfigError, match=r"eval\.general_paths\[0\]: .*nowhere\.jsonl: file not found"):
        prepare_run(cfg, 1)


def _setup_error(cfg_dict):
    from anchored_megatron.training.trainer import Trainer

    try:
        Trainer(build(RunConfig, cfg_dict)).setup()
    except ConfigError as exc:
        return str(exc)
    return None


def test_held_out_data_that_overlaps_the_training_data_is_refused_with_both_places(setting, tmp_path, ranks):
    overlapping = tmp_path / "overlap.jsonl"
    train_lines = (setting / "train.jsonl").read_text().splitlines()
    # Another file, another order, one record shared: found by content, not by name.
    overlapping.write_text((setting / "target.jsonl").read_text() + train_lines[7] + "\n")
    errors = ranks(_setup_error, 2, config(setting, tmp_path / "out", eval__paths=[str(overlapping)]))
    target_lines = len((setting / "target.jsonl").read_text().splitlines())
    for error in errors:  # every rank refuses, alike
        assert error is not None and error.startswith(f"eval.paths[0]: {overlapping}:{target_lines + 1} is also a training record")
        assert "train.jsonl:8" in error


def test_general_data_that_overlaps_the_replay_data_is_refused(setting, tmp_path, ranks):
    """Replay records are trained on too: a general set drawn from them is not held out."""
    replay = tmp_path / "replay.jsonl"
    general_lines = (setting / "general.jsonl").read_text().splitlines()
    own = [json.dumps({"prompt": f"yes no {word}", "response": "maybe"}) for word in OTHER[:8]]
    replay.write_text("\n".join([*own, general_lines[2]]) + "\n")
    error = ranks(_setup_error, 1, config(setting, tmp_path / "out", data__replay_paths=[str(replay)], data__replay_fraction=0.5))[0]
    assert error is not None and error.startswith(f"eval.general_paths[0]: {setting / 'general.jsonl'}:3 is also a training record ({replay}:9)")


# ---- the command line ----------------------------------------------------------------------------
@pytest.mark.distributed
def test_a_tp2_cli_run_logs_eval_records_and_trains_as_without_evaluation(setting, tmp_path):
    from tests.training.cli import ROOT, cli_env, write_config

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    outputs = {}
    for name in ("eval", "plain"):
        cfg = config(setting, tmp_path / name, evaluate=name == "eval", parallel__tp=2)
        if name == "eval":
            cfg["eval"]["interval"] = 2
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "anchored_megatron.train", "--config", path],
                                capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
    evals = records(tmp_path / "eval", "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert all(isinstance(r[name], float) for name in ("target_loss", "general_loss", "general_kl_base"))
    assert "eval at step 2: target_loss" in outputs["eval"]
    with_eval, without = records(tmp_path / "eval", "train"), records(tmp_path / "plain", "train")
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]


@pytest.mark.distributed
def test_the_interleaved_pipeline_evaluates_like_one_process(setting, tmp_path, ranks):
    """parallel.vpp (objective sft): 3 target microbatches per rank, not a multiple of the pipeline size."""
    sft = dict(anchor__objective="sft", reference__checkpoint=None, model__num_layers=4, eval__max_sequences=6)
    ranks(train_rank, 1, config(setting, tmp_path / "one", **sft))
    ranks(train_rank, 2, config(setting, tmp_path / "vpp", parallel__pp=2, parallel__vpp=2, **sft))
    mine, reference = records(tmp_path / "vpp", "eval"), records(tmp_path / "one", "eval")
    assert [r["step"] for r in mine] == [r["step"] for r in reference] == [0, 1, 2, 3, 4]
    for a, b in zip(mine, reference):
        for name in ("target_loss", "general_loss", "general_kl_base"):
            assert abs(a[name] - b[name]) <= 2e-5 + 1e-4 * abs(b[name]), (a["step"], name, a[name], b[name])


@pytest.mark.parametrize("count, dp, mbs, multiple", [(9, 2, 2, 1), (5, 4, 1, 1), (3, 2, 1, 2), (16, 2, 4, 2), (1, 3, 2, 1)])
def test_every_sequence_is_evaluated_once_and_every_rank_runs_as_many_microbatches(count, dp, mbs, multiple):
    from anchored_megatron.training.evaluation import share

    shares = [share(count, rank, dp, mbs, multiple) for rank in range(dp)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % multiple == 0
    assert all(len(mb) == mbs for s in shares for mb in s)
    seen = sorted(i for s in shares for mb in s for i in mb if i is not None)
    assert seen == list(range(count))
