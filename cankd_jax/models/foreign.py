"""Flax Linen models this project did not write, as students' backbones and as teachers of `train.py`.

`ForeignBackbone` calls the model with its own conventions (the keyword of its training flag and whether it means
training or `deterministic`, NHWC or NCHW input, extra keywords) and returns the features named by module path
inside it (`cankd_jax.models.recorder`), as our own backbones return theirs:

    teacher = dict(name="foreign", factory="cankd_jax.models.foreign:transformers_module",
                   factory_kwargs=dict(model="FlaxResNetModel", config=dict(hidden_sizes=[64, 128, 256, 512])),
                   train_arg="deterministic", train_inverted=True,
                   features={"layer4": "encoder/stages/3"}, random_init=True)
    student = dict(name="fcn", backbone="foreign", backbone_kwargs=dict(factory=..., features={"layer4": ...,
                   "layer3": ...}), head_channels=64, aux_channels=32)

`factory` is `"package.module:callable"`, called with `factory_kwargs`, returning the Linen module. Its variables
live under `module` (`params/module/...`); a checkpoint of them is an Orbax directory written by
`save_foreign_variables` (e.g. from a `transformers` model's `from_pretrained(...).params`).

Features are taken inside one call, directly (no extra collection), so a feature must not come from inside a
lifted transform of the foreign model (`nn.scan`, `nn.remat`): there JAX reports a leaked tracer; record the
module that wraps the transform instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.models.recorder import FeaturePath, _Interceptor, _path, resolve

Array = jax.Array
LAYOUTS = ("NHWC", "NCHW")


def import_object(spec: str) -> Any:
    """`"package.module:attribute"` -> the attribute, with an error naming what is missing."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"factory {spec!r} must be 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"factory {spec!r}: cannot import {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"factory {spec!r}: module {module_name!r} has no {attr!r}") from None


def build_module(factory: str, factory_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The Linen module `factory(**factory_kwargs)` returns."""
    module = import_object(factory)(**dict(factory_kwargs or {}))
    if not isinstance(module, nn.Module):
        raise ValueError(f"factory {factory!r} returned a {type(module).__name__}, not a flax.linen.Module")
    return module


def transformers_module(model: str, config: Optional[Mapping[str, Any]] = None, dtype: str = "float32") -> nn.Module:
    """The Linen module of a Hugging Face `transformers` Flax model class (e.g. `FlaxResNetModel`), built from its
    configuration class with `config`'s fields (random weights; pretrained ones through `save_foreign_variables`).
    `transformers` 4.x: version 5 has no Flax models."""
    try:
        import transformers
    except ImportError:
        raise ValueError("transformers_module needs `pip install transformers==4.57.6` (4.x has the Flax "
                         "models)") from None
    cls = getattr(transformers, model, None)
    if cls is None or not hasattr(cls, "module_class"):
        raise ValueError(f"transformers {transformers.__version__} has no Flax model {model!r}")
    return cls.module_class(config=cls.config_class(**dict(config or {})), dtype=jnp.dtype(dtype))


class ForeignBackbone(nn.Module):
    """A foreign Linen `module` returning `{name: feature}` for `features` (name -> module path inside `module`).

    `__call__(images (B, H, W, 3), *, train) -> dict`: each feature as the module at that path makes it (for an
    image model usually `(B, h, w, C)`), plus `output` when the module itself returns an array. `train_arg`: the
    keyword of the module's training flag, `train_inverted` when it means the opposite (`deterministic`);
    `input_layout`: what the module takes ('NCHW' transposes the images); `call_kwargs`: further keywords.
    Paths are relative to `module`, as `module_paths(module, ...)` lists them.
    """

    module: nn.Module
    features: Mapping[str, str] = dataclasses.field(default_factory=dict)
    train_arg: str = "train"
    train_inverted: bool = False
    input_layout: str = "NHWC"
    call_kwargs: Optional[Mapping[str, Any]] = None

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> dict[str, Array]:
        chex.assert_rank(images, 4)
        if self.input_layout not in LAYOUTS:
            raise ValueError(f"input_layout {self.input_layout!r}: choose one of {', '.join(LAYOUTS)}")
        x = jnp.transpose(images, (0, 3, 1, 2)) if self.input_layout == "NCHW" else images
        specs = [dataclasses.replace(FeaturePath.parse(path), name=name) for name, path in self.features.items()]
        prefix = f"{_path(self)}/module/".lstrip("/")
        taken: dict[tuple[str, str], list[Any]] = {}

        def take(module: nn.Module, path: str, kind: str, value: Any) -> None:
            if path.startswith(prefix):
                taken.setdefault((path[len(prefix):], kind), []).append(value)

        seen = _Interceptor(take)
        flag = {self.train_arg: (not train) if self.train_inverted else train}
        with nn.intercept_methods(seen):
            out = self.module(x, **flag, **dict(self.call_kwargs or {}))
        calls = [p[len(prefix):] for p in seen.calls if p.startswith(prefix)]
        where = resolve(specs, calls)
        result = {"output": out} if isinstance(out, jax.Array) else {}
        for spec in specs:
            path, call = where[spec.name]
            value = taken[path, spec.kind][call]
            if not isinstance(value, jax.Array):
                raise ValueError(f"feature {spec.name!r}: module {path!r} gives a {type(value).__name__}, "
                                 "not an array; record one of its submodules")
            result[spec.name] = value
        return result


def make_foreign(factory: str, features: Optional[Mapping[str, str]] = None, *,
                 factory_kwargs: Optional[Mapping[str, Any]] = None, **options: Any) -> ForeignBackbone:
    """A `ForeignBackbone` from a config's fields (`factory`, `factory_kwargs`, `features`, and its options).

    A teacher may leave `features` out and have its distillation terms name module paths (`module/...`)."""
    unknown = sorted(set(options) - {"train_arg", "train_inverted", "input_layout", "call_kwargs"})
    if unknown:
        raise ValueError(f"foreign network has no option(s) {', '.join(unknown)}; its options are factory, "
                         "factory_kwargs, features, train_arg, train_inverted, input_layout, call_kwargs")
    module = build_module(factory, factory_kwargs)
    _check_call_arguments(module, [options.get("train_arg", "train"), *dict(options.get("call_kwargs") or {})])
    return ForeignBackbone(module, dict(features or {}), **options)


def _check_call_arguments(module: nn.Module, names: list[str]) -> None:
    """A `ValueError` when the module's `__call__` takes none of some keyword in `names` (checked now, not as a
    TypeError from inside the first trace); a `**kwargs` call takes any."""
    try:
        parameters = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):  # no signature to read: the call itself will say
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [n for n in names if n not in parameters]
    if unknown:
        raise ValueError(f"foreign module {type(module).__name__}'s __call__ takes no argument(s) "
                         f"{', '.join(unknown)} (its arguments: {', '.join(parameters)}); set train_arg and "
                         "call_kwargs to names it takes")


def save_foreign_variables(directory: str, variables: Mapping[str, Any]) -> None:
    """Write a foreign model's own variables (`{'params': ..., 'batch_stats': ...}`, or bare params) as the Orbax
    directory a `ForeignBackbone` teacher's `checkpoint` reads (each collection under `module`)."""
    import orbax.checkpoint as ocp

    variables = dict(variables)
    if "params" not in variables:
        variables = {"params": variables}
    tree = {c: {"module": jax.tree.map(lambda a: jax.device_get(a), v)} for c, v in variables.items()}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), tree, force=True)
    checkpointer.wait_until_finished()
