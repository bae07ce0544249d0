"""The training loop: config in, trained (and exported) student and a summary out.

`train_and_evaluate(config, workdir)` is what `train.py` calls and what the
tests drive. The loop owns every side effect (checkpoints, metrics files,
signals); the step and evaluation it calls are pure and jitted once.

Resuming: a run that finds checkpoints in `workdir` restores the newest good
one (state and data position) and continues as if never stopped; a finished
run only reports. SIGTERM (pod preemption) makes the loop save at the end of
the current step and exit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cankd_jax.train import build
from cankd_jax.train.checkpoint import Checkpointer
from cankd_jax.train.metrics import MetricsWriter, Progress
from cankd_jax.train.sharding import batch_sharding, check_global_batch, global_batch, make_mesh, replicated
from cankd_jax.train.state import create_sharded_state
from cankd_jax.train.step import make_train_step

log = logging.getLogger(__name__)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # signal handlers can only be installed from the main thread (not e.g. under a notebook's worker)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):  # noqa: ARG002
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) the run described by `config` in `workdir`; returns its summary dict."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    local_batch = check_global_batch(config.batch_size, mesh)
    run = build.build_run(config, mesh)
    writer = MetricsWriter(workdir)

    state, state_shardings = create_sharded_state(run.init_variables, run.tx, config.seed, mesh, fsdp=config.mesh.fsdp)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    data_state: Optional[dict] = None
    restored = ckpt.restore_latest(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                state, state_shardings))
    if restored is not None:
        step0, state, data_state = restored
        log.info("resumed from step %d in %s", step0, ckpt.directory)
    start = int(jax.device_get(state.step))

    train_iter = run.data.train_iterator(local_batch, seed=config.seed, state=(data_state or {}).get("train"))
    step_fn = jax.jit(
        make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task, tx=run.tx,
                        schedule=run.schedule),
        in_shardings=(state_shardings, run.teacher_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    evaluate = build.make_evaluator(run, mesh)

    summary: dict[str, Any] = {"workdir": workdir, "total_steps": config.total_steps}
    if run.teacher is not None and start == 0 and config.get("evaluate_teacher", True):
        summary["teacher"] = evaluate(run.teacher, run.teacher_vars)
        writer.write(0, {f"teacher/{k}": v for k, v in summary["teacher"].items()})

    progress = Progress(config.total_steps, start)
    with jax.set_mesh(mesh), _Preemption() as preempt:
        step, t_last, last_metrics = start, time.perf_counter(), {}
        while step < config.total_steps:
            batch = global_batch(next(train_iter), mesh)
            state, metrics = step_fn(state, run.teacher_vars, batch)
            step += 1
            if step % config.log_every == 0 or step == config.total_steps:
                now = time.perf_counter()
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                n = config.log_every if step % config.log_every == 0 else step % config.log_every
                host["steps_per_sec"] = n / max(now - t_last, 1e-9)
                host["images_per_sec"] = host["steps_per_sec"] * config.batch_size
                t_last, last_metrics = now, host
                writer.write(step, host)
                progress.update(step, f"loss {host['loss']:.4f}")
            if step % config.eval_every == 0 or step == config.total_steps:
                ev = evaluate(run.student, run.student_variables(state))
                writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
                summary["eval"] = ev
            if step % config.checkpoint_every == 0 or step == config.total_steps or preempt.requested:
                ckpt.save(step, state, {"train": train_iter.get_state()})
            if preempt.requested:
                break
    progress.close()
    ckpt.wait()

    summary.update(step=step, finished=step >= config.total_steps, last_metrics=last_metrics)
    if summary["finished"]:
        if "eval" not in summary:  # a finished run re-opened: report its final evaluation again
            summary["eval"] = evaluate(run.student, run.student_variables(state))
        build.export_student(run, state, os.path.join(workdir, "export"), pytorch=config.export.pytorch)
    ckpt.close()
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(_jsonable(summary), f, indent=2)
    return summary


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, jnp.ndarray)):
        return np.asarray(x).tolist()
    return x
