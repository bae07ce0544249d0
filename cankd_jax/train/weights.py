"""Initial weights of a run: the teacher's (a checkpoint, or random only when asked) and the student's pretrained ones."""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh

from cankd_jax.interop import torch as torch_interop
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
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        return ocp.StandardCheckpointer().restore(os.path.abspath(path), target), shardings
    variables = torch_interop.load_pytorch_network(path, teacher, cfg)  # every process reads the same file
    return jax.device_put(variables, shardings), shardings


def load_pretrained(cfg: ml_collections.ConfigDict, student: nn.Module, sample: jax.Array) -> dict:
    """Initial student weights from `cfg.pretrained` (a PyTorch .pth, e.g. mmseg's ImageNet `resnet18_v1c`).

    `cfg.pretrained_prefixes` lists `(model-key prefix, checkpoint-key prefix)`
    pairs (default `[('backbone.', '')]`: a bare ResNet checkpoint into a
    segmenter's backbone). Variables the checkpoint does not cover keep their random
    initialisation; checkpoint keys left over (an ImageNet `fc.*`) are logged.
    Returns `{(collection, *path): array}` of the loaded variables ({} without `pretrained`).
    """
    path = cfg.get("pretrained", "")
    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"student pretrained weights {path!r} not found; set --config.student.pretrained to "
                                "a PyTorch .pth (e.g. an ImageNet ResNet), or to '' to start from scratch")
    prefixes = dict(cfg.get("pretrained_prefixes") or [("backbone.", "")])
    abstract = jax.eval_shape(lambda: student.init(jax.random.key(0), sample, train=False))
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    variables, report = torch_interop.load_checkpoint(path, student, key_prefixes=prefixes, strict=False,
                                                      init_variables=zeros, sample=sample)
    if not report.loaded:
        raise ValueError(f"student pretrained weights {path!r}: no key matched with pretrained_prefixes {prefixes}; "
                         f"the file's keys look like {', '.join(sorted(torch_interop.load_pth(path))[:3])}")
    layout = torch_interop.state_dict_layout(student, sample=sample)
    loaded = {(layout[k].collection, *layout[k].path) for k in report.loaded}
    log.info("student: %d tensors from %s (%d left at their initialisation; unused in the file: %s)",
             len(loaded), path, len(report.missing), ", ".join(report.unexpected[:5]) or "none")
    return {k: v for k, v in traverse_util.flatten_dict(variables).items() if k in loaded}
