"""The trainer's start-up agreements across the processes of a job, on two real processes (jax.distributed over
127.0.0.1): another config on one process, or a workdir a process does not share, stops every process with an
error naming them, instead of training an inconsistent state or waiting forever in the first checkpoint save (or,
for a check one process failed alone, in the next collective); a
Ctrl-C on one process stops both at one step (passed on as the SIGTERM a scheduler sends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import train_cli as cli

from cankd_jax.train import run_record

JOB = os.path.join(os.path.dirname(__file__), "agreement_job.py")


def test_processes_that_disagree_on_config_or_workdir_all_stop_naming_it(tmp_path):
    port = cli.free_port()
    procs = [subprocess.Popen([sys.executable, JOB, str(port), str(i), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=cli.env(devices=1), cwd=cli.ROOT)
             for i in range(2)]
    results = cli.finish(procs, timeout=180)
    for code, out in results:
        assert code == 0, out[-3000:]
    lines = [[json.loads(line) for line in out.splitlines() if line.startswith('{"case"')] for _, out in results]
    cases = [{r["case"]: r.get("error", r.get("stopped", r.get("fingerprints"))) for r in rows} for rows in lines]
    for errors in cases:  # each process takes each decision, and both take it alike
        assert errors["a bad count on process 1"].startswith("ProcessesDisagree: process(es) [1] were given another")
        assert "log_every: 2 -> 0" in errors["a bad count on process 1"]
        assert errors["a lock file process 0 cannot write"].startswith("ValueError: cannot write ")
        assert "IsADirectoryError" in errors["a lock file process 0 cannot write"]
        assert errors["same config"] is None
        assert "process(es) [1] were given another config than process 0" in errors["another lr on process 1"]
        assert "optimizer.lr: 0.01 -> 0.02" in errors["another lr on process 1"]
        assert "extra: unset -> 1" in errors["a key only process 1 has"]
        assert errors["one shared workdir"] is None
        assert "process(es) [1] do not see process 0's --workdir" in errors["a workdir per process"]
        assert errors["one shared workdir again"] is None  # the first shared case's lock was let go
        assert errors["one teacher file, restored"] is None and errors["one teacher .pth"] is None
        assert errors["one student file"] is None
        assert errors["a student file per host"] == (
            "ProcessesDisagree: the initial student weights differ between processes: process(es) [1] hold other "
            "values than process 0 (e.g. ['bias']); every host must read the same student.pretrained file")
        assert errors["a teacher file per host, restored"] == (
            "ProcessesDisagree: the teacher's weights differ between processes: process(es) [1] hold other values "
            "than process 0 (e.g. ['bias']); every host must read the same teacher.checkpoint file")
        for part, what, key in (("teacher", "teacher's weights", "teacher.checkpoint"),
                                ("student", "initial student weights", "student.pretrained")):
            assert errors[f"non-finite {part}"] == (
                f"NonFiniteWeights: the {what} hold NaN or infinite values in 2 of 2 arrays (['bias']: 1 of 6, "
                "['kernel']: 1 of 24): "
                f"the weights {key} names are damaged or were saved from a run that diverged")
        assert errors["a teacher .pth per host"] == (
            "ProcessesDisagree: the teacher's weights differ between processes (JAX's check of device_put): every "
            "host must read the same teacher.checkpoint file")
    assert os.path.join(str(tmp_path), "local0") in cases[0]["a workdir per process"]
    assert os.path.join(str(tmp_path), "local1") in cases[1]["a workdir per process"]
    # One teacher spread over two processes, or held as host arrays by both, has the digest of the same weights
    # held by one process.
    r = np.random.default_rng(0)  # agreement_job's host_teacher(own_file=False)
    host = {"kernel": r.standard_normal((4, 6)).astype(np.float32), "bias": r.standard_normal(6).astype(np.float32)}
    one = run_record.fingerprint(host)
    assert cases[0]["fingerprints"] == cases[1]["fingerprints"] == {"placed": one, "host": one}
    stopped = [errors["ctrl-c"] for errors in cases]
    assert stopped[0] == stopped[1] and stopped[0] >= 3, stopped
    assert "Ctrl-C: saving a checkpoint at the end of this step" in results[1][1]
