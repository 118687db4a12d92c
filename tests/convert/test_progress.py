"""Converter progress bars: on terminals only, never in pipes or logs; --no-progress wins."""

import io

from anchored_megatron.convert.progress import progress_bar


class _Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def _drawn(monkeypatch, terminal: bool, enabled: bool = True) -> str:
    stream = _Stream(terminal)
    monkeypatch.setattr("sys.stderr", stream)
    assert list(progress_bar(range(3), "export", "layer", enabled)) == [0, 1, 2]
    return stream.getvalue()


def test_bar_counts_layers_on_a_terminal(monkeypatch):
    assert "export:   0%|          | 0/3 [00:00<?, ?layer/s]" in _drawn(monkeypatch, terminal=True)


def test_no_bar_in_a_pipe_or_with_no_progress(monkeypatch):
    assert _drawn(monkeypatch, terminal=False) == ""
    assert _drawn(monkeypatch, terminal=True, enabled=False) == ""
