"""A bfloat16 run through `train.py`: stopped by Ctrl-C (SIGINT) before its first step, it saves after that
step, exits 0 and resumes bit for bit, and what it writes (checkpoints, the export) is float32. Slow tier: `pytest -m slow tests/test_bf16_resume.py`."""

from __future__ import annotations


import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_cli as cli
from train_cli import EIGHT_STEPS

pytestmark = pytest.mark.slow
BF16 = ("--config.dtype=bfloat16",)


def test_a_bfloat16_run_resumes_exactly_and_writes_float32(tmp_path):
    data_dir = str(tmp_path / "tfds")
    args = lambda workdir: cli.command(workdir, f"--config.data.data_dir={data_dir}", *EIGHT_STEPS, *BF16)  # noqa: E731
    reference = tmp_path / "reference"
    cli.run(args(reference), devices=1)

    workdir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    procs = cli.start(args(workdir), devices=1, log_dir=logs, fault={0: "SIGINT@0"})
    [(code, _)] = cli.finish(procs)
    log = cli.read_log(logs)
    assert code == 0, log[-3000:]
    assert "Ctrl-C: saving a checkpoint" in log and "Traceback" not in log
    assert cli.checkpoint_steps(workdir) == [1]
    out = cli.run(args(workdir), devices=1)[0]
    assert "resumed from step 1" in out
    cli.assert_same_training(cli.rows(workdir), cli.rows(reference))  # bit for bit
    assert cli.summary(workdir)["eval"] == cli.summary(reference)["eval"]

    state = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / "8" / "state"))
    leaves = [np.asarray(x) for x in _leaves(state)]
    assert leaves and all(x.dtype in (np.float32, np.int32, np.uint32) for x in leaves), {x.dtype for x in leaves}
    torch = pytest.importorskip("torch")
    exported = torch.load(workdir / "export" / "student.pth", map_location="cpu")["state_dict"]
    assert {str(v.dtype) for v in exported.values()} <= {"torch.float32", "torch.int64"}


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif tree is not None:
        yield tree
