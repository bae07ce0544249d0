"""Command-line value types shared by this folder's scripts: counts and sizes are checked where they are parsed
(`argument --k: must be at least 1, got 0`), not found later as a traceback from inside a timed call, a table of
NaNs, or a case timed with another size than its label says."""

from __future__ import annotations

import argparse
from typing import Callable


def count(least: int = 1) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def positive(text: str) -> float:
    """An argparse `type`: a finite number > 0 (seconds, GB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse `type`: a number in [0, 1] (an IoU threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value
