"""Per-step records: metrics.jsonl, TensorBoard scalars with the same names, a progress bar."""

from __future__ import annotations

import json
import math
import os


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Writes on the logging rank only; every other rank gets a no-op instance."""

    def __init__(self, output_dir: str, enabled: bool, total_steps: int, initial_step: int, tensorboard: bool, progress_bar: bool):
        self.enabled = enabled
        self._file = None
        self._writer = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        # Appending keeps the records of a run that was resumed; a resumed step is logged again.
        self._file = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict, line: str | None) -> None:
        """Record every step; print ``line`` when given (the trainer thins it by log_interval)."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(name, value, record["step"])
        if self._bar is not None:
            self._bar.update(1)
        if line is not None:
            self.message(line)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
