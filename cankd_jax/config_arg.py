"""Config files outside `train.py`, and the argument after ':' in `--config configs/NAME.py:ARG`.

`ARG` is `key=value` pairs joined by ',' (e.g. `head=pspnet,loss=cwd`); a value
that is a list joins its items with '+' (e.g. `loss=cankd+mgd`). Configs use it
for choices that change several fields together, which `--config.key=value`
overrides cannot express one field at a time.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections


def load_config(path: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`, as `--config path:arg` gives it (tests, benchmarks)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"cankd_jax_config_{name}", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse(arg: str, choices: Mapping[str, Sequence[str]], defaults: Mapping[str, Any], *, config: str,
          lists: Sequence[str] = ()) -> dict[str, Any]:
    """`{key: value}` for every key of `choices`, from `arg` over `defaults`.

    Args:
      arg: the text after ':' ('' for none).
      choices: key -> the values it may take.
      defaults: key -> value when `arg` does not set it (a list for `lists` keys).
      config: the config's name, for error messages.
      lists: keys whose value is a '+'-joined list (returned as a list).

    Raises `ValueError` naming the unknown key or value and the valid ones.
    """
    out = {k: (list(v) if k in lists else v) for k, v in defaults.items()}
    given: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, eq, value = item.partition("=")
        if not choices:  # a config without choices still refuses one, rather than ignore what the user meant
            raise ValueError(f"{config} takes no argument after ':', got {item!r}")
        if not eq or key not in choices:
            raise ValueError(f"{config} takes {', '.join(f'{k}=...' for k in choices)} after ':', got {item!r}")
        if key in given:  # the last would win, and the first be dropped without a word
            raise ValueError(f"{config}: {key} is given twice after ':' ({given[key]!r} and {item!r})")
        given[key] = item
        values = [v for v in value.split("+") if v] if key in lists else [value]
        bad = [v for v in values if v not in choices[key]] or ([] if values else ["(empty)"])
        if bad:
            raise ValueError(f"{config}: unknown {key} {', '.join(bad)}; choose from {', '.join(choices[key])}")
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # a list item names a phase or a term: a second one would share its workdir or name
            raise ValueError(f"{config}: {key} names {', '.join(twice)} more than once, in {item!r}")
        out[key] = values if key in lists else values[0]
    return out


def is_count(value: Any, least: int) -> bool:
    """Whether `value` is an integer (not a bool, which Python counts as one) of at least `least`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def check_number(value: Any, what: str, ok: Callable[[float], bool], rule: str) -> float:
    """`value` as a float, or a `ValueError` saying that `what` (a config key) must be `rule` (finite always)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return number
