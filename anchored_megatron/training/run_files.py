"""What a run leaves next to its checkpoints for people: ``config.yaml`` (the resolved config it
ran with) and ``train.log`` (every line the logging rank printed)."""

from __future__ import annotations

import contextlib
import os
import sys

from anchored_megatron.checkpoint.dirs import RUN_CONFIG
from anchored_megatron.platform.files import write_atomically

CONFIG_FILE = RUN_CONFIG
TRAIN_LOG = "train.log"


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def write_run_config(output_dir: str, config: dict) -> str | None:
    """Write ``config`` (a resolved ``RunConfig.to_dict()``) as ``output_dir/config.yaml``.

    A resumed run may change options: the previous file, when it differs, is kept as
    ``config.yaml.<n>`` (1, 2, ... in the order of the starts), so every part of the run's
    history keeps the config it ran with. Returns a line naming the changed keys, or None.
    """
    import yaml

    path = os.path.join(output_dir, CONFIG_FILE)
    text = yaml.safe_dump(config, sort_keys=False)
    config = yaml.safe_load(text)  # compared as YAML reads it back
    note = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            previous = yaml.safe_load(fh)
        if previous == config:
            return None
        number = 1
        while os.path.exists(f"{path}.{number}"):
            number += 1
        os.replace(path, f"{path}.{number}")
        old, new = _flatten(previous if isinstance(previous, dict) else {}), _flatten(config)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        note = f"config changed since the previous start ({', '.join(changed)}); the previous one is kept as {CONFIG_FILE}.{number}"
    write_atomically(path, text)
    return note


class _Tee:
    """A text stream that writes to ``stream`` and appends the same text to ``copy``."""

    def __init__(self, stream, copy):
        self._stream = stream
        self._copy = copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._copy.flush()
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... are the stream's
        return getattr(self._stream, name)


class TrainLog:
    """``output_dir/train.log``, appended across resumes: inside ``copying()`` everything printed
    to stdout also goes there (the trainer's lines, the data summary, ...)."""

    def __init__(self, output_dir: str):
        self._file = open(os.path.join(output_dir, TRAIN_LOG), "a", encoding="utf-8")

    @contextlib.contextmanager
    def copying(self):
        # Wraps whatever stdout is at entry and restores it at exit: nests with any redirection
        # the caller has in place.
        with contextlib.redirect_stdout(_Tee(sys.stdout, self._file)):
            try:
                yield
            finally:
                self._file.flush()

    def close(self) -> None:
        self._file.close()
