"""From a config to the pieces of a run: networks, teacher weights, distillation terms, task, optimizer, data.

Everything is chosen by name from registries (`cankd_jax.models`, `cankd_jax.losses`,
`cankd_jax.data`), so a new experiment is a new config file, not new code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
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


# --- tasks -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
    """Pixel cross-entropy on `logits` (+ `aux_weight` x on `aux_logits`), evaluated by mIoU."""

    num_classes: int
    aux_weight: float = 0.4
    avg_non_ignore: bool = False
    metric: str = "mIoU"

    def loss(self, outputs: dict, labels: jax.Array) -> tuple[jax.Array, dict]:
        terms = {"seg": segmentation_cross_entropy(outputs["logits"], labels, avg_non_ignore=self.avg_non_ignore)}
        if self.aux_weight and "aux_logits" in outputs:
            terms["aux"] = self.aux_weight * segmentation_cross_entropy(
                outputs["aux_logits"], labels, avg_non_ignore=self.avg_non_ignore)
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


def build_run(config: ml_collections.ConfigDict, mesh: Mesh) -> Run:
    data = data_lib.make_data(config.data, task=config.task.name)
    sample = jnp.zeros((2, *data.input_size, 3), jnp.float32)
    student = models.make_network(config.student, num_classes=config.task.num_classes)
    teacher = None
    teacher_vars = {}
    if config.get("distill"):
        teacher = models.make_network(config.teacher, num_classes=config.task.num_classes)
        teacher_vars = load_teacher(config.teacher, teacher, sample, seed=config.seed)
    teacher_shardings = tree_shardings(teacher_vars, mesh, fsdp=config.mesh.fsdp)
    teacher_vars = jax.device_put(teacher_vars, teacher_shardings)
    terms = make_terms(config.get("distill", ()))

    def init_variables(key):
        ks, kd = jax.random.split(key)
        sv = student.init(ks, sample, train=False)
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


def make_terms(distill_cfgs) -> tuple[DistillTerm, ...]:
    """Distillation terms from the config's `distill` list.

    Each entry: `name`, `loss` (registry name), `options` (the loss's fields),
    `student_feature`, `teacher_feature`, `connector` (output channels of a 1x1
    connector on the student feature, 0 for none), `weight`.
    """
    terms = []
    for d in distill_cfgs:
        connector = Connector(int(d.connector)) if d.get("connector") else None
        loss = make_loss(d.loss, **dict(d.get("options", {})))
        terms.append(DistillTerm(d.name, d.student_feature, d.teacher_feature, loss, connector, float(d.get("weight", 1.0))))
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"distill term names must be unique, got {names}")
    return tuple(terms)


def load_teacher(cfg: ml_collections.ConfigDict, teacher: nn.Module, sample: jax.Array, *, seed: int) -> PyTree:
    """Teacher variables: from `cfg.checkpoint` (our export dir or an mmseg/mmdet .pth), else random."""
    path = cfg.get("checkpoint", "")
    if not path:
        return teacher.init(jax.random.key(seed + 1_000_003), sample, train=False)
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} not found; set --config.teacher.checkpoint to a "
                                "trained teacher (an export/ directory of a teacher run, or a PyTorch .pth)")
    if os.path.isdir(path):
        abstract = jax.eval_shape(lambda: teacher.init(jax.random.key(0), sample, train=False))
        return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)
    return torch_interop.load_pytorch_network(path, teacher, cfg)


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
            c = np.asarray(jax.device_get(cache[id(network)](variables, global_batch(local, mesh))))
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
