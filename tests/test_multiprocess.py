"""Two processes x two devices (jax.distributed over 127.0.0.1, gloo) give the 1-device numbers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tiny_setup import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_device(tmp_path):
    port, out = _free_port(), str(tmp_path / "p0.json")
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    with open(out) as f:
        multi = json.load(f)
    params, history = run(1)
    for m1, m2 in zip(history, multi["history"], strict=True):
        for k in m1:
            np.testing.assert_allclose(m2[k], float(m1[k]), rtol=2e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(params), multi["params"], strict=True):
        np.testing.assert_allclose(np.asarray(b), a, rtol=2e-5, atol=1e-6)
