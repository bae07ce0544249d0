"""From a config to the pieces of a run: networks, teacher weights, distillation terms, task, optimizer, data.

Everything is chosen by name from registries (`cankd_jax.models`, `cankd_jax.losses`,
`cankd_jax.data`), so a new experiment is a new config file, not new code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh

from cankd_jax import data as data_lib
from cankd_jax import models
from cankd_jax.interop import torch as torch_interop
from cankd_jax.losses import Connector, make_loss
from cankd_jax.train.optim import make_optimizer
from cankd_jax.train.sharding import global_batch, tree_shardings
from cankd_jax.train.step import DistillTerm
from cankd_jax.train.tasks import classification_cross_entropy, confusion_matrix, mean_iou, segmentation_cross_entropy

PyTree = Any
log = logging.getLogger(__name__)


# --- tasks -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
    """Pixel cross-entropy on `logits` (+ `aux_weight` x on `aux_logits`), evaluated by mIoU."""

    num_classes: int
    aux_weight: float = 0.4
    avg_non_ignore: bool = False
    class_weight: Optional[tuple[float, ...]] = None  # mmseg's CrossEntropyLoss(class_weight=...), both heads
    metric: str = "mIoU"

    def __post_init__(self):
        if self.class_weight is not None:
            if len(self.class_weight) != self.num_classes:
                raise ValueError(f"task.class_weight has {len(self.class_weight)} entries for "
                                 f"task.num_classes={self.num_classes}")
            object.__setattr__(self, "class_weight", tuple(float(w) for w in self.class_weight))

    def loss(self, outputs: dict, labels: jax.Array) -> tuple[jax.Array, dict]:
        ce = functools.partial(segmentation_cross_entropy, avg_non_ignore=self.avg_non_ignore,
                               class_weight=self.class_weight)
        terms = {"seg": ce(outputs["logits"], labels)}
        if self.aux_weight and "aux_logits" in outputs:
            terms["aux"] = self.aux_weight * ce(outputs["aux_logits"], labels)
        return sum(terms.values()), terms

    def counts(self, outputs: dict, labels: jax.Array, valid: jax.Array) -> jax.Array:
        preds = jnp.argmax(outputs["logits"], axis=-1)
        return confusion_matrix(preds, labels, valid[:, None, None], self.num_classes)

    def summarize(self, counts: np.ndarray) -> dict[str, float]:
        miou, _ = mean_iou(counts)
        total = counts.sum()
        return {"mIoU": miou, "pixel_acc": float(np.trace(counts) / total) if total else 0.0}


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Softmax cross-entropy on `logits`, evaluated by top-1 accuracy."""

    num_classes: int
    metric: str = "top1"

    def loss(self, outputs: dict, labels: jax.Array) -> tuple[jax.Array, dict]:
        ce = classification_cross_entropy(outputs["logits"], labels)
        return ce, {"ce": ce}

    def counts(self, outputs: dict, labels: jax.Array, valid: jax.Array) -> jax.Array:
        correct = (jnp.argmax(outputs["logits"], -1) == labels) & valid
        return jnp.stack([jnp.sum(correct), jnp.sum(valid)]).astype(jnp.int32)

    def summarize(self, counts: np.ndarray) -> dict[str, float]:
        return {"top1": float(counts[0] / max(counts[1], 1))}


TASKS = {"segmentation": SegmentationTask, "classification": ClassificationTask}


def make_task(cfg: ml_collections.ConfigDict):
    cfg = cfg.to_dict()
    name = cfg.pop("name")
    if name not in TASKS:
        raise ValueError(f"unknown task.name {name!r}; choose one of {', '.join(sorted(TASKS))}")
    fields = {f.name for f in dataclasses.fields(TASKS[name])} - {"metric"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"unknown task key(s) {', '.join(unknown)} for task {name!r}; known: {', '.join(sorted(fields))}")
    return TASKS[name](**cfg)


# --- the run ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    student: nn.Module
    teacher: Optional[nn.Module]
    teacher_vars: PyTree
    teacher_shardings: PyTree
    terms: tuple[DistillTerm, ...]
    task: Any
    tx: optax.GradientTransformation
    schedule: Callable
    data: Any
    init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]]

    def student_variables(self, state) -> PyTree:
        return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def build_run(config: ml_collections.ConfigDict, mesh: Mesh, *, input_size: Optional[tuple[int, int]] = None) -> Run:
    """Everything a run needs. With `input_size` (H, W) no data set is opened (`run.data` is None):
    benchmarks build the step alone and feed it arrays of that size."""
    data = data_lib.make_data(config.data, task=config.task.name) if input_size is None else None
    sample = jnp.zeros((2, *(input_size or data.input_size), 3), jnp.float32)
    student = models.make_network(config.student, num_classes=config.task.num_classes)
    teacher = None
    teacher_vars = {}
    if config.get("distill"):
        teacher = models.make_network(config.teacher, num_classes=config.task.num_classes)
        teacher_vars = load_teacher(config.teacher, teacher, sample, seed=config.seed)
    teacher_shardings = tree_shardings(teacher_vars, mesh, fsdp=config.mesh.fsdp)
    teacher_vars = jax.device_put(teacher_vars, teacher_shardings)
    terms = make_terms(config.get("distill", ()))

    pretrained = load_pretrained(config.student, student, sample)

    def init_variables(key):
        ks, kd = jax.random.split(key)
        sv = student.init(ks, sample, train=False)
        if pretrained:
            flat = traverse_util.flatten_dict(flax.core.unfreeze(sv))
            sv = traverse_util.unflatten_dict({k: pretrained.get(k, v) for k, v in flat.items()})
        s_out = student.apply(sv, sample, train=False)
        t_out = jax.eval_shape(lambda: teacher.apply(teacher_vars, sample, train=False)) if terms else {}
        params, stats = {}, {}
        for i, term in enumerate(terms):
            kc, kl = jax.random.split(jax.random.fold_in(kd, i))
            s = s_out[term.student_feature]
            p = {}
            if term.connector is not None:
                p["connector"] = term.connector.init(kc, s)["params"]
                s = term.connector.apply({"params": p["connector"]}, s)
            t = jnp.zeros(t_out[term.teacher_feature].shape, t_out[term.teacher_feature].dtype)
            lv = term.loss.init({"params": kl, "mask": kl}, s, t, train=False)
            p["loss"] = lv.get("params", {})
            params[term.name], stats[term.name] = p, {"loss": lv.get("batch_stats", {})}
        return ({"student": sv["params"], "distill": params},
                {"student": sv.get("batch_stats", {}), "distill": stats})

    frozen = models.frozen_labels(student, config.student)
    labels = None
    if frozen is not None:
        abstract = jax.eval_shape(lambda: init_variables(jax.random.key(0))[0])
        labels = {"student": frozen(abstract["student"]),
                  "distill": jax.tree.map(lambda _: "trainable", abstract["distill"])}
    tx, schedule = make_optimizer(config.optimizer, config.total_steps, frozen_labels=labels)
    return Run(student, teacher, teacher_vars, teacher_shardings, terms, make_task(config.task), tx, schedule,
               data, init_variables)


_TERM_KEYS = {"name", "loss", "options", "student_feature", "teacher_feature", "connector", "weight"}


def make_terms(distill_cfgs) -> tuple[DistillTerm, ...]:
    """Distillation terms from the config's `distill` list.

    Each entry: `name`, `loss` (registry name), `options` (the loss's fields),
    `student_feature`, `teacher_feature`, `connector` (output channels of a 1x1
    connector on the student feature, 0 for none), `weight`.
    """
    terms = []
    for d in distill_cfgs:
        d = d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d)
        unknown = sorted(set(d) - _TERM_KEYS)
        missing = sorted({"name", "loss", "student_feature", "teacher_feature"} - set(d))
        if unknown or missing:
            raise ValueError(f"distill entry {d.get('name', '?')!r}: "
                             + (f"unknown key(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}")
                             + f"; an entry has {', '.join(sorted(_TERM_KEYS))}")
        connector = Connector(int(d["connector"])) if d.get("connector") else None
        loss = make_loss(d["loss"], **dict(d.get("options") or {}))
        terms.append(DistillTerm(d["name"], d["student_feature"], d["teacher_feature"], loss, connector,
                                 float(d.get("weight", 1.0))))
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"distill term names must be unique, got {names}")
    return tuple(terms)


def load_teacher(cfg: ml_collections.ConfigDict, teacher: nn.Module, sample: jax.Array, *, seed: int) -> PyTree:
    """Teacher variables: from `cfg.checkpoint` (our export dir or an mmseg/mmdet .pth), else random."""
    path = cfg.get("checkpoint", "")
    if not path:
        # A random teacher (smoke runs, benchmarks): one compiled init with the rbg generator, which compiles
        # in a fraction of threefry's time on CPU (eagerly, every initialiser would compile on its own).
        # Its values only need to be deterministic, and they are replicated, so sharding never changes them.
        return jax.jit(lambda: teacher.init(jax.random.key(seed + 1_000_003, impl="rbg"), sample, train=False))()
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} not found; set --config.teacher.checkpoint to a "
                                "trained teacher (an export/ directory of a teacher run, or a PyTorch .pth)")
    if os.path.isdir(path):
        abstract = jax.eval_shape(lambda: teacher.init(jax.random.key(0), sample, train=False))
        return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)
    return torch_interop.load_pytorch_network(path, teacher, cfg)


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


def make_evaluator(run: Run, mesh: Mesh) -> Callable[[nn.Module, PyTree], dict[str, float]]:
    """`evaluate(network, variables) -> metrics` over the whole held-out split (each example once)."""
    cache: dict[int, Callable] = {}

    def evaluate(network: nn.Module, variables: PyTree) -> dict[str, float]:
        if id(network) not in cache:
            @jax.jit
            def counts(variables, batch):
                out = network.apply(variables, batch["image"], train=False)
                return run.task.counts(out, batch["label"], batch["valid"])

            cache[id(network)] = counts
        total = None
        for local in run.data.eval_iterator(mesh):
            c = np.asarray(jax.device_get(cache[id(network)](variables, global_batch(local, mesh))), np.int64)
            total = c if total is None else total + c
        return run.task.summarize(total)

    return evaluate


def export_student(run: Run, state, directory: str, *, pytorch: bool) -> None:
    """The student alone (no teacher, connectors or loss modules): Orbax, and a PyTorch state dict."""
    variables = jax.device_get(run.student_variables(state))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), variables, force=True)
    ckptr.wait_until_finished()
    if pytorch and jax.process_index() == 0:
        torch_interop.export_pytorch_network(run.student, variables, os.path.join(directory, "student.pth"))
