"""CanKD loss parameters to and from the official PyTorch `NLKD_IN_Loss` layout.

Official keys (under `prefix`, e.g. a distiller's `distill_losses.loss_s0.`):

    non_local_att.att.theta.{weight,bias}            (Ci, C, 1, 1), (Ci,)   not in 'gaussian'
    non_local_att.att.phi[.0].{weight,bias}          ".0" only with sub_sample
    non_local_att.att.concatination.0.weight         (1, 2Ci, 1, 1)         'concatenation' only
    non_local_att.g[.0].{weight,bias}
    non_local_att.W.0.{weight,bias}                  conv Ci -> C           bn_layer=True
    non_local_att.W.1.{weight,bias,running_mean,running_var,num_batches_tracked}
    non_local_att.W.{weight,bias}                    bare conv              bn_layer=False

With `projection='deform'` (the authors' `DCN_NLKD_Loss`) the same module paths hold mmcv `DeformConv2dPack`s
without bias: `att.theta.weight` (Ci, C, 3, 3) and `att.theta.conv_offset.{weight,bias}` (18, C, 3, 3), (18,);
likewise `att.phi.0`, `g.0`; `W.0.weight` (C, Ci, 1, 1) and `W.0.conv_offset.{weight,bias}` (2, Ci, 1, 1), (2,).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np

from cankd_jax.interop.state_dict import (
    StateDictReader, conv1x1_from_flax, conv1x1_to_flax, conv_from_flax, conv_to_flax,
)
from cankd_jax.losses.cankd import ATTENTIONS, PROJECTIONS, default_inter_channels
from cankd_jax.losses.checks import check_choice

_BLOCK = "non_local_att."


def _torch_names(*, sub_sample: bool, bn_layer: bool, attention: str) -> dict[str, str]:
    """Our conv names in `NonLocalBlock` -> the official module paths (without `non_local_att.`)."""
    pooled = ".0" if sub_sample else ""
    names = {"g": "g" + pooled}
    if attention != "gaussian":
        names.update(theta="att.theta", phi="att.phi" + pooled)
    names["W"] = "W.0" if bn_layer else "W"
    return names


def load_cankd_loss(
    state_dict: Mapping[str, Any],
    *,
    in_channels: int,
    inter_channels: Optional[int] = None,
    sub_sample: bool = True,
    bn_layer: bool = True,
    attention: str = "dot",
    projection: str = "conv",
    prefix: str = "",
    strict: bool = True,
) -> dict[str, Any]:
    """Flax variables `{'params', 'batch_stats'}` for `CanKDLoss` from an official state dict.

    The options must be the ones the PyTorch module was built with (they decide
    which keys exist). Values may be torch tensors or numpy arrays. Missing or
    mis-shaped keys raise a `ValueError` naming them; with `strict`, so do keys
    under `prefix + 'non_local_att.'` that belong to no parameter.
    """
    check_choice(attention, ATTENTIONS, field="attention", loss="load_cankd_loss")
    check_choice(projection, PROJECTIONS, field="projection", loss="load_cankd_loss")
    c, ci = in_channels, inter_channels or default_inter_channels(in_channels)
    rd = StateDictReader(state_dict, prefix + _BLOCK)
    params: dict[str, Any] = {}
    for ours, theirs in _torch_names(sub_sample=sub_sample, bn_layer=bn_layer, attention=attention).items():
        c_in, c_out = (ci, c) if ours == "W" else (c, ci)
        if projection == "deform":
            layer = _load_deform(rd, theirs, c_in, c_out, 1 if ours == "W" else 3)
            if layer is not None:
                params[ours] = layer
            continue
        w = rd.get(f"{theirs}.weight", (c_out, c_in, 1, 1))
        b = rd.get(f"{theirs}.bias", (c_out,))
        if w is not None and b is not None:
            params[ours] = {"kernel": conv1x1_to_flax(w), "bias": b.copy()}
    if attention == "concatenation":
        w = rd.get("att.concatination.0.weight", (1, 2 * ci, 1, 1))
        if w is not None:
            params["concat_project"] = {"kernel": conv1x1_to_flax(w)}
    batch_stats: dict[str, Any] = {}
    if bn_layer:
        bn = {k: rd.get(f"W.1.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")}
        count = rd.get("W.1.num_batches_tracked", ())
        if all(v is not None for v in bn.values()) and count is not None:
            params["W_bn"] = {"scale": bn["weight"].copy(), "bias": bn["bias"].copy()}
            batch_stats["W_bn"] = {
                "mean": np.asarray(bn["running_mean"], np.float32),
                "var": np.asarray(bn["running_var"], np.float32),
                "num_batches_tracked": np.asarray(count, np.int32),
            }
    rd.finish(strict=strict)
    # float32 whatever the file holds (a float64 or integer copy would train in that dtype, or not at all)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    out: dict[str, Any] = {"params": {"non_local_att": params}}
    if batch_stats:
        out["batch_stats"] = {"non_local_att": batch_stats}
    return out


def _load_deform(rd: StateDictReader, theirs: str, c_in: int, c_out: int, k: int) -> Optional[dict[str, Any]]:
    """A `DeformConv2dPack`'s variables: its kernel and `conv_offset` (a k x k conv, or a 1x1 matmul for k = 1)."""
    w = rd.get(f"{theirs}.weight", (c_out, c_in, k, k))
    ow = rd.get(f"{theirs}.conv_offset.weight", (2 * k * k, c_in, k, k))
    ob = rd.get(f"{theirs}.conv_offset.bias", (2 * k * k,))
    if w is None or ow is None or ob is None:
        return None
    offset = conv1x1_to_flax(ow) if k == 1 else conv_to_flax(ow)
    return {"kernel": conv_to_flax(w), "conv_offset": {"kernel": offset, "bias": ob.copy()}}


def _export_deform(layer: Mapping[str, Any], theirs: str) -> dict[str, np.ndarray]:
    offset = np.asarray(layer["conv_offset"]["kernel"])
    return {f"{theirs}.weight": conv_from_flax(np.asarray(layer["kernel"])),
            f"{theirs}.conv_offset.weight": conv1x1_from_flax(offset) if offset.ndim == 2 else conv_from_flax(offset),
            f"{theirs}.conv_offset.bias": np.asarray(layer["conv_offset"]["bias"])}


def export_cankd_loss(
    variables: Mapping[str, Any],
    *,
    sub_sample: bool = True,
    bn_layer: bool = True,
    attention: str = "dot",
    projection: str = "conv",
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """The inverse of `load_cankd_loss`: official keys -> numpy arrays.

    Also maps any pytree shaped like the variables (e.g. gradients) to the
    official names. `num_batches_tracked` is int64, as PyTorch stores it.
    """
    check_choice(attention, ATTENTIONS, field="attention", loss="export_cankd_loss")
    check_choice(projection, PROJECTIONS, field="projection", loss="export_cankd_loss")
    params = variables.get("params", {}).get("non_local_att") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping):
        held = sorted(variables.get("params", {})) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"export_cankd_loss: the variables hold no params/non_local_att (CanKD's attention block; "
                         f"CanKDLoss's variables have it), but {held}")
    names = _torch_names(sub_sample=sub_sample, bn_layer=bn_layer, attention=attention)
    expected = set(names) | ({"concat_project"} if attention == "concatenation" else set()) | (
        {"W_bn"} if bn_layer else set())
    if set(params) != expected:  # else trained parameters left out of the file, or a KeyError
        raise ValueError(f"export_cankd_loss: the variables' modules {sorted(params)} are not those of "
                         f"attention={attention!r}, bn_layer={bn_layer} ({sorted(expected)}): pass the options the "
                         "loss was built with")
    out: dict[str, np.ndarray] = {}
    key = lambda k: prefix + _BLOCK + k  # noqa: E731
    for ours, theirs in names.items():
        if projection == "deform":
            out.update({key(k): v for k, v in _export_deform(params[ours], theirs).items()})
            continue
        out[key(f"{theirs}.weight")] = conv1x1_from_flax(np.asarray(params[ours]["kernel"]))
        out[key(f"{theirs}.bias")] = np.asarray(params[ours]["bias"])
    if attention == "concatenation":
        out[key("att.concatination.0.weight")] = conv1x1_from_flax(np.asarray(params["concat_project"]["kernel"]))
    if bn_layer:
        out[key("W.1.weight")] = np.asarray(params["W_bn"]["scale"])
        out[key("W.1.bias")] = np.asarray(params["W_bn"]["bias"])
        stats = variables.get("batch_stats", {}).get("non_local_att", {}).get("W_bn")
        if stats is not None:
            out[key("W.1.running_mean")] = np.asarray(stats["mean"])
            out[key("W.1.running_var")] = np.asarray(stats["var"])
            out[key("W.1.num_batches_tracked")] = np.asarray(stats["num_batches_tracked"], np.int64)
    return out
