"""benchmarks/cpu_step_ops.py on a real XLA:CPU profile: a jitted convolution, its gradients and a matmul land in
the classes by what their HLO computes and by direction, every thunk in one of the script's classes."""

from __future__ import annotations

import gzip
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cpu_step_ops  # noqa: E402


def _program(x, w, m):
    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    loss_value, (gw, gx) = jax.value_and_grad(loss, argnums=(0, 1))(w, x)
    return loss_value, gw, gx, x[:, 1:, 1:, :].reshape(-1, 8) @ m


def test_classes_of_a_profiled_program(tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    m = jax.random.normal(jax.random.key(2), (8, 8))
    step = jax.jit(_program).lower(x, w, m).compile()
    hlo = str(tmp_path / "step.hlo.txt.gz")
    with gzip.open(hlo, "wt") as f:
        f.write(step.as_text())
    jax.block_until_ready(step(x, w, m))
    trace = str(tmp_path / "trace")
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(step(x, w, m))

    ms = cpu_step_ops.jax_classes(trace, hlo, steps=2)
    assert set(ms) <= set(cpu_step_ops.CLASSES), set(ms)
    # the forward convolution, and the two gradient convolutions (input and kernel) of the backward pass
    assert ms["convolution forward"] > 0 and ms["convolution backward"] > 0, ms
    assert ms["matmul forward"] > 0 and ms["matmul backward"] == 0, ms  # the dot has no gradient here
    assert ms["BatchNorm"] == 0, ms

    kinds = cpu_step_ops.hlo_ops(hlo)
    convs = [k for k, (kind, _, _) in kinds.items() if kind == "conv"]
    assert {kinds[k][1] for k in convs} == {"forward", "backward"}, {k: kinds[k] for k in convs}
