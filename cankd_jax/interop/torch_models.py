"""Networks in and out of PyTorch state dicts: torchvision, mmsegmentation and mmdetection layouts.

Our networks name their submodules as the PyTorch ones (`layer1.0.conv1`,
`backbone.stem.3`, `neck.fpn_convs.4.conv`, `decode_head.image_pool.1.bn`), so
one generic converter serves every network: it traces the model once (no
compute, `jax.eval_shape`) to learn which Flax layer owns each variable, and
maps each to its PyTorch key and layout:

| Flax layer            | Flax leaf                        | PyTorch key         | layout change                    |
|-----------------------|----------------------------------|---------------------|----------------------------------|
| `nn.Conv`             | `kernel (kh, kw, I/g, O)`, `bias`| `weight`, `bias`    | `(O, I/g, kh, kw)`               |
| `Conv1x1`             | `kernel (I, O)`, `bias`          | `weight`, `bias`    | `(O, I, 1, 1)`                   |
| `DeformConv2d` & co.  | `kernel (kh, kw, I/g, O)`, `bias`| `weight`, `bias`    | `(O, I/g, kh, kw)`               |
| `nn.Dense`            | `kernel (I, O)`, `bias`          | `weight`, `bias`    | `(O, I)`                         |
| `BatchNorm`           | `scale`, `bias`; `mean`, `var`,  | `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked` | none |
|                       | `num_batches_tracked`            |                     |                                  |
| `nn.GroupNorm`        | `scale`, `bias`                  | `weight`, `bias`    | none                             |
| `Scale` (mmcv's)      | `scale ()`                       | `scale` (0-d)       | none                             |
| `nn.Embed`            | `embedding (N, C)`               | `weight`            | none                             |
| `TorchMultiheadAttention` | `in_proj_weight (3C, C)`, `in_proj_bias` | the same | none                         |

So `ResNet` reads torchvision's keys, `MobileNetV2` and `Segmenter` mmseg's
(`backbone.*`, `decode_head.*`, `auxiliary_head.*`), `RetinaNet` / `FCOS` a
whole mmdet checkpoint (`backbone.*`, `neck.*`, `bbox_head.*`), and
`DetectionTrunk` only the `backbone.*` and `neck.*` keys of any mmdet
detector's (its `checkpoint_prefixes()`; the rest is reported as `ignored`).
`key_prefixes` re-roots keys for other pairings (an ImageNet backbone into a
segmenter, a teacher's neck and head into a student). torch is imported only
to read or write `.pth` files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickletools
import re
import threading
import zipfile
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.interop.state_dict import (  # _abbrev: the same key-list format as StateDictReader's errors
    StateDictReader,
    _abbrev,
    conv1x1_from_flax,
    conv1x1_to_flax,
    conv_from_flax,
    conv_to_flax,
    require_torch,
    to_numpy,
)
from cankd_jax.layers import BatchNorm, Conv1x1
from cankd_jax.models.deform_conv import DeformConv2d
from cankd_jax.models.dense_heads import Scale
from cankd_jax.models.detr_layers import TorchMultiheadAttention
from cankd_jax.models.dino import DINO
from cankd_jax.models.reppoints import RepPointsHead
from cankd_jax.models.resnet import ResNet
from cankd_jax.models.swin import WindowMSA

PyTree = Any
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one variable kind converts: Flax shape -> PyTorch shape, and the array both ways."""

    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_flax: Callable[[np.ndarray], np.ndarray]
    from_flax: Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


_KINDS: dict[str, _Kind] = {
    "conv": _Kind(lambda s: (s[3], s[2], s[0], s[1]), conv_to_flax, conv_from_flax),
    "conv1x1": _Kind(lambda s: (s[1], s[0], 1, 1), conv1x1_to_flax, conv1x1_from_flax),
    "linear": _Kind(lambda s: (s[1], s[0]), lambda w: np.ascontiguousarray(w.T), lambda k: np.ascontiguousarray(k.T)),
    "same": _Kind(tuple, _same, _same),
}

# Per Flax layer type: (collection, Flax leaf) -> (PyTorch leaf, kind), in the order PyTorch lists a layer's keys.
_LAYER_RULES: tuple[tuple[type, dict[tuple[str, str], tuple[str, str]]], ...] = (
    (nn.Conv, {("params", "kernel"): ("weight", "conv"), ("params", "bias"): ("bias", "same")}),
    (Conv1x1, {("params", "kernel"): ("weight", "conv1x1"), ("params", "bias"): ("bias", "same")}),
    # mmcv's deformable convs (and their packs, whose `conv_offset` is an `nn.Conv` / `Conv1x1` of its own)
    (DeformConv2d, {("params", "kernel"): ("weight", "conv"), ("params", "bias"): ("bias", "same")}),
    (nn.Dense, {("params", "kernel"): ("weight", "linear"), ("params", "bias"): ("bias", "same")}),
    (BatchNorm, {("params", "scale"): ("weight", "same"), ("params", "bias"): ("bias", "same"),
                 ("batch_stats", "mean"): ("running_mean", "same"), ("batch_stats", "var"): ("running_var", "same"),
                 ("batch_stats", "num_batches_tracked"): ("num_batches_tracked", "same")}),
    (nn.GroupNorm, {("params", "scale"): ("weight", "same"), ("params", "bias"): ("bias", "same")}),
    (nn.LayerNorm, {("params", "scale"): ("weight", "same"), ("params", "bias"): ("bias", "same")}),
    (WindowMSA, {("params", "relative_position_bias_table"): ("relative_position_bias_table", "same")}),
    (Scale, {("params", "scale"): ("scale", "same")}),
    (RepPointsHead, {("params", "moment_transfer"): ("moment_transfer", "same")}),  # the head's own parameter
    (nn.Embed, {("params", "embedding"): ("weight", "same")}),
    # torch.nn.MultiheadAttention's packed projection, kept in PyTorch's (3C, C) layout
    (TorchMultiheadAttention, {("params", "in_proj_weight"): ("in_proj_weight", "same"),
                               ("params", "in_proj_bias"): ("in_proj_bias", "same")}),
    (DINO, {("params", "level_embed"): ("level_embed", "same")}),
)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One model variable: where it lives in the Flax variables and how PyTorch stores it."""

    collection: str
    path: tuple[str, ...]  # inside the collection: module path + Flax leaf name
    kind: str
    shape: tuple[int, ...]  # Flax shape
    dtype: Any

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(_KINDS[self.kind].torch_shape(self.shape))

    @property
    def is_counter(self) -> bool:
        return self.path[-1] == "num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What an import did, by model key: `loaded` from the checkpoint, `missing` (kept from
    `init_variables`); checkpoint keys under the read prefixes left `unexpected` (unused), and
    checkpoint keys under none of them `ignored` (never looked at, e.g. a detector's `bbox_head.*`
    when a trunk reads only `backbone.*` and `neck.*`)."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()  # checkpoint keys of another shape, skipped (`skip_mismatched=True`)

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} keys; missing {len(self.missing)}; unexpected {len(self.unexpected)}; "
                f"ignored {len(self.ignored)}; skipped for their shape {len(self.mismatched)}")


def default_sample(model: nn.Module) -> jax.ShapeDtypeStruct:
    """A `(1, 64, 64, C)` image spec for tracing `model`; C from the model's (or its backbone's) `in_channels`."""
    owner = getattr(model, "backbone", model)
    return jax.ShapeDtypeStruct((1, 64, 64, getattr(owner, "in_channels", 3)), jnp.float32)


def _rules_for(layer_type: type) -> Optional[dict]:
    for cls, rules in _LAYER_RULES:
        if issubclass(layer_type, cls):
            return rules
    return None


def _trace(model: nn.Module, sample: Any) -> tuple[dict[tuple[str, ...], type], dict, dict[str, np.ndarray]]:
    """(each layer's path -> its type, in the order layers run; the abstract variables; PyTorch's constant
    buffers by key): one `jax.eval_shape` of `model.init` with the layers' `__call__`s intercepted."""
    owners: dict[tuple[str, ...], type] = {}
    buffers: dict[str, np.ndarray] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = tuple(context.module.path)
            if path not in owners:
                owners[path] = type(context.module)
                method = getattr(context.module, "torch_buffers", None)
                for leaf, value in (method() if callable(method) else {}).items():
                    buffers[".".join(path + (leaf,))] = value
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        abstract = jax.eval_shape(lambda s: model.init(jax.random.key(0), s, train=False), sample)
    return owners, abstract, buffers


def state_dict_layout(model: nn.Module, *, sample: Any = None) -> dict[str, Slot]:
    """PyTorch key -> `Slot` for every variable of `model`, layers in the order they run.

    `sample`: the model's first call argument, as arrays or `jax.ShapeDtypeStruct`s
    (default `default_sample(model)`; pass one for models that do not take
    images, e.g. an `FPN` takes a list of maps). Only shapes matter; nothing is
    computed.
    """
    return _layout_and_buffers(model, sample)[0]


def _sharing(model: nn.Module) -> tuple[int, ...]:
    """Which submodule fields hold one instance: Flax modules compare by their fields' values, so `M(a=d, b=d)`
    (one shared layer, one set of parameters) equals `M(a=Dense(3), b=Dense(3))` (two); this tells them apart.
    Each module met walking the fields gives -1 the first time, the order it was first met after."""
    seen: dict[int, int] = {}
    out: list[int] = []

    def visit(x: Any) -> None:
        if isinstance(x, nn.Module):
            if id(x) in seen:
                out.append(seen[id(x)])
                return
            seen[id(x)] = len(seen)
            out.append(-1)
            for field in dataclasses.fields(x):
                if field.name not in ("parent", "name"):
                    visit(getattr(x, field.name, None))
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)

    visit(model)
    return tuple(out)


def _cache_key(model: nn.Module, sample: Any) -> Optional[tuple]:
    """A hashable key of (model, its sharing of submodules, the sample's structure, shapes and dtypes), or None
    when there is none: a bound module, or one with an unhashable field."""
    if model.scope is not None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(sample)
    try:
        key = (model, _sharing(model), treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves))
        hash(key)
    except (TypeError, AttributeError):
        return None
    return key


_LAYOUTS: dict[tuple, tuple[dict[str, Slot], dict[str, np.ndarray]]] = {}
_LAYOUTS_KEPT = 16  # the most recently used traces: an export after an import of the same network traces it once
_LAYOUTS_LOCK = threading.Lock()


def _layout_and_buffers(model: nn.Module, sample: Any) -> tuple[dict[str, Slot], dict[str, np.ndarray]]:
    """`state_dict_layout` and `torch_buffers` from one trace (a ResNet-101 takes seconds to trace, so the last
    few networks' are kept; the caller gets its own copies)."""
    sample = default_sample(model) if sample is None else sample
    key = _cache_key(model, sample)
    with _LAYOUTS_LOCK:
        found = _LAYOUTS.pop(key, None) if key is not None else None
        if found is not None:
            _LAYOUTS[key] = found  # now the most recent
    if found is None:
        found = _trace_layout(model, sample)
        if key is not None:
            with _LAYOUTS_LOCK:
                _LAYOUTS[key] = found
                while len(_LAYOUTS) > _LAYOUTS_KEPT:
                    _LAYOUTS.pop(next(iter(_LAYOUTS)))
    layout, buffers = found
    return dict(layout), {k: np.array(v, copy=True) for k, v in buffers.items()}


def _trace_layout(model: nn.Module, sample: Any) -> tuple[dict[str, Slot], dict[str, np.ndarray]]:
    owners, abstract, buffers = _trace(model, sample)
    order = {path: i for i, path in enumerate(owners)}
    entries = []
    for collection, tree in abstract.items():
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(str(k.key) for k in keypath)
            module, leaf_name = names[:-1], names[-1]
            rules = _rules_for(owners.get(module, type(None)))
            rule = rules.get((collection, leaf_name)) if rules else None
            if rule is None:
                raise TypeError(f"no PyTorch mapping for {collection} variable {'/'.join(names)!r} of layer "
                                f"{owners.get(module, type(None)).__name__}")
            torch_leaf, kind = rule
            rank = list(rules).index((collection, leaf_name))
            key = ".".join(module + (torch_leaf,))
            entries.append(((order[module], rank), key, Slot(collection, names, kind, tuple(leaf.shape), leaf.dtype)))
    return {key: slot for _, key, slot in sorted(entries, key=lambda e: e[0])}, buffers


def torch_buffers(model: nn.Module, *, sample: Any = None) -> dict[str, np.ndarray]:
    """PyTorch key -> value of the constant buffers the PyTorch model keeps in its state dict but which are
    no variables here, since they follow from the configuration (Swin's `relative_position_index`):
    `import_state_dict` checks a checkpoint's against them, `export_state_dict` writes them."""
    return _layout_and_buffers(model, sample)[1]


def default_key_prefixes(model: nn.Module) -> dict[str, str]:
    """The key prefixes `import_state_dict` uses when given none: the model's `checkpoint_prefixes()`
    (a `DetectionTrunk` reads `backbone.*` and `neck.*`), else `{'': ''}` (every key, same names)."""
    method = getattr(model, "checkpoint_prefixes", None)
    return dict(method()) if callable(method) else {"": ""}


def _checkpoint_key(model_key: str, key_prefixes: Mapping[str, str]) -> Optional[str]:
    # The longest matching model prefix decides; keys under no prefix are not read.
    best = max((p for p in key_prefixes if model_key.startswith(p)), key=len, default=None)
    return None if best is None else key_prefixes[best] + model_key[len(best):]


def _get(tree: Mapping, path: tuple[str, ...], what: str) -> Any:
    node = tree
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            raise KeyError(f"{what} has no variable {'/'.join(path)!r}")
        node = node[name]
    return node


def _get_slot(tree: Mapping, slot: Slot, what: str, model: nn.Module) -> Any:
    """`tree`'s value for `slot`, which must have the model's shape: variables of another network (another class
    count, width or input channels) are named, not exported or kept with the wrong shape."""
    path = (slot.collection,) + slot.path
    value = _get(tree, path, what)
    if tuple(np.shape(value)) != tuple(slot.shape):
        raise ValueError(f"{what} {'/'.join(path)} has shape {tuple(np.shape(value))}, but this "
                         f"{type(model).__name__}'s is {tuple(slot.shape)}: variables of another network?")
    return value


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def import_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    key_prefixes: Optional[Mapping[str, str]] = None,
    strict: bool = True,
    init_variables: Optional[PyTree] = None,
    sample: Any = None,
    skip_mismatched: bool = False,
) -> tuple[dict, LoadReport]:
    """Flax variables `{'params', 'batch_stats'}` for `model` from a PyTorch state dict.

    Args:
      state_dict: key -> torch tensor or numpy array (e.g. `load_pth(path)`).
      key_prefixes: model-key prefix -> checkpoint-key prefix; model keys under
        no listed prefix are not read, checkpoint keys under no listed
        checkpoint prefix are not looked at (reported as `ignored`). Default:
        `default_key_prefixes(model)`, i.e. `{'': ''}` (same keys) except for a
        `DetectionTrunk`, which reads `{'backbone.': 'backbone.', 'neck.':
        'neck.'}` out of a whole detector checkpoint. Examples:
        `{'': 'backbone.'}` reads a `ResNet` out of an mmseg/mmdet checkpoint;
        `{'backbone.': ''}` reads torchvision ImageNet weights into a
        segmenter's backbone (with `strict=False`); `{'neck.': 'neck.',
        'decode_head.': 'decode_head.'}` takes only a teacher's neck and head.
      strict: every model key must be found, and no checkpoint key under the
        listed checkpoint prefixes may go unused; otherwise a `ValueError`
        names them. With `strict=False` unused keys are only reported and
        missing variables keep their values from `init_variables`.
      init_variables: the variables missing keys keep (a partial load).
      sample: the model's first call argument, see `state_dict_layout`.

      skip_mismatched: a checkpoint key whose shape differs from the model's
        is skipped (the variable keeps its `init_variables` value; the key is
        reported in `mismatched`, the model key in `missing`), as mmengine's non-strict loader does, e.g.
        a class-agnostic teacher box regressor (4 outputs) into a
        class-specific student's (320); needs `strict=False`.

    Otherwise shape mismatches raise; every problem is listed in one `ValueError`,
    each key by name (and shapes where they differ). A missing
    `num_batches_tracked` (checkpoints from before PyTorch 0.4.1) reads as 0, as
    PyTorch itself loads it.

    Returns: `(variables, report)`.
    """
    if skip_mismatched and strict:
        raise ValueError("import_state_dict: skip_mismatched=True is a partial load; pass strict=False with it")
    layout, buffers = _layout_and_buffers(model, sample)
    key_prefixes = default_key_prefixes(model) if key_prefixes is None else dict(key_prefixes)
    reader = StateDictReader(state_dict)
    variables: dict = {}
    loaded, missing, misshaped, skipped = [], [], [], []
    for key, slot in layout.items():
        where = (slot.collection,) + slot.path
        source = _checkpoint_key(key, key_prefixes)
        if source is not None and slot.is_counter and not reader.has(source):
            _put(variables, where, jnp.zeros(slot.shape, slot.dtype))
            continue
        if source is None or not reader.has(source):
            missing.append(key if source is None or source == key else f"{source} (model key {key})")
            if init_variables is not None:
                _put(variables, where, _get_slot(init_variables, slot, "init_variables", model))
            continue
        found = tuple(np.shape(to_numpy(state_dict[source])))
        if found != slot.torch_shape:
            (skipped if skip_mismatched else misshaped).append(f"{source} {found} (expected {slot.torch_shape})")
            reader.mark_used([source])
            if skip_mismatched:  # kept from init_variables, as a missing key is
                missing.append(key)
                if init_variables is not None:
                    _put(variables, where, _get_slot(init_variables, slot, "init_variables", model))
            continue
        value = _KINDS[slot.kind].to_flax(reader.get(source, slot.torch_shape)).astype(slot.dtype)
        _put(variables, where, jnp.asarray(value))
        loaded.append(key)
    changed = []
    for key, value in buffers.items():
        source = _checkpoint_key(key, key_prefixes)
        if source is not None and reader.has(source):
            reader.mark_used([source])
            found = to_numpy(state_dict[source])
            if found.shape != value.shape or not np.array_equal(found, value):
                changed.append(source)
    unexpected = sorted({k for p in set(key_prefixes.values()) for k in reader.unused(p)})
    read_prefixes = tuple(set(key_prefixes.values()))
    ignored = sorted(k for k in state_dict if not k.startswith(read_prefixes))
    problems = []
    if changed:
        problems.append(f"constant buffers other than this configuration's (another window size?): {_abbrev(changed)}")
    if misshaped:
        problems.append(f"keys with other shapes: {_abbrev(misshaped)}")
    if missing and (strict or init_variables is None):
        problems.append(f"missing keys: {_abbrev(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_abbrev(unexpected)}")
    if problems:
        hint = ""
        if not strict and missing and init_variables is None:
            hint = " (a partial load keeps missing variables from init_variables=, which was not given)"
        raise ValueError(f"state dict does not match {type(model).__name__}{hint}; " + "; ".join(problems))
    return variables, LoadReport(tuple(loaded), tuple(missing), tuple(unexpected), tuple(ignored), tuple(skipped))


def export_state_dict(
    model: nn.Module,
    variables: PyTree,
    *,
    key_prefix: str = "",
    tensors: bool = False,
    sample: Any = None,
) -> dict[str, Any]:
    """The PyTorch state dict of `model` with `variables`, in the layout `import_state_dict` reads.

    Floating variables come out as float32, `num_batches_tracked` as int64
    (PyTorch's dtypes), as numpy arrays or (`tensors=True`) torch tensors.
    `key_prefix` is prepended to every key (e.g. 'backbone.').
    """
    out: dict[str, Any] = {}
    layout, buffers = _layout_and_buffers(model, sample)
    for key, slot in layout.items():
        value = np.asarray(jax.device_get(_get_slot(variables, slot, "variables", model)))
        value = _KINDS[slot.kind].from_flax(value).astype(np.int64 if slot.is_counter else np.float32)
        out[key_prefix + key] = value
    out.update({key_prefix + key: value for key, value in buffers.items()})
    return _as_tensors(out) if tensors else out


def _as_tensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    torch = require_torch()
    # np.array(order="C") and not np.ascontiguousarray: the latter turns 0-d counters into shape (1,).
    return {k: v if hasattr(v, "detach") else torch.from_numpy(np.array(to_numpy(v), order="C"))
            for k, v in state_dict.items()}


# --- files ----------------------------------------------------------------------------------------------


class _ForeignMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:  # the pickle calls the stand-in (REDUCE): itself again
        return cls


class _Foreign(metaclass=_ForeignMeta):
    """What each pickled object beside the weights (mmengine's `HistoryBuffer` in `message_hub`, numpy's arrays
    and scalars, the functions their states name) becomes when read without running its code: this class itself,
    whatever it is called with, created from (NEWOBJ) or given as state, so that an object built from another's
    result is one too."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls

    @staticmethod
    def __setstate__(state: Any) -> None:  # the pickle sets state on the class itself (BUILD): kept nowhere
        pass


# The allowlist entries that stand `_Foreign` in for each foreign name. BUILD on `_Foreign` checks its type, the
# metaclass, against the allowlist: it is listed under a name with a newline, which no pickled name can have.
_FOREIGN_META_ENTRY = (_ForeignMeta, "cankd_jax\nnot a pickled name")


def _unpickling_reason(e: BaseException) -> str:
    """torch's refusal in one plain line: the unpickler's own reason, without its advice or terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", text)
    reason = found.group(1) if found else (text.strip().splitlines() or [type(e).__name__])[0]
    return reason.strip().rstrip(".")


def _refused_names(torch: Any, path: str) -> list[str]:
    """The classes and functions (`module.qualname`) that the pickle in a `torch.save` file names and
    `weights_only=True` does not allow: read from the pickle's opcodes, nothing run."""
    if zipfile.is_zipfile(path):  # torch >= 1.6
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    names = set()
    with open(path, "rb") as f:  # the legacy format: five pickles (magic number, protocol, system info, the
        # object, its storages' keys)
        for _ in range(5):
            names.update(arg.replace(" ", ".") for op, arg, _ in pickletools.genops(f) if op.name == "GLOBAL")
    try:  # torch's default allowlist (no public accessor; without it every name gets a stand-in, which the
        # defaults still take precedence over: only the log's list of skipped objects grows)
        from torch._weights_only_unpickler import _get_allowed_globals  # noqa: PLC0415

        names -= set(_get_allowed_globals())
    except ImportError:
        pass
    return sorted(names)


def _load_weights_only(torch: Any, path: str) -> tuple[Any, list[str]]:
    """`(object, foreign)`: `torch.load(path, weights_only=True)`, where the pickled objects beside the tensors
    that its unpickler refuses (their classes and functions: `foreign`) are read as the inert `_Foreign`. Nothing
    in the file runs: the restricted unpickler still decides every opcode, and the foreign names only ever reach
    `_Foreign`. A training checkpoint of mmengine's runner (not a published one) is read this way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except Exception as e:  # torch raises several exception types for the same refusal
        try:
            foreign = _refused_names(torch, path)
            if foreign:
                # numpy's own constructors are stood in for too: given a pickle's dtype state, numpy builds
                # object arrays over raw pointers (torch leaves numpy off its allowlist for that reason).
                # torch's allowlist is process-wide for the `with`: a load in another thread meanwhile may meet
                # the same inert stand-ins, nothing more.
                allow = [(_Foreign, name) for name in foreign] + [_FOREIGN_META_ENTRY]
                with torch.serialization.safe_globals(allow):
                    return torch.load(path, map_location="cpu", weights_only=True), foreign
        except Exception:  # a pickled dict subclass (the unpickler fills in only dicts), ...
            pass
        raise e


def load_pth(path: str, *, weights_only: bool = True) -> dict[str, Any]:
    """The state dict in a `.pth` file (torch tensors, on CPU).

    mmcv/mmengine checkpoints (`{'state_dict': ..., 'meta': ...}`) and
    `{'model': ...}` wrappers are unwrapped; a plain state dict (torchvision) is
    returned as is. `weights_only=True` runs no code from the file: objects
    beside the weights (a training checkpoint's message hub, optimizer and
    scheduler states) are skipped unread, and a file it still cannot read is
    an error naming why. Pass False only for files you trust.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} not found")
    with open(path, "rb") as f:
        head = f.read(2)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save: a zip archive (before 1.6: a pickle)
        raise ValueError(f"{path!r} is not a PyTorch checkpoint: torch.save writes a zip archive or a pickle, and this "
                         f"file starts with {head!r}")
    torch = require_torch()
    foreign: list[str] = []
    if not weights_only:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            obj, foreign = _load_weights_only(torch, path)
        except Exception as e:
            raise ValueError(
                f"cannot read {path!r} without running code from it: {_unpickling_reason(e)}. If you trust the "
                "file, save its weights alone with PyTorch (torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], new_path)) and read that") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors), "
                         f"but a {type(obj).__name__}")
    other = [k for k in obj if not isinstance(k, str)]
    if other:
        raise ValueError(f"{path!r} does not hold a state dict: its keys are not all names, e.g. {other[0]!r} "
                         f"({type(other[0]).__name__})")
    unread = sorted(k for k, v in obj.items() if any(leaf is _Foreign for leaf in jax.tree.leaves(v)))
    if unread:
        raise ValueError(f"{path!r}: the state dict holds pickled objects, not tensors, under {_abbrev(unread)} "
                         f"(of the classes or functions {', '.join(foreign)})")
    if foreign:
        log.info("%s: skipped the pickled objects beside the weights (%s), unread", path, ", ".join(foreign))
    return dict(obj)


def save_pth(state_dict: Mapping[str, Any], path: str, *, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write a state dict as torch tensors, mmcv's way (`{'state_dict': ..., 'meta': meta}`) when `meta` is
    given, else plain (what torchvision's `load_state_dict(torch.load(path))` expects)."""
    torch = require_torch()
    tensors = _as_tensors(state_dict)
    torch.save(tensors if meta is None else {"state_dict": tensors, "meta": dict(meta)}, path)


def load_checkpoint(
    path: str,
    model: nn.Module,
    *,
    key_prefixes: Optional[Mapping[str, str]] = None,
    strict: bool = True,
    init_variables: Optional[PyTree] = None,
    weights_only: bool = True,
    sample: Any = None,
    skip_mismatched: bool = False,
) -> tuple[dict, LoadReport]:
    """`import_state_dict(model, load_pth(path), ...)`: an mmseg / mmdet / torchvision `.pth` into `model`.

    E.g. mmseg's `pspnet_r101-d8` checkpoint into `make_model('pspnet',
    backbone='resnet101_v1c_d8', num_classes=19)`, mmdet's RetinaNet checkpoint
    into `make_model('retinanet', backbone='resnet50', num_classes=80)`, or its
    backbone and neck alone into `make_model('retinanet_fpn',
    backbone='resnet50')` (strict on those; its `bbox_head.*` keys come back in
    `report.ignored`).
    """
    return import_state_dict(model, load_pth(path, weights_only=weights_only), key_prefixes=key_prefixes,
                             strict=strict, init_variables=init_variables, sample=sample,
                             skip_mismatched=skip_mismatched)


# --- conveniences ---------------------------------------------------------------------------------------


def load_resnet(
    state_dict: Mapping[str, Any], *, depth: int, key_prefix: str = "", strict: bool = True, **fields: Any
) -> tuple[ResNet, dict]:
    """A `ResNet(depth=depth, **fields)` and its variables from torchvision-style keys.

    `key_prefix`: where the ResNet's keys start in `state_dict` ('' for
    torchvision, 'backbone.' for an mmseg/mmdet checkpoint). Unless given,
    `num_classes` is read from `fc.weight` (absent: a backbone) and
    `deep_stem` from the presence of `stem.0.weight`.
    """
    if "num_classes" not in fields:
        fc = state_dict.get(key_prefix + "fc.weight")
        fields["num_classes"] = None if fc is None else int(to_numpy(fc).shape[0])
    fields.setdefault("deep_stem", key_prefix + "stem.0.weight" in state_dict)
    model = ResNet(depth=depth, **fields)
    variables, _ = import_state_dict(model, state_dict, key_prefixes={"": key_prefix}, strict=strict)
    return model, variables


def swin_release_to_mmdet(state_dict: Mapping[str, Any], *, key_prefix: str = "backbone.") -> dict[str, np.ndarray]:
    """The original Swin release's ImageNet keys (`layers.0.blocks.1.attn.qkv.weight`, `patch_embed.proj`,
    `mlp.fc1`, ...) as mmdet's `SwinTransformer` names them, the map mmdet's `swin_converter` applies.

    Patch merging's `downsample.reduction` / `downsample.norm` are reordered from the release's
    concatenation of the four 2x2 neighbours (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2],
    each C channels) to `nn.Unfold`'s channel-major order (see `cankd_jax.models.swin`). The
    classifier (`head.*`) and the final `norm.*` have no place in the backbone and are left out, as are the
    release's `attn_mask` and `relative_position_index` buffers (recomputed). Keys come out under
    `key_prefix`.
    """
    def unfold_order(v: np.ndarray) -> np.ndarray:
        # (..., 4 C) in neighbour-major order (row-major: (0,0), (1,0), (0,1), (1,1)) -> (..., C, 2 rows, 2 cols).
        lead, c = v.shape[:-1], v.shape[-1] // 4
        v = v.reshape(*lead, 2, 2, c)  # (column, row, channel)
        return np.ascontiguousarray(np.moveaxis(v, (-3, -2, -1), (-1, -2, -3))).reshape(*lead, 4 * c)

    renames = (("attn.", "attn.w_msa."), ("mlp.fc1.", "ffn.layers.0.0."), ("mlp.fc2.", "ffn.layers.1."))
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        v = to_numpy(value)
        if key.startswith(("head.", "norm.")) or key.endswith(("attn_mask", "relative_position_index")):
            continue
        if key.startswith("layers."):
            key = "stages." + key[len("layers."):]
            for old, new in renames:
                key = key.replace(old, new)
            if ".downsample.reduction." in key or ".downsample.norm." in key:
                v = unfold_order(v)
        elif key.startswith("patch_embed.proj."):
            key = "patch_embed.projection." + key[len("patch_embed.proj."):]
        out[key_prefix + key] = v
    return out


def is_swin_release(state_dict: Mapping[str, Any]) -> bool:
    """Whether `state_dict` holds the original Swin release's keys (`patch_embed.proj.*`, `layers.N.blocks.*`)."""
    return "patch_embed.proj.weight" in state_dict and any(k.startswith("layers.0.blocks.") for k in state_dict)


def to_mmdet_keys(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """`state_dict` with keys as mmdet names them: a Swin release checkpoint converted (`swin_release_to_mmdet`,
    as mmdet's `convert_weights=True`), any other returned as it is."""
    if is_swin_release(state_dict):
        log.info("Swin release checkpoint: keys converted to mmdet's (swin_converter)")
        return swin_release_to_mmdet(state_dict, key_prefix="")
    return state_dict


def prefix_pairs(value: Any, key: str) -> Optional[dict[str, str]]:
    """A config's key-prefix mapping (`{model prefix: file prefix}` or a list of such pairs) as a dict, None
    when unset; a `ValueError` naming `key` for anything else (a bare string, a pair of three)."""
    if not value:
        return None
    items = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(items, str) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in items):
        raise ValueError(f"{key} must be a list of (model prefix, checkpoint prefix) pairs, e.g. [('', 'module.')]; "
                         f"got {value!r}")
    return dict(items)


def load_pytorch_network(path: str, model: nn.Module, cfg: Optional[Mapping[str, Any]] = None) -> dict:
    """A complete network's variables from a `.pth` (strict); for a config's `teacher.checkpoint`.

    `cfg` (the network's config block) may give `checkpoint_prefixes`, a
    `key_prefixes` mapping (see `import_state_dict`).
    """
    prefixes = prefix_pairs(cfg.get("checkpoint_prefixes") if cfg is not None else None, "checkpoint_prefixes")
    state = load_pth(path)
    try:
        variables, report = import_state_dict(model, state, key_prefixes=prefixes)
    except ValueError as e:
        if "missing keys" not in str(e):
            raise
        # Which keys the file does hold tells a DDP 'module.' prefix or another network apart.
        raise ValueError(f"{e}; the file's keys look like {', '.join(sorted(state)[:3])} (map them with "
                         "checkpoint_prefixes, [(model prefix, file prefix), ...])") from None
    if report.ignored:
        log.info("%s: %d checkpoint keys not read by %s (%s)", path, len(report.ignored), type(model).__name__,
                 _abbrev(list(report.ignored), limit=5))
    return variables


def export_pytorch_network(model: nn.Module, variables: PyTree, path: str) -> None:
    """Write `model`'s variables to `path` as a PyTorch state dict in mmcv's checkpoint format."""
    save_pth(export_state_dict(model, variables), path, meta={"exported_by": "cankd_jax", "model": type(model).__name__})
