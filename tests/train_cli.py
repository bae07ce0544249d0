"""Running `train.py` as users do, from tests: one process or several (jax.distributed over 127.0.0.1, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_ENV = "CANKD_JAX_TEST_FAULT"  # cankd_jax.train.trainer.FAULT_ENV (not imported: this module imports no jax)
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
# The runs the end-to-end tests compare: 8 steps, every step logged, checkpoints at 4 and 8, one evaluation.
EIGHT_STEPS = ("--config.total_steps=8", "--config.log_every=1", "--config.checkpoint_every=4",
               "--config.eval_every=8")


def command(workdir, *overrides, config: str = SMOKE) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}", *overrides]


def env(devices: int = 4, *, optimized: bool = False, **extra: str) -> dict[str, str]:
    """This environment with `devices` host CPU devices per process. conftest's compilation cache is inherited, and
    so is its compile flag (LLVM unoptimised: these runs, too, are mostly compiling) unless `optimized`, which runs
    train.py with the flags users run it with. Runs compared bit for bit must be built alike."""
    added = os.environ.get("CANKD_JAX_TESTS_ADDED_FLAGS", "").split() if optimized else []
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count") and f not in added)
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra,
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], *, processes: int = 1, devices: int = 4, log_dir=None,
          fault: Optional[dict[int, str]] = None, optimized: bool = False) -> list[subprocess.Popen]:
    """Start `args` as one process, or as `processes` processes of one job (each with `devices` devices).

    Output goes to `log_dir/process{i}.log` when given (read it with `read_log`), else to a pipe.
    `fault`: process index -> "SIGNAME@STEP", a signal that process sends itself after that step (0: before
    the first step; `trainer.FAULT_ENV`), so a test interrupts a run at a step rather than at a moment.
    `optimized`: see `env`.
    """
    extra = []
    if processes > 1:
        port = free_port()
        extra = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    procs = []
    for i in range(processes):
        out = subprocess.PIPE
        if log_dir is not None:
            out = open(os.path.join(log_dir, f"process{i}.log"), "w")  # noqa: SIM115 - the child owns it
        pid_flag = [f"--process_id={i}"] if processes > 1 else []
        procs.append(subprocess.Popen([*args, *extra, *pid_flag], stdout=out, stderr=subprocess.STDOUT, text=True,
                                      env=env(devices, optimized=optimized,
                                              **({FAULT_ENV: fault[i]} if fault and i in fault else {})),
                                      cwd=ROOT))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str]]:
    """Wait for every process; `(returncode, output)` each (output '' when it went to a log file)."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out or ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def run(args: list[str], *, processes: int = 1, devices: int = 4, log_dir=None, optimized: bool = False) -> list[str]:
    """Run to the end; every process must exit 0. Returns each process's output (or its log file's)."""
    results = finish(start(args, processes=processes, devices=devices, log_dir=log_dir, optimized=optimized))
    outputs = [out or read_log(log_dir, i) for i, (_, out) in enumerate(results)]
    for (code, _), out in zip(results, outputs, strict=True):
        assert code == 0, out[-4000:]
    return outputs


def read_log(log_dir, i: int = 0) -> str:
    path = os.path.join(log_dir, f"process{i}.log")
    return open(path).read() if os.path.exists(path) else ""


def rows(workdir) -> list[dict]:
    """Training rows of `metrics.jsonl` (those with a loss), in file order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def all_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def summary(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


TRAINING_KEYS = ("loss", "task/", "distill/", "lr", "grad_norm")


def assert_same_training(actual: list[dict], expected: list[dict], *, rtol: Optional[float] = None,
                         norm_rtol: Optional[float] = None) -> None:
    """Same steps, and the same training numbers: bit for bit (`rtol=None`) or to `rtol`; the gradient norms to
    `norm_rtol` where given (else `rtol`)."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected], [r["step"] for r in actual]
    for a, e in zip(actual, expected, strict=True):
        for k in e:
            if k.startswith(TRAINING_KEYS):
                tol = norm_rtol if norm_rtol is not None and k.startswith("grad_norm") else rtol
                if tol is None:
                    assert a[k] == e[k], (e["step"], k, a[k], e[k])
                else:
                    assert abs(a[k] - e[k]) <= tol * max(abs(e[k]), 1e-3), (e["step"], k, a[k], e[k])


def assert_same_training_across_topologies(actual: list[dict], expected: list[dict], *, resumed: int) -> None:
    """The smoke run's rows on other topologies (`actual`, resumed after step `resumed`) against the reference's
    (one device). Two topologies differ in rounding (their gradients and BatchNorm statistics are summed in other
    orders) and part by themselves: once rounding moves a ReLU or max-pool input across its kink, the gradient
    changes by far more than rounding. That moves the gradient norm at once (relative: 5.4e-4 to 6.6e-4 at step 6,
    5e-3 to 1.9e-2 at step 7, in two runs), the losses from a step or two later (1.3e-4 by step 8; 1e-5 or less
    before it), and the dynamics amplify it (1e-3 by step 9, `results/topology/`). So the losses are held to 1e-4
    through two steps after the resume (at most through step 7), where a wrong restore shows: another batch or
    other parameters at `resumed + 1`, lost optimizer moments at `resumed + 2` (the momentum zeroed in the step-4
    checkpoint moved step 6's loss by 1.4e-2 relative, measured). Over the 8 steps, the losses to 1e-3 and the
    gradient norms, which one kink moves by percents, to 1e-1, which still catches gradients summed instead of
    averaged over devices (a factor of the device count)."""
    close = [r for r in expected if r["step"] <= min(resumed + 2, 7)]
    assert_same_training(actual[:len(close)], close, rtol=1e-4, norm_rtol=1e-1)
    assert_same_training(actual, expected, rtol=1e-3, norm_rtol=1e-1)
