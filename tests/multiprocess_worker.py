"""One process of the 2-process test: 2 CPU devices each, gloo collectives, results to a JSON file.

    python tests/multiprocess_worker.py PORT PROCESS_ID OUT.json
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
assert jax.device_count() == 4 and jax.local_device_count() == 2

from tiny_setup import run  # noqa: E402

params, history = run()
if pid == 0:
    with open(out, "w") as f:
        json.dump({"history": [{k: float(v) for k, v in h.items()} for h in history],
                   "params": [a.tolist() for a in jax.tree.leaves(params)]}, f)
jax.distributed.shutdown()
