"""Per-step records: metrics.jsonl, TensorBoard scalars with the same names, a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for anything that is not one of our records."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def keep_records_up_to(path: str, step: int) -> None:
    """Drop the records after ``step`` from ``path``: a run that died after its last checkpoint
    logged steps the resumed run logs again, and the file holds one record per step.

    A torn last line (the process died mid-write) goes too; any other line that is not a record
    is kept as it is. The file is rewritten through a temporary file and a rename, so a crash
    here leaves either the old or the new file, never a half-written one.
    """
    if not os.path.exists(path):
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    dropped = 0
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for line in src:
            record_step = _record_step(line)
            if not line.endswith("\n") or (record_step is not None and record_step > step):
                dropped += 1
                continue
            dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    if dropped:
        os.replace(tmp, path)
    else:
        os.remove(tmp)


class MetricsLog:
    """Writes on the logging rank only; every other rank gets a no-op instance.

    ``message`` prints a line (above the bar when there is one) from creation on; the records,
    TensorBoard and the bar begin with ``start``, once the step the run starts from is known.
    """

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, progress_bar: bool):
        self.enabled = enabled
        self._dir = output_dir
        self._tensorboard = tensorboard
        self._progress_bar = progress_bar
        self._file = None
        self._writer = None
        self._bar = None

    def start(self, step: int, total_steps: int) -> None:
        """Continue from ``step`` (0 for a fresh run): later records of an earlier attempt are
        dropped from metrics.jsonl and TensorBoard, and the bar starts at ``step``."""
        if not self.enabled:
            return
        os.makedirs(self._dir, exist_ok=True)
        path = os.path.join(self._dir, METRICS_FILE)
        keep_records_up_to(path, step)
        self._file = open(path, "a", encoding="utf-8")
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier attempt's events from this step on.
            self._writer = SummaryWriter(os.path.join(self._dir, "tensorboard"), purge_step=step + 1)
        if self._progress_bar:
            from tqdm import tqdm

            # disable=None: a bar on a terminal only; redirected output gets the log lines alone.
            self._bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)

    def log(self, record: dict, line: str | None) -> None:
        """Record every step; print ``line`` when given (the trainer thins it by log_interval)."""
        if not self.enabled:
            return
        self._write(record, scalar_prefix="")
        if self._bar is not None:
            self._bar.update(1)
            if self._bar.n >= self._bar.total:
                # Closed now, so that its last frame shows the rate of the steps alone and the
                # final save and summary print below it (not a second, slower 100% frame).
                self._bar.close()
                self._bar = None
        if line is not None:
            self.message(line)

    def log_eval(self, record: dict, line: str) -> None:
        """An evaluation's record (its "step" is the step it followed), TensorBoard scalars under
        ``eval/`` and ``line``; the progress bar does not move."""
        if not self.enabled:
            return
        self._write(record, scalar_prefix="eval/")
        self.message(line)

    def _write(self, record: dict, scalar_prefix: str) -> None:
        """One line of metrics.jsonl and a TensorBoard scalar per number (non-finite ones as null)."""
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(scalar_prefix + name, value, record["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
