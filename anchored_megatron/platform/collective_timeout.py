"""One line instead of a backend traceback when a collective times out: the step, the phase of
the step, the option that set the limit.

gloo (torch 2.13) raises a plain RuntimeError on the rank that waited: "Timed out waiting Nms
for recv operation to complete" from the collective that timed out, then "Application timeout
caused pair closure" from any later one on the same pair. NCCL raises nothing in Python: its
watchdog aborts the process after the timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING, which torchrun
sets), logging the collective's type and sequence number itself.
"""

from __future__ import annotations

import contextlib

_GLOO_TIMEOUTS = ("Timed out waiting", "Application timeout caused pair closure")


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time on this rank; the message names the step and phase."""


def is_timeout(exc: BaseException) -> bool:
    """Also when the timeout is the cause of what was raised (a checkpoint save wraps the ranks'
    errors in a CheckpointException, a BaseException)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if any(text in str(exc) for text in _GLOO_TIMEOUTS):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class Watch:
    """Where a rank is (``step``, ``phase``), for the message when a collective times out there."""

    def __init__(self, option: str, minutes: float):
        self.option, self.minutes = option, minutes
        self.step: int | None = None
        self.phase = "start-up"

    def message(self) -> str:
        where = "at start-up" if self.step is None else f"step {self.step}"
        return (f"{where}: a collective did not complete within {self.option}={self.minutes:g} (in {self.phase}); "
                "the run stops; resume from latest")

    @contextlib.contextmanager
    def reporting(self):
        """Turns a backend's timeout raised inside the block into CollectiveTimeout."""
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            if not is_timeout(exc):
                raise
            raise CollectiveTimeout(self.message()) from exc
