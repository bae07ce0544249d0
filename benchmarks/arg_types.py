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


def _number(text: str, ok: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):  # NaN fails every range
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive(text: str) -> float:
    """An argparse `type`: a finite number > 0 (seconds, GB)."""
    return _number(text, lambda v: 0 < v < float("inf"), "a positive number")


def fraction(text: str) -> float:
    """An argparse `type`: a number in [0, 1] (an IoU threshold)."""
    return _number(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")
