"""A tiny distillation setup shared by the step tests and the multi-process worker."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cankd_jax.layers import BatchNorm
from cankd_jax.losses import Connector, make_loss
from cankd_jax.train.optim import make_optimizer
from cankd_jax.train.sharding import REPLICATED, ParamLayout, global_batch, make_mesh, replicated, tree_shardings
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import DistillTerm, jit_train_step, make_train_step
from cankd_jax.train.tasks import segmentation_cross_entropy


class TinySegNet(nn.Module):
    """conv-BN-ReLU twice; features {'feat': (B, H, W, width), 'logits': (B, H, W, K)}."""

    width: int
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in range(2):
            x = nn.Conv(self.width, (3, 3), name=f"conv{i}")(x)
            x = nn.relu(BatchNorm(name=f"bn{i}")(x, use_running_average=not train))
        return {"feat": x, "logits": nn.Conv(self.num_classes, (1, 1), name="cls")(x)}


class SegTask:
    def loss(self, outputs, labels):
        ce = segmentation_cross_entropy(outputs["logits"], labels)
        return ce, {"ce": ce}


def setup(mesh, loss_name="cankd", layout: ParamLayout = REPLICATED):
    student, teacher = TinySegNet(4), TinySegNet(8)
    opts = {"cankd": dict(in_channels=8, loss_weight=10.0), "mgd": dict(teacher_channels=8)}[loss_name]
    terms = (DistillTerm("feat", "feat", "feat", make_loss(loss_name, **opts), Connector(8) if loss_name == "cankd" else None),)
    cfg = ml_collections.ConfigDict(dict(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, grad_clip_norm=35.0,
                                         schedule="poly", power=0.9, min_lr=1e-4))
    tx, schedule = make_optimizer(cfg, total_steps=10)
    x = jnp.zeros((2, 8, 8, 3))

    def init_variables(key):
        ks, kc, kl = jax.random.split(key, 3)
        sv = student.init(ks, x, train=False)
        feat = student.apply(sv, x, train=False)["feat"]
        distill_p, distill_bs = {}, {}
        for term in terms:
            p = {}
            if term.connector is not None:
                p["connector"] = term.connector.init(kc, feat)["params"]
                feat = term.connector.apply({"params": p["connector"]}, feat)
            lv = term.loss.init({"params": kl, "mask": kl}, feat, jnp.zeros((2, 8, 8, 8)), train=False)
            p["loss"] = lv.get("params", {})
            distill_p[term.name], distill_bs[term.name] = p, {"loss": lv.get("batch_stats", {})}
        return {"student": sv["params"], "distill": distill_p}, {"student": sv["batch_stats"], "distill": distill_bs}

    plan = plan_state(init_variables, tx, seed=0, mesh=mesh, layout=layout)
    state, shardings = plan.init(), plan.shardings
    teacher_vars = teacher.init(jax.random.key(42), x, train=False)
    teacher_shardings = tree_shardings(teacher_vars, mesh, layout)
    teacher_vars = jax.device_put(teacher_vars, teacher_shardings)
    step = make_train_step(student=student, teacher=teacher, terms=terms, task=SegTask(), tx=tx, schedule=schedule)
    jitted = jit_train_step(step, mesh=mesh, state_shardings=shardings, teacher_shardings=teacher_shardings)
    return state, teacher_vars, jitted


def batches(n, seed=0):
    r = np.random.default_rng(seed)
    for _ in range(n):
        yield {"image": r.standard_normal((8, 8, 8, 3)).astype(np.float32),
               "label": r.integers(0, 3, (8, 8, 8)).astype(np.int32)}


def run(n_devices=None, loss_name="cankd", steps=3, layout: ParamLayout = REPLICATED):
    """Train `steps` steps on the first `n_devices` devices (None: all, of every process)."""
    mesh = make_mesh(jax.devices() if n_devices is None else jax.devices()[:n_devices])
    state, teacher_vars, step = setup(mesh, loss_name, layout)
    history = []
    with jax.set_mesh(mesh):
        for b in batches(steps):
            n, i = jax.process_count(), jax.process_index()
            local = {k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in b.items()}
            state, m = step(state, teacher_vars, global_batch(local, mesh))
            history.append(jax.device_get(m))
    params = jax.device_get(jax.jit(lambda p: p, out_shardings=replicated(mesh))(state.params))
    return params, history
