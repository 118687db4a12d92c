"""A progress bar that stays quiet in tests and when stderr is not a terminal-like stream."""

from __future__ import annotations


def progress_bar(items, description: str, enabled: bool = True):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="tensor", leave=False)
