"""The real-model study's plan (experiment/real.py) against the study's specification, written out
here: which objective, budget, reference and data each method gets, and when a job's cache key
must change (so that a study resumed across sessions re-runs exactly what changed)."""

import json

import pytest

from anchored_megatron.config import RunConfig, build
from anchored_megatron.config.validate import validate_run
from anchored_megatron.experiment.real import RealStudyConfig, job_dir, plan

# method -> (objective, T, K, reference: "base" / "teacher" / None, trained on replay records)
SPEC = {
    "teacher": ("sft", 1, 4, None, False),
    "sft": ("sft", 1, 9, None, False),
    "sft_kl": ("sft_kl", 1, 9, "base", False),
    "distill": ("distill", 1, 9, "teacher", False),
    "anchored": ("anchored", 3, 3, "teacher", False),
    "anchored_replay": ("anchored", 3, 3, "teacher", True),
    "sft_replay": ("sft", 1, 9, None, True),
    "asft": ("asft", 1, 9, "base", False),
}


def _paths(tmp_path, **contents):
    files = {"train": '{"prompt": "a b", "response": "b a"}\n', "heldout": '{"prompt": "c d", "response": "d c"}\n',
             "general_eval": '{"prompt": "hi", "response": "hello"}\n', "replay": '{"prompt": "yo", "response": "hey"}\n'}
    files.update(contents)
    paths = {"base": str(tmp_path / "base"), "hf": str(tmp_path / "hf"), "base_digest": contents.get("base_digest", "gguf-1")}
    for name, text in files.items():
        if name == "base_digest":
            continue
        path = tmp_path / f"{name}-{abs(hash(text))}.jsonl"
        path.write_text(text)
        paths[name] = str(path)
    return paths


def test_every_method_gets_its_objective_budget_reference_and_data(tmp_path):
    cfg = RealStudyConfig(output_dir=str(tmp_path / "study"), seed=2)
    paths = _paths(tmp_path)
    jobs = {job.name: job for job in plan(cfg, paths)}
    assert list(jobs) == list(SPEC) + ["wise_ft_r0.5"]
    for name, (objective, T, K, reference, replay) in SPEC.items():
        run = jobs[name].run
        anchor = run["anchor"]
        assert (anchor["objective"], anchor["outer_iterations"], anchor["epochs_per_iteration"]) == (objective, T, K), name
        expected_reference = {None: None, "base": paths["base"], "teacher": job_dir(cfg, "teacher")}[reference]
        assert run["reference"]["checkpoint"] == expected_reference, name
        assert run["student"]["checkpoint"] == paths["base"] and run["seed"] == 2
        assert ("replay_paths" in run["data"]) == replay, name
        if objective == "anchored":
            assert (anchor["alpha"], anchor["source"]) == (0.5, "snapshot")
        # One checkpoint and one evaluation per epoch of 64 examples at 8 per step.
        assert run["train"]["save_interval"] == 8 and run["eval"]["interval"] == 8
        # A run config the trainer accepts as it stands.
        validate_run(build(RunConfig, json.loads(json.dumps(run))), world_size=1)
    wise = jobs["wise_ft_r0.5"]
    assert wise.merge == {"finetuned": "sft", "ratio": 0.5} and not wise.every_epoch


def _keys(tmp_path, sub, cfg_options=None, **contents):
    root = tmp_path / sub
    root.mkdir()
    cfg = RealStudyConfig(output_dir=str(root / "study"), **(cfg_options or {}))
    return {job.name: job.key for job in plan(cfg, _paths(root, **contents))}


def test_a_key_changes_exactly_when_something_the_job_reads_changes(tmp_path):
    keys = _keys(tmp_path, "a")
    assert len(set(keys.values())) == len(keys)
    # Another directory, the same contents: every job is reused.
    assert _keys(tmp_path, "b") == keys
    replay = _keys(tmp_path, "c", replay='{"prompt": "yo", "response": "hey there"}\n')
    assert {n for n in keys if replay[n] != keys[n]} == {"anchored_replay", "sft_replay"}
    teacher = _keys(tmp_path, "d", {"teacher_epochs": 3})
    assert {n for n in keys if teacher[n] != keys[n]} == {"teacher", "distill", "anchored", "anchored_replay"}
    seed = _keys(tmp_path, "e", {"seed": 1})
    assert all(seed[n] != keys[n] for n in keys)
    base = _keys(tmp_path, "f", base_digest="gguf-2")
    assert all(base[n] != keys[n] for n in keys)
    gold = _keys(tmp_path, "g", train='{"prompt": "a b c", "response": "c b a"}\n')
    assert all(gold[n] != keys[n] for n in keys)


@pytest.mark.parametrize("options, message", [
    ({"train_examples": 60}, "train_examples=60 is not a multiple of global_batch_size=8"),
    ({"methods": ("sft", "lora")}, "methods: unknown ['lora']"),
    ({"methods": ("anchored", "wise_ft_r0.5")}, "wise_ft_r0.5 merges the base with the final sft checkpoint"),
    ({"outer_iterations": 0}, "outer_iterations must be an integer >= 1"),
])
def test_a_bad_study_setting_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RealStudyConfig(output_dir="unused", **options).validate()
