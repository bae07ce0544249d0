"""From a config to the pieces of a run: networks, teacher weights, distillation terms, task, optimizer, data.

Everything is chosen by name from registries (`cankd_jax.models`, `cankd_jax.losses`,
`cankd_jax.data`, `cankd_jax.train.tasks`), so a new experiment is a new config file,
not new code. Initial weights come from `weights.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from jax.sharding import Mesh

from cankd_jax import models
from cankd_jax.compute import compute_dtype, remat_policy
from cankd_jax.config_arg import check_number
from cankd_jax.losses import Connector, make_loss
from cankd_jax.losses.registry import loss_fields
from cankd_jax.models.recorder import check_recorded, with_recorded
from cankd_jax.train.optim import check_values, make_optimizer
from cankd_jax.train.sharding import ParamLayout, tree_shardings
from cankd_jax.train.step import DistillTerm
from cankd_jax.train.tasks import Task, make_task
from cankd_jax.train.weights import check_teacher_source, load_pretrained, load_teacher

PyTree = Any


log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """The networks, teacher weights, terms, task, optimizer and data of one run (`build_run`)."""

    student: nn.Module
    teacher: Optional[nn.Module]
    teacher_vars: PyTree
    teacher_shardings: PyTree
    terms: tuple[DistillTerm, ...]
    task: Task
    tx: optax.GradientTransformation
    schedule: Callable
    data: Any
    init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]]

    def student_variables(self, state) -> PyTree:
        return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def build_run(config: ml_collections.ConfigDict, mesh: Mesh, *, input_size: Optional[tuple[int, int]] = None,
              abstract_teacher: bool = False) -> Run:
    """Everything a run needs, its teacher placed on `mesh`. With `input_size` (H, W) no data set is opened
    (`run.data` is None): benchmarks build the step alone and feed it arrays of that size. With
    `abstract_teacher` the teacher's variables are `jax.ShapeDtypeStruct`s in their shardings, enough to
    compile the step (memory and cost analyses) without initialising or loading the teacher.

    Cheap mistakes (unknown names and keys, a teacher without weights) fail before any data is read.
    """
    sections = ("task", "student", "optimizer") + (("data",) if input_size is None else ())
    sections += ("teacher",) if config.get("distill") else ()
    missing = [k for k in sections if not isinstance(config.get(k), (Mapping, ml_collections.ConfigDict))]
    if missing:
        raise ValueError(f"the config defines no {', '.join(missing)} section{'s' * (len(missing) > 1)} (a "
                         f"ConfigDict each; see configs/smoke.py for a complete config)")
    check_values(config.optimizer)
    task = make_task(config.task)
    dtype, remat = config.get("dtype", "float32"), config.get("remat", "none")
    compute_dtype(dtype), remat_policy(remat)  # unknown names: a ValueError listing the valid ones
    student = models.make_network(network_config(config.student, dtype, remat), num_classes=config.task.num_classes)
    if hasattr(task, "for_detector") and hasattr(student, "level_strides"):
        # a detector's targets follow its head (every detector is a backbone + neck pyramid)
        task = task.for_detector(student, config.task)
    terms = make_terms(config.get("distill", ()), dtype=dtype)
    teacher = None
    if terms:
        teacher = models.make_network(network_config(config.teacher, dtype), num_classes=config.task.num_classes)
        check_teacher_source(config.teacher)
    data = None
    if input_size is None:  # imported here: a step built for a given input size needs no data libraries
        from cankd_jax import data as data_lib

        data = data_lib.make_data(config.data, task=config.task.name)
        if data.num_classes != config.task.num_classes:  # else labels past the logits: NaN or silently wrong
            raise ValueError(f"task.num_classes={config.task.num_classes}, but the data set {data.name!r} has "
                             f"{data.num_classes} classes: set --config.task.num_classes={data.num_classes}")
        data.check_eval_batch_size(mesh)  # else found at the first evaluation, for a detector after training
    check_input_norm(config)
    if data is not None and hasattr(task, "with_data"):  # detection scores against the eval split's ground truth
        task = task.with_data(data)
    sample = jnp.zeros((2, *(input_size or data.input_size), 3), jnp.float32)
    teacher_vars, teacher_shardings = {}, {}
    if teacher is not None and abstract_teacher:
        abstract = jax.eval_shape(lambda: teacher.init(jax.random.key(0), sample, train=False))
        teacher_shardings = tree_shardings(abstract, mesh, ParamLayout.from_config(config.get("mesh")))
        teacher_vars = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                    abstract, teacher_shardings)
    elif teacher is not None:
        teacher_vars, teacher_shardings = load_teacher(config.teacher, teacher, sample, seed=config.seed, mesh=mesh,
                                                       layout=ParamLayout.from_config(config.get("mesh")))

    pretrained = load_pretrained(config.student, student, sample, teacher_cfg=config.get("teacher"))
    # Features named by module path (`backbone/layer4.1`, `neck/fpn_convs.2:input`) are recorded from inside the
    # networks (weights load into the networks themselves, above); output-dict names are read as they are.
    student = with_recorded(student, [t.student_feature for t in terms])
    teacher = with_recorded(teacher, [t.teacher_feature for t in terms])
    check_recorded(student, sample), check_recorded(teacher, sample)  # a wrong path: an error now, naming the nearest

    def init_variables(key):
        ks, kd = jax.random.split(key)
        sv = student.init(ks, sample, train=False)
        if pretrained:
            flat = traverse_util.flatten_dict(flax.core.unfreeze(sv))
            sv = traverse_util.unflatten_dict({k: pretrained.get(k, v) for k, v in flat.items()})
        s_out = jax.eval_shape(lambda: student.apply(sv, sample, train=False))  # shapes are all init needs
        t_out = jax.eval_shape(lambda tv: teacher.apply(tv, sample, train=False), teacher_vars) if terms else {}
        params, stats = {}, {}
        for i, term in enumerate(terms):
            kc, kl = jax.random.split(jax.random.fold_in(kd, i))
            s = _output(s_out, term.student_feature, "student")
            s = jnp.zeros(s.shape, s.dtype)
            p = {}
            if term.connector is not None:
                p["connector"] = term.connector.init(kc, s)["params"]
                s = term.connector.apply({"params": p["connector"]}, s)
            t = _output(t_out, term.teacher_feature, "teacher")
            t = jnp.zeros(t.shape, t.dtype)
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
    return Run(student, teacher, teacher_vars, teacher_shardings, terms, task, tx, schedule, data, init_variables)


def check_input_norm(config: ml_collections.ConfigDict) -> Optional[str]:
    """Warn (and return the warning) when the student loads pretrained weights made for another input
    normalisation than `data.norm` gives: a caffe-style ResNet (detectron's `resnet50_caffe`, BGR minus the caffe
    mean, std 1) fed 'pytorch' input (RGB, ImageNet mean and std), or the other way round. The data config owns the
    convention, one per run, and the teacher sees the student's input, as mmrazor feeds it (the authors' FCOS
    X101 teacher of a caffe-style FCOS student reads caffe input); only the student's pretrained weights are held
    to it. Data without a `norm` option (segmentation: always 'pytorch') are not checked."""
    data, student = config.get("data") or {}, config.student
    norm = data.get("norm")
    if norm is None or not student.get("pretrained"):
        return None
    name = student.get("backbone", "")
    style = {**models.registry.BACKBONES.get(name, {}), **dict(student.get("backbone_kwargs") or {})}.get("style", "pytorch")
    wants = "caffe" if style == "caffe" else "pytorch"
    if norm == wants:
        return None
    message = (f"data.norm={norm!r}, but the student's backbone {name} ({style} style) starts from pretrained "
               f"weights ({student.pretrained}) made for {wants!r} input; its features will see input on another "
               f"scale (set --config.data.norm={wants} unless this is meant)")
    log.warning(message)
    return message


def _output(outputs: dict, name: str, side: str) -> Any:
    if name not in outputs:  # a module path was checked by `check_recorded`; an output-dict key is checked here
        raise ValueError(f"distill {side}_feature {name!r} is not among the {side}'s outputs "
                         f"({', '.join(sorted(outputs))}); name one of them, or a module by its path "
                         "(e.g. 'backbone/layer4')")
    return outputs[name]


def network_config(cfg: ml_collections.ConfigDict, dtype: str = "float32", remat: str = "none") -> dict:
    """A `student` / `teacher` config block with the run's compute dtype and remat policy filled in.

    The run's `config.dtype` applies unless the block names its own `dtype`;
    float32 leaves the block as it is (the networks then compute in their
    inputs' float32). `remat` is for the student (the teacher computes no gradient).
    """
    block = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    if compute_dtype(dtype) is not None and not block.get("dtype"):
        block["dtype"] = dtype
    if remat != "none":
        block["remat"] = remat
    return block


def _non_negative(v: float) -> bool:
    return v >= 0


_TERM_KEYS = {"name", "loss", "options", "student_feature", "teacher_feature", "connector", "weight"}


def make_terms(distill_cfgs, *, dtype: str = "float32") -> tuple[DistillTerm, ...]:
    """Distillation terms from the config's `distill` list.

    Each entry: `name`, `loss` (registry name), `options` (the loss's fields),
    `student_feature`, `teacher_feature`, `connector` (output channels of a 1x1
    connector on the student feature, 0 for none), `weight`.

    `dtype` (the run's `config.dtype`) becomes the connectors' compute dtype and
    that of every loss with a `dtype` field (unless its options set one); losses
    without one compute in float32.
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
        cdtype = compute_dtype(dtype)
        name = d["name"]
        # A negative weight maximises the term; a negative connector width fails deep inside JAX.
        weight = check_number(d.get("weight", 1.0), f"distill term {name!r}: weight", _non_negative,
                              "a finite number >= 0")
        width = check_number(d.get("connector") or 0, f"distill term {name!r}: connector",
                             lambda v: v >= 0 and v == int(v),
                             "a whole number of output channels >= 0 (0: no connector)")
        connector = Connector(int(width), dtype=cdtype) if width else None
        options = dict(d.get("options") or {})
        if "loss_weight" in options:
            check_number(options["loss_weight"], f"distill term {name!r}: options.loss_weight", _non_negative,
                         "a finite number >= 0")
        if cdtype is not None and "dtype" in loss_fields(d["loss"]) and not options.get("dtype"):
            options["dtype"] = cdtype
        loss = make_loss(d["loss"], **options)
        terms.append(DistillTerm(name, d["student_feature"], d["teacher_feature"], loss, connector, weight))
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"distill term names must be unique, got {names}")
    return tuple(terms)
