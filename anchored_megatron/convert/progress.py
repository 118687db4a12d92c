"""Progress bars for the converters: shown on terminals only, never in logs or pipes."""

from __future__ import annotations


def progress_bar(items, description: str, unit: str, enabled: bool = True):
    """``items`` with a bar on a terminal (tqdm's ``disable=None``); ``enabled=False``
    (``--no-progress``) keeps it off everywhere."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit=unit, leave=False, disable=None)
