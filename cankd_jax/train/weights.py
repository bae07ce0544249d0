"""Initial weights of a run: the teacher's (a checkpoint, or random only when asked) and the student's pretrained ones."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh

from cankd_jax.interop import torch as torch_interop
from cankd_jax.train.distributed import ProcessesDisagree
from cankd_jax.train.sharding import ParamLayout, tree_shardings
from cankd_jax.train.state import run_once

PyTree = Any
log = logging.getLogger(__name__)


def check_teacher_source(cfg: ml_collections.ConfigDict) -> None:
    """Refuse a teacher without weights unless `random_init` asks for one; name the config key to set.

    Called before any data is read, so a forgotten `--config.teacher.checkpoint`
    fails in a second, not after a data set has been opened.
    """
    path = cfg.get("checkpoint", "")
    if not path:
        if not cfg.get("random_init", False):
            raise ValueError("teacher.checkpoint is empty, so the teacher would be randomly initialised; set "
                             "--config.teacher.checkpoint to a trained teacher (an export/ directory of a teacher "
                             "run, or an mmseg/mmdet/torchvision .pth), or --config.teacher.random_init=True to "
                             "distil from a random teacher on purpose")
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} not found; set --config.teacher.checkpoint to a "
                                "trained teacher (an export/ directory of a teacher run, or a PyTorch .pth)")


def load_teacher(cfg: ml_collections.ConfigDict, teacher: nn.Module, sample: jax.Array, *, seed: int, mesh: Mesh,
                 layout: ParamLayout) -> tuple[PyTree, PyTree]:
    """`(variables, shardings)` of the teacher, placed on `mesh` in `layout` (replicated, or spread by FSDP).

    From `cfg.checkpoint` (our export dir, restored straight into its shardings,
    or an mmseg/mmdet/torchvision .pth), or random when `cfg.random_init`.
    """
    check_teacher_source(cfg)
    abstract = jax.eval_shape(lambda: teacher.init(jax.random.key(0), sample, train=False))
    shardings = tree_shardings(abstract, mesh, layout)
    path = cfg.get("checkpoint", "")
    if not path:
        # One compiled init (eagerly, every initialiser would compile on its own), in its shardings.
        key = jax.random.key(seed + 1_000_003)
        return run_once(lambda: teacher.init(key, sample, train=False), out_shardings=shardings), shardings
    if os.path.isdir(path):
        return _restore_export(os.path.abspath(path), abstract, shardings), shardings
    variables = torch_interop.load_pytorch_network(path, teacher, cfg)  # every process reads the same file
    return place(variables, shardings), shardings


def place(host: PyTree, shardings: PyTree, what: str = "teacher's weights", key: str = "teacher.checkpoint") -> PyTree:
    """`jax.device_put` of host arrays that every process read for itself. In a multi-process job JAX compares
    them across processes; arrays that differ (hosts that read different files) are a `ProcessesDisagree` on every
    process, naming the key, instead of an AssertionError that prints both arrays whole."""
    try:
        return jax.device_put(host, shardings)
    except AssertionError as e:
        if "is not the same on each process" not in str(e):
            raise
        raise ProcessesDisagree(f"the {what} differ between processes (JAX's check of device_put): every host must "
                                f"read the same {key} file") from None


def export_metadata(path: str, what: str = "teacher checkpoint") -> Any:
    """The saved tree's metadata of an export/ directory (Orbax), or a `ValueError` saying `path` is not one
    (a run's workdir, whose export/ sits below it, is named as the likely meant directory)."""
    saved = ocp.StandardCheckpointer().metadata(path)
    saved = getattr(saved, "item_metadata", saved)
    if saved is None:
        hint = os.path.join(path, "export")
        raise ValueError(f"{what} {path!r} is not an export/ directory (no Orbax checkpoint in it)"
                         + (f"; did you mean {hint!r}?" if os.path.isdir(hint) else ""))
    return saved


def restore_export(path: str, abstract: PyTree, what: str = "teacher checkpoint") -> PyTree:
    """An export/ directory whose tree is `abstract`'s (`jax.ShapeDtypeStruct`s, shardings included), restored
    into it; arrays of other shapes (another width or depth) are named in a `ValueError`."""
    saved = export_metadata(path, what)
    if not _same_tree(saved, abstract):
        raise ValueError(f"{what} {path!r} holds another network's variables")
    return _restore_same_tree(path, saved, abstract, what)


def _same_tree(saved: Any, abstract: PyTree) -> bool:
    return jax.tree.structure(jax.tree.map(lambda _: 0, dict(saved))) == jax.tree.structure(abstract)


def _restore_same_tree(path: str, saved: Any, abstract: PyTree, what: str) -> PyTree:
    differ = [f"{jax.tree_util.keystr(k)} {tuple(m.shape)} (expected {tuple(a.shape)})"
              for (k, m), a in zip(jax.tree_util.tree_leaves_with_path(dict(saved)), jax.tree.leaves(abstract))
              if tuple(m.shape) != tuple(a.shape)]
    if differ:
        raise ValueError(f"{what} {path!r} was saved from a network of other shapes: {len(differ)} arrays differ, "
                         f"e.g. {'; '.join(differ[:3])}")
    return ocp.StandardCheckpointer().restore(path, abstract)


def _restore_export(path: str, abstract: PyTree, shardings: PyTree) -> PyTree:
    """An export/ directory (Orbax) into the teacher: straight into its shardings when the trees match; a part
    of the saved tree otherwise (a trunk teacher from a whole detector's export: its backbone and neck)."""
    saved = export_metadata(path)  # read once: both branches below use it
    if _same_tree(saved, abstract):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        return _restore_same_tree(path, saved, target, "teacher checkpoint")
    ckptr = ocp.StandardCheckpointer()
    full = ckptr.restore(path)  # on the host, then the teacher's part placed
    flat_saved = traverse_util.flatten_dict(full)
    out = {}
    for key, a in traverse_util.flatten_dict(abstract).items():
        if key not in flat_saved or tuple(np.shape(flat_saved[key])) != tuple(a.shape):
            raise ValueError(f"teacher checkpoint {path!r} has no {'/'.join(map(str, key))} of shape {a.shape}")
        out[key] = np.asarray(flat_saved[key], a.dtype)
    dropped = sorted({k[1] for k in flat_saved if k not in out and len(k) > 1})
    log.info("teacher: %d arrays from %s (not used: %s)", len(out), path, ", ".join(dropped) or "none")
    return place(traverse_util.unflatten_dict(out), shardings)


def load_pretrained(cfg: ml_collections.ConfigDict, student: nn.Module, sample: jax.Array,
                    teacher_cfg: Optional[ml_collections.ConfigDict] = None) -> dict:
    """Initial student weights from `cfg.pretrained` (a PyTorch .pth, e.g. mmseg's ImageNet `resnet18_v1c`), and
    from `cfg.inherit` (the paper's "dagger" runs: the student's neck and head start from the teacher's).

    `cfg.pretrained_prefixes` lists `(model-key prefix, checkpoint-key prefix)`
    pairs (default `[('backbone.', '')]`: a bare ResNet checkpoint into a
    segmenter's or detector's backbone). `cfg.inherit`: `'teacher'` (the teacher's
    `checkpoint`) or a path, a .pth or an export/ directory holding `student.pth`,
    read through `cfg.inherit_prefixes` (default `[('neck.', 'neck.'), ('bbox_head.',
    'bbox_head.')]`; `cfg.inherit_skip_mismatched` skips, and logs, tensors whose shape differs, as
    mmengine's loader does); what it gives wins over `pretrained`. Variables neither
    covers keep their random initialisation; checkpoint keys left over (an
    ImageNet `fc.*`, a teacher's backbone) are logged.
    Returns `{(collection, *path): array}` of the loaded variables ({} without either).
    """
    loaded: dict = {}
    path = cfg.get("pretrained", "")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"student pretrained weights {path!r} not found; set --config.student.pretrained "
                                    "to a PyTorch .pth (e.g. an ImageNet ResNet), or to '' to start from scratch")
        prefixes = torch_interop.prefix_pairs(cfg.get("pretrained_prefixes") or [("backbone.", "")],
                                              "pretrained_prefixes")
        loaded.update(_load_into(student, sample, path, prefixes, "student pretrained weights"))
    inherit = cfg.get("inherit", "")
    if inherit:
        source = (teacher_cfg or {}).get("checkpoint", "") if inherit == "teacher" else inherit
        if not source:
            raise ValueError("student.inherit='teacher' starts the student's neck and head from the teacher's "
                             "checkpoint, but teacher.checkpoint is empty; set --config.teacher.checkpoint")
        if os.path.isdir(source):
            source = os.path.join(source, "student.pth")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"student.inherit: checkpoint {source!r} not found")
        prefixes = torch_interop.prefix_pairs(cfg.get("inherit_prefixes") or [("neck.", "neck."),
                                                                              ("bbox_head.", "bbox_head.")],
                                              "inherit_prefixes")
        loaded.update(_load_into(student, sample, source, prefixes, "student.inherit",
                                 skip_mismatched=bool(cfg.get("inherit_skip_mismatched", False))))
    return loaded


def _load_into(student: nn.Module, sample: jax.Array, path: str, prefixes: dict, what: str, *,
               skip_mismatched: bool = False) -> dict:
    abstract = jax.eval_shape(lambda: student.init(jax.random.key(0), sample, train=False))
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    # the Swin release's ImageNet weights (the DINO Swin-B student's) come in their own names
    state = torch_interop.to_mmdet_keys(torch_interop.load_pth(path))
    variables, report = torch_interop.import_state_dict(student, state, key_prefixes=prefixes, strict=False,
                                                        init_variables=zeros, sample=sample,
                                                        skip_mismatched=skip_mismatched)
    if report.mismatched:
        log.warning("%s: %d tensors of %s skipped for their shape, left at their initialisation: %s", what,
                    len(report.mismatched), path, "; ".join(report.mismatched))
    if not report.loaded:
        raise ValueError(f"{what} {path!r}: no key matched with prefixes {prefixes}; "
                         f"the file's keys look like {', '.join(sorted(state)[:3])}")
    layout = torch_interop.state_dict_layout(student, sample=sample)
    loaded = {(layout[k].collection, *layout[k].path) for k in report.loaded}
    log.info("student: %d tensors from %s (%d left as they were; unused in the file: %s)",
             len(loaded), path, len(report.missing), ", ".join(report.unexpected[:5]) or "none")
    return {k: v for k, v in traverse_util.flatten_dict(variables).items() if k in loaded}
