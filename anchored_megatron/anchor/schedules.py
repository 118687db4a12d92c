"""Anchor strength schedules over the outer (snapshot) iterations.

The paper keeps alpha constant; the authors' code also ramps it up across outer
iterations (a small first step, larger ones once the student is close to the
anchor). Both are pure functions of the iteration index so that a resumed run
gets the same alpha without any saved state.
"""

from __future__ import annotations

ALPHA_SCHEDULES = ("constant", "linear")


def _check_alpha(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def alpha_at(iteration: int, num_iterations: int, start: float, end: float | None = None, kind: str = "constant") -> float:
    """Alpha for outer iteration ``iteration`` (0-based) of ``num_iterations``.

    ``constant``: always ``start`` (``end`` is ignored).
    ``linear``: ``start`` at the first iteration, ``end`` at the last, evenly spaced
    in between; a single iteration uses ``start``.
    """
    if kind not in ALPHA_SCHEDULES:
        raise ValueError(f"kind must be one of {ALPHA_SCHEDULES}, got {kind!r}")
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"num_iterations must be an integer >= 1, got {num_iterations!r}")
    if not isinstance(iteration, int) or not 0 <= iteration < num_iterations:
        raise ValueError(f"iteration must be an integer in [0, {num_iterations}), got {iteration!r}")
    _check_alpha("start", start)
    if kind == "constant":
        return float(start)
    if end is None:
        raise ValueError("end is required for kind='linear', got None")
    _check_alpha("end", end)
    if num_iterations == 1:
        return float(start)
    fraction = iteration / (num_iterations - 1)
    return float(start) + (float(end) - float(start)) * fraction
