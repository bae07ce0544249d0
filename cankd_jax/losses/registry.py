"""Losses chosen by name, so a config names a loss instead of a code path."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn

from cankd_jax.losses.at import ATLoss
from cankd_jax.losses.cankd import CanKDAlignLoss, CanKDLoss, SelfNonLocalLoss
from cankd_jax.losses.cwd import CWDLoss
from cankd_jax.losses.fitnet import L2Loss
from cankd_jax.losses.in_mse import INMSELoss
from cankd_jax.losses.mgd import MGDLoss
from cankd_jax.losses.pkd import PKDLoss

LOSSES: dict[str, type[nn.Module]] = {
    "cankd": CanKDLoss,
    "cankd_align": CanKDAlignLoss,
    "nonlocal_self": SelfNonLocalLoss,
    "fitnet": L2Loss,
    "l2": L2Loss,
    "pkd": PKDLoss,
    "mgd": MGDLoss,
    "cwd": CWDLoss,
    "at": ATLoss,
    "in_mse": INMSELoss,
}

_MODULE_FIELDS = {"parent", "name"}


def loss_fields(name: str) -> tuple[str, ...]:
    """The keyword arguments `make_loss(name, ...)` accepts."""
    cls = _lookup(name)
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _MODULE_FIELDS)


def make_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a distillation loss by registry name, e.g. `make_loss('cankd', in_channels=256, loss_weight=10)`.

    Every loss is called as `loss.apply(variables, student, teacher, train=...)`
    on NHWC maps and returns a float32 scalar. Unknown names and unknown or
    misspelt options raise a `ValueError` that lists the valid ones.
    """
    cls = _lookup(name)
    allowed = loss_fields(name)
    unknown = sorted(set(kwargs) - set(allowed) - {"name"})
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {', '.join(unknown)}; its options are {', '.join(allowed)}")
    required = [f.name for f in dataclasses.fields(cls) if f.name not in _MODULE_FIELDS
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in kwargs]
    if missing:
        raise ValueError(f"loss {name!r} needs option(s) {', '.join(missing)}")
    for field in dataclasses.fields(cls):  # a number given as text ('10' from a hand-written dict) or a bool
        default, value = field.default, kwargs.get(field.name)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and field.name in kwargs and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                                 or not math.isfinite(value)):
            raise ValueError(f"loss {name!r}: option {field.name} must be a finite number, got {value!r}")
    return cls(**kwargs)


def _lookup(name: str) -> type[nn.Module]:
    try:
        return LOSSES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}") from None
