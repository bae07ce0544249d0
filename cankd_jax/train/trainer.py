"""The training loop: config in, trained (and exported) student and a summary out.

`train_and_evaluate(config, workdir)` is what `train.py` calls and what the
tests drive. The loop owns every side effect (checkpoints, metrics files,
signals); the step and evaluation it calls are pure and jitted once.

Every decision is taken the same way on every process: the data order is a
function of the global step alone (`data/pipeline.py`), the restored step is
process 0's choice (`checkpoint.py`), preemption is agreed (`preemption.py`),
and the non-finite check reads metrics that are replicated, so identical
everywhere. Before any of that, the processes check that they agree on what to
run: the same config, one shared workdir, the same teacher and initial weights
(`distributed.check_same_config`, `_check_shared_workdir`, `run_record`).

Resuming: a run that finds checkpoints in `workdir` restores the newest good
one (state and data position, on any number of devices and processes), cuts
`metrics.jsonl` and TensorBoard back to that step, and continues as if never
stopped; a finished run only reports. SIGTERM (preemption) makes every process
save at the same step and exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cankd_jax.config_arg import is_count
from cankd_jax.models import DetectionTrunk, ForeignBackbone, unwrap
from cankd_jax.train import build, run_record
from cankd_jax.train.checkpoint import Checkpointer
from cankd_jax.train.distributed import (ProcessesDisagree, barrier, broadcast_bytes, check_same_config, each_process,
                                         each_process_text)
from cankd_jax.train.evaluate import make_evaluator
from cankd_jax.train.export import export_student
from cankd_jax.train.metrics import MetricsWriter, Progress
from cankd_jax.train.preemption import Preemption
from cankd_jax.train.sharding import ParamLayout, global_batch, make_mesh, process_rows
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)
# For the end-to-end tests, faults at a chosen step instead of a chosen moment: "SIGNAME@N" makes this process
# send itself that signal after step N (its metrics written, every checkpoint before it on disk), or with N = 0
# just before the train loop (a notice that arrives during start-up).
FAULT_ENV = "CANKD_JAX_TEST_FAULT"


def has_task_head(model) -> bool:
    """Whether a network ends in a task head (not a detection trunk or a foreign feature extractor)."""
    return not isinstance(unwrap(model), (DetectionTrunk, ForeignBackbone))


def has_foreign_part(model) -> bool:
    """Whether a network is, or holds as its backbone, a foreign model."""
    model = unwrap(model)
    return isinstance(model, ForeignBackbone) or isinstance(getattr(model, "backbone", None), ForeignBackbone)


def _fault() -> tuple[int, int]:
    """(signal, step) of `FAULT_ENV`, or (0, -1) when unset; a malformed value is a one-line error."""
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return 0, -1
    name, _, step = value.partition("@")
    if not hasattr(signal, name) or not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={value!r}: expected SIGNAME@STEP, e.g. SIGKILL@5 or SIGTERM@0")
    return int(getattr(signal, name)), int(step)


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient; its state was not saved."""


def check_finite(step: int, metrics: dict[str, float], last_saved: Optional[int]) -> None:
    """Raise `NonFiniteError` naming the step and every non-finite term (host floats in, nothing out)."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        where = f"the newest checkpoint is step {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteError(f"non-finite value at step {step}: " + ", ".join(f"{k}={metrics[k]}" for k in bad)
                             + f"; stopped without saving this state ({where})")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       preempt: Optional[Preemption] = None) -> dict[str, Any]:
    """Train (or resume) the run described by `config` in `workdir`; returns its summary dict. `preempt`: the
    caller's (runs in sequence share one, so a notice between them is kept), else one for this run."""
    if preempt is not None:
        return _train_and_evaluate(config, workdir, preempt)
    # From the very start: a notice that arrives while the run is still starting up stops it after its first step.
    with Preemption() as preempt:
        return _train_and_evaluate(config, workdir, preempt)


# The loop's counts: (config key, smallest value, what the smallest means or why it is the smallest).
_LOOP_COUNTS = (
    ("total_steps", 0, "0 evaluates and exports the initial student"),
    ("batch_size", 1, "examples per step over all devices"),
    ("log_every", 1, "steps; the last step is always logged"),
    ("eval_every", 1, "steps; the last step is always evaluated, so total_steps evaluates only there"),
    ("checkpoint_every", 1, "steps; the last step is always saved"),
    ("keep_checkpoints", 1, "with none kept, nothing could resume"),
    ("seed", 0, "the root of every random stream: initialisation, data order, augmentation"),
)


def check_loop_config(config: ml_collections.ConfigDict) -> None:
    """Raise `ValueError` naming the key when one of the loop's counts is out of range: before any work, instead
    of a `ZeroDivisionError` at the first step or a run that silently trains nothing or keeps nothing."""
    for key, least, meaning in _LOOP_COUNTS:
        value = config.get(key)
        if not is_count(value, least):
            raise ValueError(f"--config.{key}={value!r}: must be an integer >= {least} ({meaning})")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preempt: Preemption) -> dict[str, Any]:
    t_start = time.perf_counter()
    check_same_config(config)  # first: a check one process failed alone would leave the others waiting
    check_loop_config(config)
    for path, what in ((workdir, "--workdir"), (os.path.join(workdir, "checkpoints"), "the workdir's checkpoints")):
        if os.path.exists(path) and not os.path.isdir(path):  # else makedirs, or the first save, fails deep down
            raise ValueError(f"{what} {path!r} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # a read-only or foreign filesystem: name the flag, not a makedirs traceback
        raise ValueError(f"cannot create --workdir {workdir!r}: {e.strerror or e}") from e
    with _workdir_lock(workdir):
        return _train_loop(config, workdir, preempt, t_start)


@contextlib.contextmanager
def _workdir_lock(workdir: str) -> Iterator[None]:
    """Process 0 holds an exclusive `flock` on `WORKDIR/.lock` while the run lasts; every process learns whether
    it got it. Two runs on one workdir at once would interleave their checkpoints and metrics without a word."""
    fd, problem = None, ""
    lock = os.path.join(workdir, ".lock")
    token = os.urandom(16).hex().encode()
    if jax.process_index() == 0:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                problem = (f"another train.py is using --workdir {workdir} (it holds {lock}); let it finish, or "
                           "give this run another --workdir")
            except OSError as e:  # a filesystem without locks (some network mounts): run unguarded, and say so
                log.warning("cannot lock %s (%s): nothing stops a second run on this workdir", workdir, e)
            if not problem:  # this run's mark, for the other processes to find (flushed before they look)
                os.ftruncate(fd, 0)
                os.pwrite(fd, token, 0)
                os.fsync(fd)
        except OSError as e:  # unwritable, full, or not a file: said on every process, none left waiting
            problem = f"cannot write {lock} in --workdir: {type(e).__name__}: {e.strerror or e}"
    try:
        problem = each_process_text(problem)[0]  # process 0's word, on every process
        if problem:
            raise ValueError(problem)
        _check_shared_workdir(workdir, lock, broadcast_bytes(token))
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _check_shared_workdir(workdir: str, lock: str, token: bytes) -> None:
    """Every process must see process 0's workdir (the checkpoints are written into one directory by all of
    them): each reads the mark process 0 left in `lock`. Given different directories (each host its own local
    disk), Orbax's first save would wait forever; this names them instead."""
    try:
        with open(lock, "rb") as f:
            seen = f.read(len(token) + 1) == token
    except OSError:
        seen = False
    ok = each_process(seen)
    if not ok.all():
        bad = [int(i) for i in np.flatnonzero(~ok)]
        raise ProcessesDisagree(f"process(es) {bad} do not see process 0's --workdir (this process's: {workdir}): "
                                "every process must be given the same directory, on a filesystem all hosts share")


def _train_loop(config: ml_collections.ConfigDict, workdir: str, preempt: Preemption,
                t_start: float) -> dict[str, Any]:
    mesh = make_mesh()
    rows = process_rows(mesh, config.batch_size)
    run = build.build_run(config, mesh)

    plan = plan_state(run.init_variables, run.tx, config.seed, mesh, layout=ParamLayout.from_config(config.get("mesh")))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    data_state: Optional[dict] = None
    record = run_record.make_record(config, run.teacher_vars, check=True)  # other teachers, or NaNs, stop it
    restored = ckpt.restore_latest(plan.abstract)
    if restored is not None:
        step0, state, data_state = restored
        log.info("resumed from step %d in %s", step0, ckpt.directory)
        run_record.check_resume(data_state.get("run"), record, step=step0, where=ckpt.directory)
        if step0 > config.total_steps:  # a longer run's workdir: nothing to train, and its checkpoint is kept
            log.warning("the checkpoint (step %d) is past total_steps=%d: nothing to train; the run is reported "
                        "as it stands at step %d", step0, config.total_steps, step0)
    else:
        state = plan.init()
        run_record.check_weights(state.params, "initial student weights", "student.pretrained")
    log.info("state ready (%.1f s since the start)", time.perf_counter() - t_start)
    start = int(jax.device_get(state.step))
    last_saved = start or None
    writer = MetricsWriter(workdir, resume_step=start)

    train_iter = run.data.train_iterator(config.batch_size, seed=config.seed, rows=rows,
                                         state=(data_state or {}).get("train"))
    # One compilation per batch shape the data yields (detection: one per bucket); another would mean a batch of
    # an unplanned shape or dtype: a compile per step, never intended.
    shapes = run.data.num_train_shapes(config.batch_size) if hasattr(run.data, "num_train_shapes") else 1
    step_fn = jit_train_step(make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task,
                                             tx=run.tx, schedule=run.schedule),
                             mesh=mesh, state_shardings=plan.shardings, teacher_shardings=run.teacher_shardings,
                             max_shapes=shapes)
    evaluate = make_evaluator(run.task, run.data, mesh)

    summary: dict[str, Any] = {"workdir": workdir, "total_steps": config.total_steps, "metric": run.task.metric}
    barrier("teacher evaluation")  # its first collective, after the metrics files only process 0 opens
    # A teacher that is only a trunk (a detector's backbone and neck) or a foreign feature extractor has no head to
    # evaluate.
    if (run.teacher is not None and start == 0 and config.get("evaluate_teacher", True)
            and has_task_head(run.teacher)):
        log.info("evaluating the teacher")
        summary["teacher"] = evaluate(run.teacher, run.teacher_vars)
        writer.write(0, {f"teacher/{k}": v for k, v in summary["teacher"].items()})

    def evaluate_student(step: int) -> None:
        summary["eval"] = evaluate(unwrap(run.student), run.student_variables(state))
        writer.write(step, {f"eval/{k}": v for k, v in summary["eval"].items()})

    # The checkpoint of an evaluation step is written before its evaluation: a run that stopped during that evaluation
    # (it failed, or the process died) evaluates the step now, so metrics.jsonl has no hole where it was.
    due = 0 < start <= config.total_steps and (start % config.eval_every == 0 or start == config.total_steps)
    if due and each_process_text("" if writer.has_row(start, "eval/") else "missing")[0]:
        log.info("evaluating step %d, whose evaluation the previous attempt did not finish", start)
        evaluate_student(start)

    progress = Progress(config.total_steps, start)
    timer = {"step": start, "time": time.perf_counter()}
    last_metrics: dict[str, float] = {}

    def finish(step: int, metrics: Any) -> None:
        """Host-side bookkeeping of a completed step: the non-finite check, then the log row."""
        nonlocal last_metrics
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, host, last_saved)
        if step % config.log_every == 0 or step == config.total_steps:
            now = time.perf_counter()
            host["steps_per_sec"] = (step - timer["step"]) / max(now - timer["time"], 1e-9)
            host["images_per_sec"] = host["steps_per_sec"] * config.batch_size
            timer.update(step=step, time=now)
            writer.write(step, host)
            progress.update(step, f"loss {host['loss']:.4f}")
            last_metrics = host

    fault_signal, fault_step = _fault()
    barrier("train loop")
    if fault_step == 0 and start == 0:
        log.warning("%s: signal %d to this process before the first step", FAULT_ENV, fault_signal)
        os.kill(os.getpid(), fault_signal)
    log.info("training from step %d of %d in %s (%.1f s since the start; %d batch shape%s)", start,
             config.total_steps, workdir, time.perf_counter() - t_start, shapes, "" if shapes == 1 else "s")
    try:
        with jax.set_mesh(mesh):
            step, pending = start, None
            while step < config.total_steps:
                batch = global_batch(next(train_iter), mesh)
                state, metrics = step_fn(state, run.teacher_vars, batch)
                step += 1
                # The previous step's metrics are read while this one runs, so the check costs no idle device time.
                if pending is not None:
                    finish(*pending)
                pending = (step, metrics)
                stop = preempt.reached(step)
                save = stop or step % config.checkpoint_every == 0 or step == config.total_steps
                if save or step % config.eval_every == 0:
                    finish(*pending)  # never save or report a state before its step has been checked
                    pending = None
                if save:  # before evaluating: an evaluation that fails (a bad eval image) loses no training
                    ckpt.save(step, state, {"train": train_iter.get_state(), "run": record})
                    last_saved = step
                if step % config.eval_every == 0 or step == config.total_steps:
                    evaluate_student(step)
                if stop:
                    break
                if step == fault_step:
                    if pending is not None:
                        finish(*pending)
                        pending = None
                    ckpt.wait()
                    log.warning("%s: signal %d to this process after step %d", FAULT_ENV, fault_signal, step)
                    os.kill(os.getpid(), fault_signal)
            if pending is not None:
                finish(*pending)
    except Exception:  # a diverged step, an evaluation that failed, a record that cannot be read
        for close in (ckpt.close, writer.close):  # the saves under way hold the newest good state: let them finish
            try:
                close()
            except Exception as e:  # noqa: BLE001 - the error that stopped the run is the one to report
                log.error("while stopping after an error: %s: %s", type(e).__name__, e)
        raise
    progress.close()
    ckpt.wait()

    summary.update(step=step, finished=step >= config.total_steps, last_metrics=last_metrics)
    if summary["finished"]:
        if "eval" not in summary:  # a finished run re-opened: report its final evaluation again
            summary["eval"] = evaluate(unwrap(run.student), run.student_variables(state))
        pytorch = config.export.pytorch and not has_foreign_part(run.student)
        if config.export.pytorch and not pytorch:
            log.info("export: no student.pth (a foreign backbone has no PyTorch key mapping); Orbax only")
        export_student(unwrap(run.student), run.student_variables(state), os.path.join(workdir, "export"),
                       pytorch=pytorch)
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
