"""The demo at a minimal size: every job trains on 2 gloo ranks (TP=2), every checkpoint is
evaluated, the table and plot are well formed, and later runs reuse the cached jobs, also from
the layout of versions that called them stages. The first run is the command a user types
(``python -m anchored_megatron.demo``), in a subprocess, so that its stderr is what the user sees."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table_rows(text, header_start):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.distributed
def test_demo_writes_a_consistent_table_and_plot_and_reuses_jobs(tmp_path):
    from anchored_megatron.demo import TINY, run_demo

    sizes = dict(TINY, methods=("sft", "anchored"))
    command = [sys.executable, "-m", "anchored_megatron.demo", "--tiny", "--methods", "sft", "anchored", "--output-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    demo = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert demo.returncode == 0, demo.stderr
    # Job lines and the closing line only: no warnings, no progress bars (stderr is not a terminal).
    assert not [line for line in demo.stderr.splitlines() if "Warning" in line or "warnings.warn" in line], demo.stderr
    assert "\r" not in demo.stderr
    assert all(re.match(r"\[\w+\] |wrote ", line) for line in demo.stderr.splitlines()), demo.stderr
    out = {"report": str(tmp_path / "results.md"), "plot": str(tmp_path / "tradeoff.png")}
    text = open(out["report"], encoding="utf-8").read()

    rows = _table_rows(text, "| method | epochs")
    header, separator, body = rows[0], rows[1], rows[2:]
    assert all(cell == "---" for cell in separator) and len(separator) == len(header)
    assert all(len(r) == len(header) for r in body)
    assert [r[0] for r in body] == ["teacher (short SFT)", "SFT", "early-stopped SFT", "anchored (snapshot)"]
    assert header[-len(sizes["skills"]):] == [f"deg. {s}" for s in sizes["skills"]]

    # The SFT row against the raw evaluation file, recomputed plainly.
    def point(job, index=-1):
        with open(os.path.join(tmp_path, "jobs", job, "eval.json")) as fh:
            return json.load(fh)["points"][index]

    base, sft = point("base"), point("sft")
    general = lambda p: sum(v for k, v in p["accuracy"].items() if k != "target") / len(sizes["skills"])  # noqa: E731
    sft_row = body[1]
    assert sft_row[1] == str(sizes["outer_iterations"] * sizes["epochs_per_iteration"])
    assert float(sft_row[2]) == pytest.approx(sft["accuracy"]["target"], abs=5e-4)
    assert float(sft_row[5]) == pytest.approx(general(sft), abs=5e-4)
    if general(base) > 0:
        assert float(sft_row[6].rstrip("%")) == pytest.approx(100 * (general(base) - general(sft)) / general(base), abs=0.05)
    # Every budget epoch was evaluated for the methods (eval_every_epochs=1), one point for base and teacher.
    with open(os.path.join(tmp_path, "jobs", "anchored", "eval.json")) as fh:
        epochs = [p["epoch"] for p in json.load(fh)["points"]]
    assert epochs == [1.0, 2.0]
    assert "entropy" in point("base")

    import matplotlib.image

    image = matplotlib.image.imread(out["plot"])
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200

    names = ("base", "teacher", "sft", "anchored")
    stamps = {n: os.path.getmtime(os.path.join(tmp_path, "jobs", n, "job.json")) for n in names}
    again = run_demo(str(tmp_path), sizes, progress_bar=False)
    assert again["table"] in demo.stdout
    assert stamps == {n: os.path.getmtime(os.path.join(tmp_path, "jobs", n, "job.json")) for n in names}

    # A WiSE-FT merge job on the cached base and SFT: merged in this process (nothing retrained),
    # evaluated on the ranks at the SFT run's last step; a second call reuses it.
    merged = run_demo(str(tmp_path), dict(sizes, methods=("sft", "wise_ft_r0.5")), progress_bar=False)
    assert stamps == {n: os.path.getmtime(os.path.join(tmp_path, "jobs", n, "job.json")) for n in names}
    wise = point("wise_ft_r0.5")
    assert len(merged["results"]["wise_ft_r0.5"]["points"]) == 1 and wise["epoch"] == point("sft")["epoch"]
    assert all(0.0 <= v <= 1.0 for v in wise["accuracy"].values())
    stamp = os.path.getmtime(os.path.join(tmp_path, "jobs", "wise_ft_r0.5", "job.json"))
    run_demo(str(tmp_path), dict(sizes, methods=("sft", "wise_ft_r0.5")), progress_bar=False)
    assert os.path.getmtime(os.path.join(tmp_path, "jobs", "wise_ft_r0.5", "job.json")) == stamp

    # The layout written when jobs were called stages: moved, and still reused (renames keep mtimes).
    os.rename(tmp_path / "jobs", tmp_path / "stages")
    for n in names:
        os.rename(tmp_path / "stages" / n / "job.json", tmp_path / "stages" / n / "stage.json")
    from_old_layout = run_demo(str(tmp_path), sizes, progress_bar=False)
    assert from_old_layout["table"] == again["table"]
    assert not os.path.exists(tmp_path / "stages")
    assert stamps == {n: os.path.getmtime(os.path.join(tmp_path, "jobs", n, "job.json")) for n in names}

    # Early points from a prefix job: SFT with a checkpoint every 2 epochs, its epoch 1 evaluated by
    # a re-run stopped there. Both points must be the ones of the run above that kept a checkpoint
    # every epoch; the other jobs' keys are unchanged by the option (nothing else retrained).
    every_epoch = [point("sft", 0), point("sft", 1)]
    early = dict(sizes, methods=("sft",), eval_every_epochs=2, early_eval_epochs=1, early_eval_methods=("sft",))
    folded = run_demo(str(tmp_path), early, progress_bar=False)["results"]
    assert "sft_first1" not in folded and folded["sft"]["early_points_from"] == "sft_first1"
    assert [p["epoch"] for p in folded["sft"]["points"]] == [1.0, 2.0]
    assert [p["accuracy"] for p in folded["sft"]["points"]] == [p["accuracy"] for p in every_epoch]
    assert {n: os.path.getmtime(os.path.join(tmp_path, "jobs", n, "job.json")) for n in ("base", "teacher")} == \
        {n: stamps[n] for n in ("base", "teacher")}
    from anchored_megatron.experiment.jobs import ExperimentConfig
    from anchored_megatron.experiment.runner import prepare_jobs

    def keys(plan_sizes):
        return {j.name: j.key for j in prepare_jobs(ExperimentConfig(output_dir=str(tmp_path), progress_bar=False, **plan_sizes))[0]}

    plain, with_prefix = keys(dict(early, early_eval_epochs=0, early_eval_methods=())), keys(early)
    assert set(with_prefix) - set(plain) == {"sft_first1"} and all(with_prefix[n] == k for n, k in plain.items())


def _metrics(directory, losses):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"step": i + 1, "loss": loss}) + "\n" for i, loss in enumerate(losses))


def test_a_prefix_job_is_folded_only_when_its_losses_are_the_full_runs(tmp_path):
    from anchored_megatron.experiment.jobs import JobSpec
    from anchored_megatron.experiment.runner import fold_prefix_jobs

    full_dir, prefix_dir = str(tmp_path / "sft"), str(tmp_path / "sft_first2")
    jobs = [JobSpec("sft", {"output_dir": full_dir}),
            JobSpec("sft_first2", {"output_dir": prefix_dir}, prefix_of={"name": "sft", "output_dir": full_dir}, stop_after_epochs=2)]
    point = lambda epoch: {"epoch": epoch, "accuracy": {"target": epoch / 10}}  # noqa: E731
    results = {"sft": {"points": [point(3.0), point(6.0)]}, "sft_first2": {"points": [point(1.0), point(2.0)]}}
    _metrics(full_dir, [0.9, 0.7, 0.5, 0.4, 0.3, 0.2])
    _metrics(prefix_dir, [0.9, 0.7])
    folded = fold_prefix_jobs(jobs, results)
    assert list(folded) == ["sft"] and [p["epoch"] for p in folded["sft"]["points"]] == [1.0, 2.0, 3.0, 6.0]
    assert folded["sft"]["early_points_from"] == "sft_first2" and len(results["sft"]["points"]) == 2  # the input untouched
    _metrics(prefix_dir, [0.9, 0.7 + 1e-4])
    with pytest.raises(RuntimeError, match="loss at step 2"):
        fold_prefix_jobs(jobs, results)
    _metrics(prefix_dir, [0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1])
    with pytest.raises(RuntimeError, match="are not all among the steps"):
        fold_prefix_jobs(jobs, results)


def test_early_evaluation_options_are_checked_by_name(tmp_path):
    from anchored_megatron.experiment.jobs import ExperimentConfig

    def refused(**kw):
        with pytest.raises(ValueError) as info:
            ExperimentConfig(output_dir=str(tmp_path), methods=("sft", "anchored", "wise_ft_r0.5"), eval_every_epochs=5, **kw).validate()
        return str(info.value)

    assert "early_eval_epochs must be an integer in [0, eval_every_epochs=5)" in refused(early_eval_epochs=5, early_eval_methods=("sft",))
    assert "early_eval_methods: ['distill', 'wise_ft_r0.5'] are not trained methods" in refused(early_eval_epochs=2, early_eval_methods=("distill", "wise_ft_r0.5"))
    assert "set together" in refused(early_eval_epochs=2)
    assert "set together" in refused(early_eval_methods=("sft",))


def test_experiment_target_step_range_reaches_every_data_set(tmp_path):
    from anchored_megatron.data.synthetic import finetune_records, pretrain_records
    from anchored_megatron.experiment.jobs import ExperimentConfig
    from anchored_megatron.experiment.runner import regime_data

    cfg = ExperimentConfig(output_dir=str(tmp_path), regime="A", skills=("up",), pretrain_per_skill=60, finetune_examples=60,
                           eval_per_skill=5, target_min_steps=1, target_max_steps=2)
    data = regime_data(cfg)
    # A target prompt defines one start value plus one "=" per derived quantity.
    derived = [r["prompt"].count("=") - 1 for r in finetune_records(data, 0)]
    derived += [r["prompt"].count("=") - 1 for r in pretrain_records(data, 0) if not r["prompt"].startswith("up ")]
    assert set(derived) == {1, 2}
