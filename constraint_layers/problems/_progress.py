"""An optional progress bar (private): tqdm when it is installed and asked for, else nothing."""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Any

__all__ = ["Progress"]


@lru_cache(maxsize=1)
def _tqdm() -> Any:
    if importlib.util.find_spec("tqdm") is None:
        return None
    try:
        return importlib.import_module("tqdm.auto").tqdm
    except ImportError:  # a broken install: no bar, never an error
        return None


class Progress:
    """A counter that drives a tqdm bar when ``enabled`` and tqdm is importable.

    Use as a context manager and call :meth:`update` with the amount of work done.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        bar = _tqdm() if enabled else None
        self._bar = bar(total=total, desc=desc, leave=False) if bar is not None else None

    def update(self, amount: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
