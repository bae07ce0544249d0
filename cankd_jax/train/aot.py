"""A config's train step for abstract inputs: lowered and compiled ahead of time, nothing initialised, loaded or run.

The step is the one `train.py` runs (`build.build_run`, `state.plan_state`, `step.jit_step`) on any mesh; the
state, the teacher's variables and the batch are `jax.ShapeDtypeStruct`s in their shardings, so a step for 256
devices, or for 800x1344 images, compiles on a laptop. Memory estimates (`benchmarks/memory.py`) and the pod
rehearsal (`cankd_jax.rehearse`) are built on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
from jax.sharding import Mesh

from cankd_jax.compute import conv_form
from cankd_jax.train import build
from cankd_jax.train.sharding import ParamLayout, batch_sharding, check_global_batch
from cankd_jax.train.state import TrainState, plan_state
from cankd_jax.train.step import jit_step, make_train_step

PyTree = Any


@dataclasses.dataclass
class AbstractStep:
    """The jitted train step of a run and abstract arguments for it (`abstract_step`)."""

    run: build.Run
    mesh: Mesh
    layout: ParamLayout
    jitted: Any
    state: TrainState  # ShapeDtypeStructs carrying their shardings
    teacher_vars: PyTree  # likewise
    batch: dict[str, Any]  # likewise, (global_batch, ...) split along `data`

    def lower(self) -> Any:
        """The step lowered as an accelerator runs it: convolutions native even when lowered on CPU devices, where
        'auto' would write the wide ones as tap matmuls (`compute.conv_form`), a program no accelerator runs."""
        with jax.set_mesh(self.mesh), conv_form("native"):
            return self.jitted.lower(self.state, self.teacher_vars, self.batch)


def shapes_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every weight source cleared (teacher checkpoint, student pretrained / inherit): compiling
    needs the networks' shapes, not their weights, and no file has to exist."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.get("teacher") is not None:
        config.teacher.checkpoint, config.teacher.random_init = "", True
    for key in ("pretrained", "inherit"):
        if config.student.get(key):
            config.student[key] = ""
    return config


def abstract_step(config: ml_collections.ConfigDict, mesh: Mesh, example: dict[str, Any], *,
                  global_batch: Optional[int] = None) -> AbstractStep:
    """The train step of `config` on `mesh` for batches of `global_batch` (default `config.batch_size`) examples
    laid out like `example` (one example's arrays, e.g. from `data.train_example_layouts`).

    The parameter layout is the config's `mesh` block (replicated or FSDP). A global batch the devices do not
    divide is a `ValueError` naming a batch that works.
    """
    config = shapes_only(config)
    global_batch = int(config.batch_size if global_batch is None else global_batch)
    config.batch_size = global_batch
    check_global_batch(global_batch, mesh)
    size = tuple(example["image"].shape[:2])
    run = build.build_run(config, mesh, input_size=size, abstract_teacher=True)
    layout = ParamLayout.from_config(config.get("mesh"))
    plan = plan_state(run.init_variables, run.tx, config.seed, mesh, layout=layout)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((global_batch, *a.shape), a.dtype,
                                                        sharding=batch_sharding(mesh)), example)
    step = make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task, tx=run.tx,
                           schedule=run.schedule)
    jitted = jit_step(step, mesh=mesh, state_shardings=plan.shardings, teacher_shardings=run.teacher_shardings)
    return AbstractStep(run, mesh, layout, jitted, plan.abstract, run.teacher_vars, batch)


def compile_for_analysis(lowered: Any) -> Any:
    """`lowered.compile()` for reading its memory, cost and collectives, not for running many steps: on CPU
    without LLVM optimisation (XLA's own passes, the buffer assignment and the partitioned program are the same;
    the compile is several times faster)."""
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)
