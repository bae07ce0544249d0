"""The smoke config's gradient step under a compute dtype and a remat policy, compiled once per session.

Shared by the bfloat16 and remat tests: every variant starts from the same
state (parameters do not depend on the compute dtype or the policy) and sees
the same batch, so their numbers compare directly.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from cankd_jax.config_arg import load_config
from cankd_jax.train import build
from cankd_jax.train.sharding import make_mesh
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import make_grad_fn

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")
SIZE = (32, 32)


def batch(seed: int = 0, perturb: float = 0.0) -> dict[str, np.ndarray]:
    """The smoke batch (4 images); `perturb`: multiply each pixel by (1 + perturb * N(0, 1)) drawn from `seed`."""
    r = np.random.default_rng(0)
    image = r.standard_normal((4, *SIZE, 3)).astype(np.float32)
    label = r.integers(0, 7, (4, *SIZE)).astype(np.int32)
    if perturb:
        image = image * (1 + perturb * np.random.default_rng(seed + 1).standard_normal(image.shape)).astype(np.float32)
    return {"image": image, "label": label}


@functools.lru_cache(maxsize=None)
def _start():
    """The smoke run's state and teacher variables, made once: neither depends on the compute dtype or the policy."""
    config = load_config(SMOKE)
    mesh = make_mesh(jax.devices()[:1])
    run = build.build_run(config, mesh, input_size=SIZE)
    return plan_state(run.init_variables, run.tx, config.seed, mesh).init(), run.teacher_vars


@functools.lru_cache(maxsize=None)
def compiled(dtype: str = "float32", remat: str = "none"):
    """`(run, state, teacher_vars, compiled grad_fn)` of the smoke config with `config.dtype` / `config.remat` set.

    Compiled without LLVM optimisation (as `state.run_once` compiles inits): about half the compile time on
    this project's 2-core CI machine, the same XLA graph and rounding (float32 and bfloat16 alike)."""
    config = load_config(SMOKE)
    config.dtype, config.remat = dtype, remat
    mesh = make_mesh(jax.devices()[:1])
    run = build.build_run(config, mesh, input_size=SIZE, abstract_teacher=True)
    state, teacher_vars = _start()
    fn = jax.jit(make_grad_fn(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task))
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return run, state, teacher_vars, fn.lower(state, teacher_vars, batch()).compile(compiler_options=options)


def grads(dtype: str = "float32", remat: str = "none", **batch_kwargs):
    """`(grads, metrics, new_batch_stats)` on the host."""
    _, state, teacher_vars, fn = compiled(dtype, remat)
    return jax.device_get(fn(state, teacher_vars, batch(**batch_kwargs)))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
