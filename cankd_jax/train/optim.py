"""Optimizers and learning-rate schedules from config, as the paper's recipes use them.

The chain matches PyTorch's SGD as mmcv drives it: clip the global gradient
norm, add weight decay to the gradient, momentum, learning rate. Parameters
labelled frozen get no update at all (no decay, no momentum), not just a zero
gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import optax

from cankd_jax.config_arg import check_number
from cankd_jax.models.freeze import dotted_key

Schedule = Callable[[Any], Any]


def _warmup(base: float, cfg: ml_collections.ConfigDict, main: Schedule) -> Schedule:
    steps = int(cfg.get("warmup_steps", 0) or 0)
    if steps <= 0:
        return main
    # mmengine's LinearLR(start_factor): the factor climbs linearly to 1 over `steps` iterations.
    ramp = optax.linear_schedule(base * float(cfg.get("warmup_factor", 0.001)), base, steps)
    return optax.join_schedules([ramp, lambda count: main(count + steps)], [steps])


def _floor(base: float, cfg: ml_collections.ConfigDict, default: float) -> float:
    """`optimizer.min_lr` (or `default`), refused above the rate it decays from: the schedule would climb to it."""
    floor = float(cfg.get("min_lr", default))
    if floor > base:
        raise ValueError(f"optimizer.min_lr={floor:g}{'' if 'min_lr' in cfg else ' (the default)'} is above "
                         f"optimizer.lr={base:g}: the {cfg.get('schedule')} schedule would raise the learning rate "
                         "towards it; set optimizer.min_lr <= optimizer.lr")
    return floor


def _poly(base: float, cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    # mmseg PolyLR: (base - eta_min) * (1 - t / T) ** power + eta_min.
    return optax.polynomial_schedule(base, _floor(base, cfg, 1e-4), float(cfg.get("power", 0.9)), total_steps)


def _step(base: float, cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    del total_steps
    boundaries = {int(b): float(cfg.get("decay_factor", 0.1)) for b in cfg.get("boundaries", ())}
    return optax.piecewise_constant_schedule(base, boundaries)


def _constant(base: float, cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    del cfg, total_steps
    return optax.constant_schedule(base)


def _cosine(base: float, cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    alpha = _floor(base, cfg, 0.0) / base if base else 0.0  # a zero rate stays zero
    return optax.cosine_decay_schedule(base, total_steps, alpha=alpha)


SCHEDULES = {"poly": _poly, "step": _step, "constant": _constant, "cosine": _cosine}

# optimizer.<key>: (what it must be, the test). A negative rate, decay or clip norm trains uphill without a word
# (`optax.clip_by_global_norm(-1)` turns every gradient around), so each is refused before anything runs.
_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": ("a finite number >= 0", lambda v: v >= 0),
    "weight_decay": ("a finite number >= 0", lambda v: v >= 0),
    "grad_clip_norm": ("a finite number >= 0 (0 or None: no clipping)", lambda v: v >= 0),
    "momentum": ("a finite number in [0, 1)", lambda v: 0 <= v < 1),
    "b1": ("a finite number in [0, 1)", lambda v: 0 <= v < 1),
    "b2": ("a finite number in [0, 1)", lambda v: 0 <= v < 1),
    "min_lr": ("a finite number >= 0", lambda v: v >= 0),
    "power": ("a finite number >= 0", lambda v: v >= 0),
    "decay_factor": ("a finite number >= 0", lambda v: v >= 0),
    "warmup_factor": ("a finite number in [0, 1]", lambda v: 0 <= v <= 1),
    "warmup_steps": ("a finite number >= 0", lambda v: v >= 0),
}


def check_values(cfg: ml_collections.ConfigDict) -> None:
    """Raise `ValueError` naming the first `optimizer.<key>` that is not a finite number in its range."""
    for key, (rule, ok) in _RANGES.items():
        if cfg.get(key, None) is not None:
            check_number(cfg[key], f"optimizer.{key}", ok, rule)


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    """Learning rate as a function of the step. `cfg`: the config's `optimizer` block."""
    check_values(cfg)
    name = cfg.get("schedule", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown optimizer.schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    base = float(cfg.lr)
    return _warmup(base, cfg, SCHEDULES[name](base, cfg, total_steps))


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, frozen_labels: Optional[Any] = None
) -> tuple[optax.GradientTransformation, Schedule]:
    """`(tx, schedule)` from the `optimizer` config block.

    Fields: `name` ('sgd' | 'adamw'), `lr`, `momentum` (sgd), `b1`/`b2` (adamw),
    `weight_decay` (on every trainable parameter, BN and loss parameters
    included, as the paper's mmcv recipes), `grad_clip_norm` (global norm; 0 or
    None: off), `schedule` + its fields (`power`, `min_lr`, `boundaries`,
    `decay_factor`, `warmup_steps`, `warmup_factor`), `lr_mult` (mmengine's `paramwise_cfg.custom_keys` with
    `lr_mult`: `{'backbone': 0.1}` scales the learning rate of every student parameter whose dotted name contains
    'backbone', the longest matching key winning, as mmengine matches them).

    `frozen_labels`: optional pytree like the params with 'trainable'/'frozen'
    leaves; frozen leaves get `optax.set_to_zero()`.
    """
    schedule = make_schedule(cfg, total_steps)
    name = cfg.get("name", "sgd")
    wd = float(cfg.get("weight_decay", 0.0) or 0.0)
    parts = []
    clip = cfg.get("grad_clip_norm", None)
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    if name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd))
        momentum = float(cfg.get("momentum", 0.9) or 0.0)
        if momentum:
            parts.append(optax.trace(decay=momentum, nesterov=bool(cfg.get("nesterov", False))))
        parts.append(optax.scale_by_learning_rate(schedule))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)), weight_decay=wd))
    else:
        raise ValueError(f"unknown optimizer.name {name!r}; choose one of adamw, sgd")
    lr_mult = dict(cfg.get("lr_mult", None) or {})
    if lr_mult:
        parts.append(scale_by_name(lr_mult))
    tx = optax.chain(*parts)
    if frozen_labels is not None:
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, frozen_labels)
    return tx, schedule


def lr_multiplier(name: str, lr_mult: Mapping[str, float]) -> float:
    """The learning-rate factor of the student parameter `name` (dotted, e.g. 'backbone.layer1.0.conv1.kernel'):
    that of the longest key of `lr_mult` it contains, else 1 (mmengine's `custom_keys` rule)."""
    for key in sorted(lr_mult, key=len, reverse=True):
        if key in name:
            return float(lr_mult[key])
    return 1.0


def scale_by_name(lr_mult: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each student parameter's update by `lr_multiplier` of its name (the last step of the chain, so
    it scales the learning rate and the decoupled weight decay together, as a PyTorch parameter group's lr
    does). Parameters outside `params['student']` (the distillation terms') keep factor 1."""
    bad = {k: v for k, v in lr_mult.items() if not isinstance(v, (int, float)) or v < 0}
    if bad:
        raise ValueError(f"optimizer.lr_mult maps name fragments to non-negative factors; got {bad}")

    def factor(path) -> float:
        name = dotted_key(path)
        return lr_multiplier(name[len("student."):], lr_mult) if name.startswith("student.") else 1.0

    def scaled(path, u):
        f = factor(path)
        return u if f == 1.0 else u * f

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(scaled, updates), state

    def init(params):
        # Frozen parameters arrive as optax.MaskedNode (no leaves) under multi_transform: a key that names only
        # frozen ones is as valid as in mmengine, so they count as leaves here.
        leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
        names = [n[len("student."):] for n in (dotted_key(path) for path, _ in leaves) if n.startswith("student.")]
        unused = sorted(k for k in lr_mult if not any(k in n for n in names))
        if names and unused:  # a misspelt fragment would leave its parameters at factor 1 without a word
            raise ValueError(f"optimizer.lr_mult key(s) {unused} match no student parameter (names look like "
                             f"{names[0]!r}); a key scales every parameter whose dotted name contains it")
        return optax.EmptyState()

    return optax.GradientTransformation(init, update)
