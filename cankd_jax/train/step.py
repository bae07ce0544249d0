"""The distillation train step (the state it updates is `state.TrainState`).

One step: the frozen teacher runs in inference mode under `stop_gradient`; the
student runs in training mode; each distillation term lifts a student feature
with its connector (if any) and compares it with a teacher feature through its
own loss module; total = task loss + sum(weight_i * distill_i). Gradients flow
to the student, the connectors and the loss modules, all in one optimizer.

The step is a pure function of (state, teacher variables, batch); the trainer
wraps it in one `jax.jit` with `NamedSharding`s over a mesh (see `sharding.py`),
so batch-norm statistics and every reduction are over the global batch, and the
numbers do not depend on how many devices or processes share the batch.

Mixed precision (`config.dtype='bfloat16'`, see `cankd_jax.compute`) lives in
the modules, not here: they compute in bfloat16 from float32 parameters, so the
gradients, the optimizer update and the new state are float32 as always; the
task loss and the distillation terms return float32 scalars.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cankd_jax.train.compiled import CompiledPerShape
from cankd_jax.train.sharding import batch_sharding, replicated
from cankd_jax.train.state import TrainState
from cankd_jax.train.tasks import Task
from cankd_jax.train.tasks.base import task_apply_kwargs

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class DistillTerm:
    """One distilled feature pair: `weight * loss(connector(student[s_feat]), teacher[t_feat])`."""

    name: str
    student_feature: str
    teacher_feature: str
    loss: nn.Module
    connector: Optional[nn.Module] = None
    weight: float = 1.0


def _features(outputs: dict[str, Array], name: str, who: str) -> Array:
    try:
        return outputs[name]
    except KeyError:
        raise ValueError(f"the {who} has no feature {name!r}; it has {', '.join(sorted(outputs))}") from None


def teacher_features(teacher: nn.Module, teacher_vars: PyTree, images: Array, names: set[str]) -> dict[str, Array]:
    """The teacher's named features, inference mode, no gradient."""
    if not names:
        return {}
    out = teacher.apply(teacher_vars, images, train=False)
    return {n: jax.lax.stop_gradient(_features(out, n, "teacher")) for n in names}


def distill_losses(
    terms: tuple[DistillTerm, ...],
    params: PyTree,
    batch_stats: PyTree,
    s_out: dict[str, Array],
    t_feats: dict[str, Array],
    rng: Array,
    *,
    train: bool,
) -> tuple[dict[str, Array], PyTree]:
    """Each term's (unweighted) value and the terms' updated batch statistics."""
    values, new_stats = {}, {}
    for i, term in enumerate(terms):
        p, bs = params[term.name], batch_stats.get(term.name, {})
        s = _features(s_out, term.student_feature, "student")
        if term.connector is not None:
            s = term.connector.apply({"params": p["connector"]}, s)
        value, upd = term.loss.apply(
            {"params": p.get("loss", {}), "batch_stats": bs.get("loss", {})},
            s,
            t_feats[term.teacher_feature],
            train=train,
            mutable=["batch_stats"],
            rngs={"mask": jax.random.fold_in(rng, i)},
        )
        chex.assert_shape(value, ())  # every loss returns a float32 scalar
        chex.assert_type(value, jnp.float32)
        values[term.name] = value
        new_stats[term.name] = {"loss": upd.get("batch_stats", {})}
    return values, new_stats


SAMPLE_STREAM = 0x5A4D  # fold_in constant of the task's sampling key (random RoI / anchor sampling)


def make_grad_fn(
    *,
    student: nn.Module,
    teacher: Optional[nn.Module],
    terms: tuple[DistillTerm, ...],
    task: Task,
) -> Callable[[TrainState, PyTree, dict[str, Array]], tuple[PyTree, dict[str, Array], PyTree]]:
    """`grad_fn(state, teacher_vars, batch) -> (grads, metrics, new_batch_stats)`: the step before the optimizer.

    `grads` are float32 like the parameters, whatever the networks compute in;
    `metrics`: `loss`, `task/<name>`, `distill/<term>` (weighted).
    """
    t_names = {t.teacher_feature for t in terms}

    def grad_fn(state: TrainState, teacher_vars: PyTree, batch: dict[str, Array]):
        loss_fn, params = step_loss(student=student, teacher=teacher, terms=terms, task=task, t_names=t_names,
                                    state=state, teacher_vars=teacher_vars, batch=batch)
        (_, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, metrics, new_stats

    return grad_fn


def step_loss(*, student: nn.Module, teacher: Optional[nn.Module], terms: tuple[DistillTerm, ...], task: Task,
              state: TrainState, teacher_vars: PyTree, batch: dict[str, Array], t_names: Optional[set] = None):
    """`(loss_fn, params)`: the function of the parameters the step differentiates, `loss_fn(params) ->
    (total, (metrics, new_batch_stats))`, with the teacher's features already computed (inference, no gradient).
    What its backward pass keeps is what `jax.ad_checkpoint.print_saved_residuals(lambda p: loss_fn(p)[0],
    params)` lists (benchmarks/memory.py counts it)."""
    t_names = {t.teacher_feature for t in terms} if t_names is None else t_names
    images, labels = batch["image"], batch["label"]
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, 3, 3)
    chex.assert_tree_shape_prefix(labels, images.shape[:1])
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_rng, mask_rng = jax.random.split(rng)
    t_feats = teacher_features(teacher, teacher_vars, images, t_names) if terms else {}
    # What the task hands the student's call (Faster R-CNN: how it samples its RoIs), with a key of its own that
    # leaves the dropout and mask keys as they were.
    extra = task_apply_kwargs(task, labels, train=True, key=jax.random.fold_in(rng, SAMPLE_STREAM))

    def loss_fn(params):
        s_out, s_upd = student.apply(
            {"params": params["student"], "batch_stats": state.batch_stats["student"]},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
            **extra,
        )
        task_total, task_terms = task.loss(s_out, labels)
        d_values, d_stats = distill_losses(
            terms, params["distill"], state.batch_stats["distill"], s_out, t_feats, mask_rng, train=True
        )
        weighted = {t.name: t.weight * d_values[t.name] for t in terms}
        total = task_total + sum(weighted.values(), jnp.float32(0.0))
        metrics = {"loss": total, **{f"task/{k}": v for k, v in task_terms.items()},
                   **{f"distill/{k}": v for k, v in weighted.items()}}
        return total, (metrics, {"student": s_upd["batch_stats"], "distill": d_stats})

    return loss_fn, state.params


def make_train_step(
    *,
    student: nn.Module,
    teacher: Optional[nn.Module],
    terms: tuple[DistillTerm, ...],
    task: Task,
    tx: optax.GradientTransformation,
    schedule: Callable[[Array], Array],
) -> Callable[[TrainState, PyTree, dict[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """`step(state, teacher_vars, batch) -> (state, metrics)`.

    `batch`: `image (B, H, W, 3)` float and `label`, an array (or tree of
    arrays) with leading dimension B. `metrics`: float32 scalars `loss`
    (total), `task/<name>`, `distill/<term>` (weighted), `lr` (of this step),
    `grad_norm` (global) and `grad_norm/student`, `grad_norm/<term>` (the
    student's and each term's own parameters).
    """
    grad_fn = make_grad_fn(student=student, teacher=teacher, terms=terms, task=task)

    def step(state: TrainState, teacher_vars: PyTree, batch: dict[str, Array]):
        grads, metrics, new_stats = grad_fn(state, teacher_vars, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "grad_norm": optax.tree.norm(grads), "grad_norm/student": optax.tree.norm(grads["student"]),
                   **{f"grad_norm/{t.name}": optax.tree.norm(grads["distill"][t.name]) for t in terms}}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        return new_state, metrics

    return step


def jit_train_step(
    step: Callable[[TrainState, PyTree, dict[str, Array]], tuple[TrainState, dict[str, Array]]],
    *,
    mesh: Any,
    state_shardings: PyTree,
    teacher_shardings: PyTree,
    max_shapes: int = 1,
) -> CompiledPerShape:
    """`step` as one `jax.jit` over `mesh`: the state in its shardings (and donated), the teacher in its own,
    the batch split along `data`, the metrics replicated; compiled ahead of its first run for each batch shape,
    at most `max_shapes` of them (the shapes the data yields), beyond which a batch is a `RecompileError`.
    """
    jitted = jit_step(step, mesh=mesh, state_shardings=state_shardings, teacher_shardings=teacher_shardings)
    return CompiledPerShape(jitted, what="train step", key_argnums=(2,), max_shapes=max_shapes)


def jit_step(step: Callable, *, mesh: Any, state_shardings: PyTree, teacher_shardings: PyTree) -> Any:
    """The one `jax.jit` of the train step: the state in its shardings (donated), the teacher in its own, the batch
    split along `data`, the metrics replicated. Benchmarks and the rehearsal lower this same object for abstract
    inputs."""
    return jax.jit(step, in_shardings=(state_shardings, teacher_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
