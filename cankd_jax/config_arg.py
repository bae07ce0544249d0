"""The argument after ':' in `--config configs/NAME.py:ARG`, as big_vision configs take it.

`ARG` is `key=value` pairs joined by ',' (e.g. `head=pspnet,loss=cwd`); a value
that is a list joins its items with '+' (e.g. `loss=cankd+mgd`). Configs use it
for choices that change several fields together, which `--config.key=value`
overrides cannot express one field at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in choices:
            raise ValueError(f"{config} takes {', '.join(f'{k}=...' for k in choices)} after ':', got {item!r}")
        values = [v for v in value.split("+") if v] if key in lists else [value]
        bad = [v for v in values if v not in choices[key]] or ([] if values else ["(empty)"])
        if bad:
            raise ValueError(f"{config}: unknown {key} {', '.join(bad)}; choose from {', '.join(choices[key])}")
        out[key] = values if key in lists else values[0]
    return out
