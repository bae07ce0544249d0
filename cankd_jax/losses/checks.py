"""Input checks shared by every distillation loss.

Shapes are static under `jax.jit`, so these run once at trace time and turn a
mistake into a `ValueError` that names it, instead of an XLA shape error.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def check_rank4(x: jax.Array, *, what: str, loss: str) -> None:
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{loss}: the {what} feature must be an array (B, H, W, C), got a {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{loss}: the {what} feature must be NHWC (B, H, W, C), got shape {tuple(x.shape)} (rank {x.ndim})")


def check_feature_pair(
    student: jax.Array,
    teacher: jax.Array,
    *,
    loss: str,
    in_channels: Optional[int] = None,
    same_channels: bool = True,
    same_spatial: bool = True,
    channels_field: str = "in_channels",
) -> None:
    """Validate a (student, teacher) pair of NHWC feature maps.

    Args:
      loss: the loss's name, to start every message with.
      in_channels: if given, the channel count both maps must have; `channels_field` is the loss's name for it.
      same_channels / same_spatial: which parts of the shapes must agree (the
        batch size always must).
    """
    check_rank4(student, what="student", loss=loss)
    check_rank4(teacher, what="teacher", loss=loss)
    for what, x in (("student", student), ("teacher", teacher)):  # feature maps, not labels or indices
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{loss}: the {what} feature must be floating point, got {x.dtype} (labels or indices "
                             "instead of a feature map?)")
    s, t = tuple(student.shape), tuple(teacher.shape)
    if s[0] != t[0]:
        raise ValueError(f"{loss}: student batch {s[0]} != teacher batch {t[0]} (shapes {s} and {t})")
    if same_spatial and s[1:3] != t[1:3]:
        raise ValueError(
            f"{loss}: student spatial size {s[1:3]} != teacher spatial size {t[1:3]} (shapes {s} and {t}); "
            "pick features of the same stride or resize one of them first"
        )
    if same_channels and s[3] != t[3]:
        raise ValueError(
            f"{loss}: student shape {s} != teacher shape {t}: only the channels differ ({s[3]} vs {t[3]}); "
            f"lift the student with a Connector(out_channels={t[3]}) first"
        )
    if in_channels is not None and t[3] != in_channels:
        raise ValueError(f"{loss}: the features have {t[3]} channels but the loss was built with {channels_field}="
                         f"{in_channels}")


def check_choice(value: str, choices, *, field: str, loss: str) -> None:
    if value not in choices:
        raise ValueError(f"{loss}: unknown {field} {value!r}; choose one of {', '.join(sorted(choices))}")
