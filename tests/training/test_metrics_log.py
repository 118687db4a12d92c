"""metrics.jsonl after a resume, and the progress bar: one record per step, a bar on terminals only,
starting at the step the run continues from."""

import io
import json

from anchored_megatron.training.metrics_log import MetricsLog, keep_records_up_to


def _write(path, lines):
    path.write_text("".join(lines))


def test_resume_drops_the_records_after_the_checkpoint_step_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7)]
    foreign = "# a note someone added\n"
    _write(path, records[:2] + [foreign] + records[2:] + ['{"step": 7, "lo'])
    keep_records_up_to(str(path), 3)
    assert path.read_text() == "".join(records[:2]) + foreign + records[2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_a_fresh_start_empties_the_file_and_an_untouched_file_is_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [json.dumps({"step": 1}) + "\n"])
    before = path.stat().st_ino
    keep_records_up_to(str(path), 1)
    assert path.stat().st_ino == before
    keep_records_up_to(str(path), 0)
    assert path.read_text() == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _logged_run(tmp_path, monkeypatch, stderr, first_step, total, progress_bar=True):
    monkeypatch.setattr("sys.stderr", stderr)
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    log = MetricsLog(str(tmp_path), enabled=True, tensorboard=False, progress_bar=progress_bar)
    log.start(first_step, total)
    for step in range(first_step + 1, total + 1):
        log.log({"step": step, "loss": 1.0}, f"step {step}")
    log.message("summary")
    log.close()
    return stdout.getvalue()


def test_bar_on_a_terminal_starts_at_the_resumed_step_and_ends_before_the_summary(tmp_path, monkeypatch):
    terminal = _Terminal()
    printed = _logged_run(tmp_path, monkeypatch, terminal, first_step=8, total=12)
    frames = [f for f in terminal.getvalue().split("\r") if f.strip()]
    assert " 8/12 " in frames[0]
    assert "12/12" in frames[-1] and frames[-1].endswith("\n")
    assert printed.splitlines() == ["step 9", "step 10", "step 11", "step 12", "summary"]


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    redirected = io.StringIO()
    printed = _logged_run(tmp_path, monkeypatch, redirected, first_step=0, total=3)
    assert redirected.getvalue() == ""
    assert printed.splitlines() == ["step 1", "step 2", "step 3", "summary"]
