"""One process of a 2-process job (`python agreement_job.py PORT PROCESS_ID ROOT`) that runs the trainer's
agreements case by case and prints one JSON line per case: `{"case": ..., "error": <message or None>}`, then
`{"case": "fingerprints", "fingerprints": {...}}` (the teacher digests this process computed), and last
`{"case": "ctrl-c", "stopped": STEP}`: the step at which `Preemption` stopped this process after process 1 got a
Ctrl-C (SIGINT) after step 3, the processes stepping in lockstep (a barrier per step) as a train loop's
collectives keep them.

Every case runs on both processes in the same order (each is a collective), and a case that raises on one process
must raise on the other too, or the next collective would hang: the test reads both processes' lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import numpy as np


def main(port: str, process_id: str, root: str) -> None:
    from cankd_jax.train import distributed, trainer  # noqa: PLC0415 - after the flags are read
    from cankd_jax.train.preemption import Preemption  # noqa: PLC0415

    me = int(process_id)
    distributed.initialize(f"127.0.0.1:{port}", 2, me)
    import ml_collections  # noqa: PLC0415

    def config(lr: float) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"seed": 0, "optimizer": {"name": "sgd", "lr": lr}, "levels": (3, 4)})

    def locked(workdir: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        with trainer._workdir_lock(workdir):
            pass

    def smoke_run(bad_on_1: bool) -> None:  # the trainer's own start: the config compared before any other check
        from cankd_jax.config_arg import load_config  # noqa: PLC0415

        cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                       "smoke.py"))
        if bad_on_1 and me == 1:
            cfg.log_every = 0  # a count process 1 alone would refuse (and leave process 0 waiting)
        trainer.train_and_evaluate(cfg, os.path.join(root, "never"))

    blocked = os.path.join(root, "blocked")
    os.makedirs(os.path.join(blocked, ".lock"), exist_ok=True)  # process 0 cannot open it as a file
    shared = os.path.join(root, "shared")
    cases = [
        ("a bad count on process 1", lambda: smoke_run(True)),
        ("a lock file process 0 cannot write", lambda: locked(blocked)),
        ("same config", lambda: distributed.check_same_config(config(0.01))),
        ("another lr on process 1", lambda: distributed.check_same_config(config(0.02 if me else 0.01))),
        ("a key only process 1 has", lambda: distributed.check_same_config(
            ml_collections.ConfigDict({**config(0.01).to_dict(), **({"extra": 1} if me else {})}))),
        ("one shared workdir", lambda: locked(shared)),
        ("a workdir per process", lambda: locked(os.path.join(root, f"local{me}"))),
        ("one shared workdir again", lambda: locked(shared)),
    ]
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

    from cankd_jax.train import run_record  # noqa: PLC0415

    mesh = Mesh(np.array(jax.devices()), ("data",))  # one device per process here: 2 in all

    from cankd_jax.train import weights  # noqa: PLC0415

    specs = {"kernel": PartitionSpec("data"), "bias": PartitionSpec()}  # spread; whole on every process

    def host_teacher(own_file: bool, nan: bool = False) -> dict:
        r = np.random.default_rng(me if own_file else 0)
        kernel = r.standard_normal((4, 6)).astype(np.float32)
        bias = r.standard_normal(6).astype(np.float32)
        if nan:
            kernel[3, 1] = np.nan  # in process 1's half of the spread kernel only
            bias[2] = np.inf  # on both processes: one element, counted once
        return {"kernel": kernel, "bias": bias}

    fingerprints = {}

    def restored(own_file: bool, nan: bool = False) -> None:
        """Each process builds its own shards from what it read, as Orbax's restore of an export/ does; the
        trainer's start then compares them, checks them for NaNs and fingerprints them in one pass."""
        host = host_teacher(own_file, nan)
        placed = {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k]), lambda i, v=v: v[i])
                  for k, v in host.items()}
        fingerprints[own_file] = run_record.make_record(ml_collections.ConfigDict(), placed, check=True)["teacher"]

    def initial(own_file: bool, nan: bool = False) -> None:
        """Initial student weights read by each process (`student.pretrained`), checked before training."""
        host = host_teacher(own_file, nan)
        placed = {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k]), lambda i, v=v: v[i])
                  for k, v in host.items()}
        run_record.check_weights(placed, "initial student weights", "student.pretrained")

    def read_pth(own_file: bool) -> None:
        """A .pth teacher: host arrays placed with device_put, which JAX compares across processes."""
        weights.place(host_teacher(own_file), {k: NamedSharding(mesh, s) for k, s in specs.items()})

    cases += [("one teacher file, restored", lambda: restored(False)),
              ("a teacher file per host, restored", lambda: restored(True)),
              ("one teacher .pth", lambda: read_pth(False)), ("a teacher .pth per host", lambda: read_pth(True)),
              ("one student file", lambda: initial(False)), ("a student file per host", lambda: initial(True)),
              ("non-finite teacher", lambda: restored(False, nan=True)),
              ("non-finite student", lambda: initial(False, nan=True))]
    for name, case in cases:
        try:
            case()
            error = None
        except (distributed.ProcessesDisagree, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"case": name, "error": error}), flush=True)
    stopped = None
    with Preemption() as preempt:
        for step in range(1, 100_000):
            distributed.barrier("step")
            if me == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            if preempt.reached(step):
                stopped = step
                break
    fingerprints = {"placed": fingerprints.get(False), "host": run_record.fingerprint(host_teacher(False))}
    print(json.dumps({"case": "fingerprints", "fingerprints": fingerprints}), flush=True)
    print(json.dumps({"case": "ctrl-c", "stopped": stopped}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
